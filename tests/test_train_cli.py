"""`minicpmv-jax finetune`: trains, writes metrics and a PEFT adapter, resumes with the same
command, and names bad data."""

import json

import numpy as np
import pytest
from train_helpers import Killed, stop_after_step, train_checkpoint

from minicpmv_jax import MiniCPMV, train
from minicpmv_jax.cli import main
from minicpmv_jax.train.loss import TRACE_COUNTS

VERSION = "minicpm-v-2_6"


def write_data(folder, samples, name="train.json"):
    f = folder / name
    f.write_text(json.dumps(samples))
    return f


TEXT = [
    {
        "id": str(i),
        "image": {},
        "conversations": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": a},
        ],
    }
    for i, (q, a) in enumerate([("Say hi.", "Hi."), ("Count to two.", "One, two.")])
]


# a longer answer: its batches take the next token bucket (128), a second train step program
LONG = {
    "id": "long",
    "image": {},
    "conversations": [
        {"role": "user", "content": "Count to twenty in words."},
        {
            "role": "assistant",
            "content": "One, two, three, four, five, six, seven, eight, nine, ten, eleven, "
            "twelve, thirteen, fourteen, fifteen, sixteen, seventeen, eighteen, nineteen, twenty.",
        },
    ],
}


# With the slow tests (.ci/run): the default suite keeps the same kill-and-resume path through
# test_train_dpo.py::test_dpo_cli_trains_resumes_and_skips and test_checkpoint.py's interrupted
# save, and the adapter export through test_train_peft.py.
@pytest.mark.slow
def test_finetune_lora_resumes_and_exports(tmp_path, capsys, monkeypatch):
    """A run killed after step 3 (last save: step 2) and started again with the same command
    resumes and gives the uninterrupted run's losses and eval loss; programs: one per distinct
    batch shape, none on the killed run or the resume. Metrics rows, the save rotation (keep 2,
    atomic) and the exported PEFT adapter (it reproduces the run's last eval loss) are checked."""
    data = write_data(tmp_path, [*TEXT, LONG])
    eval_data = write_data(tmp_path, TEXT, "eval.json")  # one batch shape: one eval program
    monkeypatch.chdir(tmp_path)  # relative paths, as typed on a command line
    argv = ["finetune", "--model", str(train_checkpoint(VERSION)), "--data", "train.json"]
    argv += ["--eval-data", "eval.json", "--lora", "--lora-r", "4", "--lora-alpha", "8"]
    argv += ["--learning-rate", "1e-2", "--save-every", "2", "--steps", "5", "--no-progress"]
    argv += ["--lora-dropout", "0.05", "--remat", "full"]  # the official dropout
    before = TRACE_COUNTS["train_step"]
    assert main([*argv, "--output", "full"]) == 0  # uninterrupted
    compiled = TRACE_COUNTS["train_step"]
    with monkeypatch.context() as m, pytest.raises(Killed):
        stop_after_step(m, 3)  # step 3's metrics row is written, its state not saved
        main([*argv, "--output", "run"])
    assert main([*argv, "--output", "run"]) == 0  # the same command resumes at step 2
    assert TRACE_COUNTS["train_step"] == compiled
    assert "done: step 5" in capsys.readouterr().out
    full, run = (
        [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("full", "run")
    )
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in run] == [1, 2, 3, 3, 4, 5]  # the killed run's rows, then the resumed
    np.testing.assert_allclose(
        [r["loss"] for r in run[3:]], [r["loss"] for r in full[2:]], rtol=1e-6
    )
    np.testing.assert_allclose(run[-1]["eval_loss"], full[-1]["eval_loss"], rtol=1e-6)
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "skipped_samples"):
        assert all(np.isfinite(r[key]) for r in full), key
    cfg = train.TrainConfig(steps=5, learning_rate=1e-2)  # the schedule of the command's flags
    np.testing.assert_allclose(full[1]["learning_rate"], cfg.schedule()(1), rtol=1e-6)
    saves = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert saves == ["step_00000004", "step_00000005"]  # keep_saves=2, atomic (no .partial)

    model = MiniCPMV.from_pretrained(
        train_checkpoint(VERSION), dtype="float32", progress=False, adapter=tmp_path / "run/adapter"
    )
    ex, _ = train.load_examples(model, data)
    # batch_size 1: every micro-batch is one example; its padded shapes are the program's key
    shapes = set()
    for e in ex:
        arrays, groups = train.loop.device_batch(model, train.collate([e]), cfg)
        shapes.add((groups, *(a.shape for a in arrays.values())))
    assert compiled - before == len(shapes) == 2
    # the exported adapter reproduces the run's last eval loss (mean token loss of the eval
    # data): one forward of its samples, the token cross-entropy in float64 numpy (labels are
    # shifted)
    batch = train.collate(train.load_examples(model, eval_data)[0])
    logits = train.forward_logits(model, batch).astype(np.float64)
    labels = np.asarray(batch["labels"])[:, : logits.shape[1]]
    valid = labels != train.IGNORE_INDEX
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    target = np.take_along_axis(logits, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    eval_loss = np.where(valid, lse - target, 0.0).sum() / valid.sum()
    np.testing.assert_allclose(eval_loss, run[-1]["eval_loss"], rtol=1e-4)


def test_finetune_bad_data(tmp_path, capsys):
    bad = dict(TEXT[0], id="b7", conversations=[])
    data = write_data(tmp_path, [TEXT[0], bad])
    argv = ["finetune", "--model", str(train_checkpoint(VERSION)), "--data", str(data)]
    argv += ["--output", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    assert "sample 'b7', field 'conversations'" in capsys.readouterr().err


def test_finetune_quant_needs_lora(tmp_path, capsys):
    """--quant int8 freezes the int8 base: without --lora there is nothing it could train."""
    data = write_data(tmp_path, TEXT)
    argv = ["finetune", "--model", str(train_checkpoint(VERSION)), "--data", str(data)]
    argv += ["--output", str(tmp_path / "run"), "--quant", "int8", "--remat", "full"]
    assert main(argv) == 2
    assert "--quant int8 trains LoRA adapters" in capsys.readouterr().err
