"""The training loop on the tiny 2.6 fixture checkpoint: it learns, resumes exactly, compiles a
bounded set of programs, writes metrics.

The processor runs at scale_resolution 112 (64 patches per image, one slice each) so a step is
cheap; everything else is the fixture model with its training tokenizer.
"""

import functools
import json

import numpy as np
import pytest
from PIL import Image
from train_helpers import Killed, train_checkpoint, train_dir

from minicpmv_jax import MiniCPMV, MiniCPMVProcessor, train
from minicpmv_jax.errors import MiniCPMVError
from minicpmv_jax.train.loss import TRACE_COUNTS

VERSION = "minicpm-v-2_6"
QA = [  # (image or None, question, answer)
    ("images/s00.png", "What is in the picture?", "A striped square."),
    ("images/s01.png", "Which color dominates?", "Mostly green."),
    ("images/s02a.png", "Describe the image.", "Red lines on white."),
    (None, "Say hello.", "Hello there friend."),
]


def qa_samples():
    out = []
    for i, (image, q, a) in enumerate(QA):
        out.append(
            {
                "id": str(i),
                "image": image if image else {},
                "conversations": [
                    {"role": "user", "content": ("<image>\n" if image else "") + q},
                    {"role": "assistant", "content": a},
                ],
            }
        )
    return out


@functools.cache
def small_model():
    """The fixture model whose processor sends each image as one 112 px slice (at most 64
    patches: a 64-patch bucket rather than the default smallest, 256)."""
    folder = train_checkpoint(VERSION)
    model = MiniCPMV.from_pretrained(folder, dtype="float32", progress=False)
    model.processor = MiniCPMVProcessor.from_pretrained(
        folder, scale_resolution=112, max_slice_nums=1, patch_buckets=(64,)
    )
    return model


def qa_examples(model):
    examples, skipped = train.load_examples(
        model, qa_samples(), image_root=train_dir(VERSION) / "sft"
    )
    assert not skipped
    return examples


def chat_answer(model, image, question):
    content = [question]
    if image:
        with Image.open(train_dir(VERSION) / "sft" / image) as im:
            content = [im.convert("RGB"), question]
    return model.chat([{"role": "user", "content": content}], max_new_tokens=16)


# End to end (60 steps, then chat): marked slow. Its parts run in the default suite: the loss and
# gradients against the official trainer (test_train_loss.py), the loop's update, save and resume
# (test_resume_gives_same_losses_and_no_new_programs), LoRA paths (test_train_lora_paths.py).
@pytest.mark.slow
@pytest.mark.parametrize("mode,lr", [("lora", 2e-2), ("full", 3e-3)])
def test_it_learns(mode, lr):
    """60 steps on four samples: the loss falls below 10% of its start and greedy chat then
    answers each trained question with its trained answer."""
    model = small_model()
    cfg = train.TrainConfig(
        mode=mode,
        steps=60,
        learning_rate=lr,
        warmup_steps=5,
        batch_size=4,
        weight_decay=0.0,
        token_buckets=(128,),
        lora=train.LoraConfig(r=8, alpha=16),
    )
    trained, history = train.finetune(model, qa_examples(model), cfg, progress=False)
    assert history[-1]["loss"] < 0.1 * history[0]["loss"], [h["loss"] for h in history]
    for image, question, answer in QA:
        assert chat_answer(trained, image, question) == answer


def test_resume_gives_same_losses_and_no_new_programs(tmp_path):
    """A run killed after step 3 (last save: step 2) and restarted with the same command gives
    the uninterrupted run's losses; programs: one per distinct batch shape, none on resume."""
    model = small_model()
    examples = qa_examples(model)
    cfg = train.TrainConfig(
        mode="lora",
        steps=6,
        learning_rate=1e-2,
        batch_size=2,
        save_every=2,
        token_buckets=(128,),
        lora=train.LoraConfig(r=4, alpha=8),
    )
    before = TRACE_COUNTS["train_step"]
    _, full = train.finetune(
        model, examples, cfg, eval_examples=examples[:2], output_dir=tmp_path / "a", progress=False
    )
    trainer = train.Trainer(model, examples, cfg)
    shapes = set()
    for i in range(cfg.steps):
        arrays, groups = trainer._device_batch(trainer.micro_batch(i))
        shapes.add((groups, *(a.shape for a in arrays.values())))
    assert TRACE_COUNTS["train_step"] - before == len(shapes)
    compiled = TRACE_COUNTS["train_step"]

    def kill(row):
        if row["step"] == 3:
            raise Killed

    killed = train.Trainer(model, examples, cfg, output_dir=tmp_path / "b")
    with pytest.raises(Killed):
        killed.run(progress=False, on_step=kill)
    _, resumed = train.finetune(
        model, examples, cfg, eval_examples=examples[:2], output_dir=tmp_path / "b", progress=False
    )
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    np.testing.assert_allclose(
        [r["loss"] for r in resumed], [r["loss"] for r in full[2:]], rtol=1e-6
    )
    np.testing.assert_allclose(resumed[-1]["eval_loss"], full[-1]["eval_loss"], rtol=1e-6)
    assert TRACE_COUNTS["train_step"] == compiled
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "skipped_samples"):
        assert all(np.isfinite(r[key]) for r in rows), key
    np.testing.assert_allclose(rows[1]["learning_rate"], cfg.schedule()(1), rtol=1e-6)
    saves = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert saves == ["step_00000004", "step_00000006"]  # keep_saves=2, atomic (no .partial)


def test_train_config_errors():
    with pytest.raises(MiniCPMVError, match="mode must be one of"):
        train.TrainConfig(mode="half")
    with pytest.raises(MiniCPMVError, match="batch_size"):
        train.TrainConfig(batch_size=0)
    with pytest.raises(MiniCPMVError, match="dropout"):
        train.LoraConfig(dropout=1.0)
    with pytest.raises(MiniCPMVError, match="remat"):
        train.TrainConfig(remat="some")
    with pytest.raises(MiniCPMVError, match="frozen_dtype"):
        train.TrainConfig(frozen_dtype="int4")


# Slow: compiles the full fine-tuning step partitioned over 8 simulated devices. The default
# suite checks the loss and every gradient on the (1, 8, 1) and (2, 2, 2) meshes against the
# official trainer (test_train_loss.py::test_mesh_matches_single_device); this adds the optimizer
# update with sharded moments.
@pytest.mark.slow
def test_train_step_on_mesh_matches_single_device():
    """Two steps on a (2, 2, 2) mesh (batch over data, parameters and moments sharded) give the
    single-device losses within 1e-5 and gradient norms within 1e-4 (relative)."""
    from minicpmv_jax.sharding import make_mesh

    cfg = train.TrainConfig(
        mode="full", steps=2, learning_rate=1e-3, batch_size=2, token_buckets=(128,)
    )
    single = small_model()
    folder = train_checkpoint(VERSION)
    sharded = MiniCPMV.from_pretrained(
        folder, dtype="float32", mesh=make_mesh((2, 2, 2)), progress=False
    )
    sharded.processor = single.processor
    runs = [train.Trainer(m, qa_examples(m), cfg).run(progress=False) for m in (single, sharded)]
    for a, b in zip(*runs, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
