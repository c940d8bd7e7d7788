"""The training memory plan: trainable element counts equal the official trainer's (fixture
batch.json) for every mode and version; the README table is what the planner prints."""

import json
import pathlib

import pytest
from conftest import FIXTURES
from train_helpers import FAST_COMPILE, TRAIN_VERSIONS, train_dir

from minicpmv_jax.config import MiniCPMVConfig
from minicpmv_jax.train import memory
from minicpmv_jax.train.lora import LoraConfig


@pytest.mark.parametrize("version", TRAIN_VERSIONS)
@pytest.mark.parametrize("mode", ["full", "freeze_vision", "lora"])
def test_trainable_elements_match_official(version, mode):
    cfg = MiniCPMVConfig.from_pretrained(FIXTURES / version / "checkpoint", dtype="float32")
    meta = json.loads((train_dir(version) / "batch" / "batch.json").read_text())
    p = memory.plan(cfg, mode=mode, lora=LoraConfig(r=8, alpha=16))
    assert p.trainable_elements == meta["modes"][mode]["n_trainable_elements"]
    assert p.grads == p.master == 4 * p.trainable_elements  # one device: nothing sharded
    assert p.optimizer == 2 * p.grads


def test_readme_table(capsys):
    memory.main()
    table = capsys.readouterr().out.strip()
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert table in readme, "README training table out of date: python -m minicpmv_jax.train.memory"


def _compiled_step(trainer):
    """(compiled train step, its arguments) of the trainer's first micro-batch."""
    arrays, groups = trainer._device_batch(trainer.micro_batch(0))
    args = (trainer.state, trainer.frozen, trainer.loaded, arrays)
    return trainer._step.lower(*args, num_groups=groups).compile(FAST_COMPILE), args


# Both modes run with the slow tests (.ci/run; one compiled step pair per mode, 22 s each): the
# default suite checks the plan by test_trainable_elements_match_official and remat's gradients
# by test_model_static.py::test_remat_keeps_loss_and_gradients and
# test_vision_remat_same_gradients_less_memory.
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.slow
def test_step_remat_and_plan(mode, monkeypatch):
    """On the tiny checkpoint's train step over a batch with an image (a 7-slice image row and
    three text rows: 8 slices of 256 patches, 4 x 256 tokens; grad_accum 2: the first
    micro-step's gradients are read from optax.MultiSteps' accumulator), remat "full" (decoder
    and vision tower) gives the loss, gradient norm and every gradient of the step without
    remat (1e-6) with less temporary memory (XLA's memory_analysis), and the plan's total is
    within 25% of the compiled step's memory (the model's weights + the train state + the batch
    + the step's temporaries) either way. LoRA keeps the official modules_to_save: the tower and
    resampler train in both modes. The plan models the scanned decoder stack (every backend
    but CPU): the CPU step's frozen per-layer views (train.loop.SPLIT_FROZEN_LAYERS, tested in
    test_train_lora_paths) are off here."""
    import copy

    import jax
    import numpy as np
    from test_train_cli import TEXT
    from test_train_loop import VERSION, qa_examples, small_model
    from train_helpers import train_checkpoint

    from minicpmv_jax import MiniCPMVProcessor, train
    from minicpmv_jax.train import loop

    monkeypatch.setattr(loop, "SPLIT_FROZEN_LAYERS", False)

    # the fixture model with a processor that slices the 112 px images (7 slices each, padded
    # to the smallest default patch bucket, 256): the vision side weighs as much as the decoder
    model = copy.copy(small_model())
    model.processor = MiniCPMVProcessor.from_pretrained(
        train_checkpoint(VERSION), scale_resolution=112
    )
    qa = qa_examples(model)
    text, _ = train.load_examples(model, TEXT)
    examples = [qa[0], qa[3], *text]  # the image row first: micro-batch 0 holds every row
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    lora = LoraConfig(r=4, alpha=8)
    runs = []
    for remat in ("none", "full"):
        cfg = train.TrainConfig(
            mode=mode,
            steps=1,
            batch_size=4,
            grad_accum=2,
            token_buckets=(256,),
            slice_buckets=(8,),
            remat=remat,
            lora=lora,
        )
        trainer = train.Trainer(model, examples, cfg)
        compiled, args = _compiled_step(trainer)
        arrays = args[-1]
        slices, patches = arrays["pixel_patches"].shape[:2]
        assert (slices, patches) == (8, 256)
        temp = compiled.memory_analysis().temp_size_in_bytes
        measured = nbytes(model.state) + nbytes(trainer.state) + nbytes(arrays) + temp
        p = memory.plan(
            model.config,
            mode=mode,
            lora=lora,
            batch=4,
            seq_len=256,
            num_slices=slices,
            patch_bucket=patches,
            param_dtype="float32",
            grad_accum=2,
            remat=remat,
        )
        assert abs(p.total - measured) <= 0.25 * measured, (remat, p.total / measured)
        state, metrics = compiled(*args)
        runs.append((temp, metrics, jax.tree.leaves(state["opt"].acc_grads)))
    (temp0, metrics0, grads0), (temp, metrics, grads) = runs
    assert temp < 0.8 * temp0, (temp, temp0)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[key], metrics0[key], rtol=1e-6, err_msg=key)
    assert len(grads) == len(grads0) > 0
    for a, b in zip(grads, grads0, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_vision_remat_same_gradients_less_memory():
    """The vision tower alone on the QA images' slices: remat "full" and "dots" give the
    gradients of every tower weight without remat (within 1e-6 of the largest gradient entry:
    the loss is a sum of squares, gradients reach ~1e2) with less compiled temporary memory."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from test_train_loop import qa_examples, small_model

    from minicpmv_jax import train
    from minicpmv_jax.train.loss import prepare_batch

    model = small_model()
    arrays = prepare_batch(
        model,
        train.collate(qa_examples(model)),
        slice_buckets=(4,),
        patch_buckets=model.processor.patch_buckets,
    )
    inputs = [jnp.asarray(arrays[k]) for k in ("pixel_patches", "position_ids", "vision_mask")]
    valid = jnp.asarray(arrays["patch_valid"])[..., None]
    runs = []
    for remat in ("none", "full", "dots"):
        vpm = nnx.merge(*nnx.split(model.module.vpm))  # a copy whose config can change
        vpm.cfg = dataclasses.replace(vpm.cfg, remat=remat)
        graphdef, params = nnx.split(vpm)

        def loss(params, *inputs, graphdef=graphdef):
            feats = nnx.merge(graphdef, params)(*inputs)
            return jnp.sum(jnp.where(valid, feats, 0.0) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(params, *inputs).compile(FAST_COMPILE)
        temp = compiled.memory_analysis().temp_size_in_bytes
        runs.append((temp, jax.tree.leaves(compiled(params, *inputs))))
    temp0, grads0 = runs[0]
    scale = max(float(np.abs(g).max()) for g in grads0)
    for temp, grads in runs[1:]:
        assert temp < 0.8 * temp0, (temp, temp0)
        for a, b in zip(grads, grads0, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6 * scale)
