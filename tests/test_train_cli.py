"""`minicpmv-jax finetune`: trains, writes metrics and a PEFT adapter, resumes with the same
command, and names bad data."""

import json

import numpy as np
import pytest
from train_helpers import Killed, stop_after_step, train_checkpoint

from minicpmv_jax import MiniCPMV, train
from minicpmv_jax.cli import main

VERSION = "minicpm-v-2_6"


def write_data(folder, samples):
    f = folder / "train.json"
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


def test_finetune_lora_resumes_and_exports(tmp_path, capsys, monkeypatch):
    data = write_data(tmp_path, TEXT)
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # relative paths, as typed on a command line
    argv = ["finetune", "--model", str(train_checkpoint(VERSION)), "--data", "train.json"]
    argv += ["--eval-data", "train.json", "--output", "run", "--lora", "--lora-r", "4"]
    argv += ["--lora-alpha", "8", "--learning-rate", "1e-2", "--save-every", "1"]
    argv += ["--lora-dropout", "0.05", "--remat", "full", "--no-progress"]  # the official dropout
    argv += ["--steps", "3"]
    with monkeypatch.context() as m, pytest.raises(Killed):
        stop_after_step(m, 2)  # killed after step 2's save and metrics row
        main(argv)
    assert main(argv) == 0  # the same command resumes at step 2 and trains step 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "eval_loss" in rows[-1]
    assert "done: step 3" in capsys.readouterr().out
    model = MiniCPMV.from_pretrained(
        train_checkpoint(VERSION), dtype="float32", progress=False, adapter=out / "adapter"
    )
    ex, _ = train.load_examples(model, data)
    # the exported adapter reproduces the run's last eval loss (mean token loss of the data):
    # one forward of both samples, the token cross-entropy in float64 numpy (labels are shifted)
    batch = train.collate(ex)
    logits = train.forward_logits(model, batch).astype(np.float64)
    labels = np.asarray(batch["labels"])[:, : logits.shape[1]]
    valid = labels != train.IGNORE_INDEX
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    target = np.take_along_axis(logits, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    eval_loss = np.where(valid, lse - target, 0.0).sum() / valid.sum()
    np.testing.assert_allclose(eval_loss, rows[-1]["eval_loss"], rtol=1e-4)


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
