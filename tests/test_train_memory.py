"""The training memory plan: trainable element counts equal the official trainer's (fixture
batch.json) for every mode and version; the README table is what the planner prints."""

import json
import pathlib

import pytest
from conftest import FIXTURES
from train_helpers import TRAIN_VERSIONS, train_dir

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


def test_remat_same_step_less_memory():
    """Remat (decoder "full", vision "dots"): one full fine-tuning micro-step gives the loss,
    gradient norm and every gradient of the step without remat (1e-6; the gradients are read
    from optax.MultiSteps' accumulator), and the compiled step needs less temporary memory
    (XLA's memory_analysis)."""
    import jax
    import numpy as np
    from test_train_loop import qa_examples, small_model

    from minicpmv_jax import train

    model = small_model()
    examples = qa_examples(model)
    runs = []
    for remat, vision_remat in (("none", "none"), ("full", "dots")):
        cfg = train.TrainConfig(
            mode="full",
            steps=1,
            batch_size=4,
            grad_accum=2,
            token_buckets=(128,),
            remat=remat,
            vision_remat=vision_remat,
        )
        trainer = train.Trainer(model, examples, cfg)
        arrays, groups = trainer._device_batch(trainer.micro_batch(0))
        args = (trainer.state, trainer.frozen, trainer.loaded, arrays)
        compiled = trainer._step.lower(*args, num_groups=groups).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        state, metrics = compiled(*args)
        runs.append((temp, metrics, jax.tree.leaves(state["opt"].acc_grads)))
    (temp0, metrics0, grads0), (temp, metrics, grads) = runs
    assert temp < 0.8 * temp0, (temp, temp0)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[key], metrics0[key], rtol=1e-6, err_msg=key)
    assert len(grads) == len(grads0) > 0
    for a, b in zip(grads, grads0, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_plan_agrees_with_compiled_step(remat):
    """The plan's total within 25% of the compiled text-only train step's memory (the model's
    weights + the train state + XLA's temporaries) on the tiny checkpoint, full and LoRA."""
    import jax
    from test_train_cli import TEXT
    from test_train_loop import small_model

    from minicpmv_jax import train

    model = small_model()
    examples, _ = train.load_examples(model, TEXT * 2)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    for mode in ("full", "lora"):
        lora = LoraConfig(r=4, alpha=8)
        cfg = train.TrainConfig(
            mode=mode,
            steps=1,
            batch_size=4,
            token_buckets=(128,),
            slice_buckets=None,  # text only: no vision program
            remat=remat,
            lora=lora,
        )
        trainer = train.Trainer(model, examples, cfg)
        arrays, groups = trainer._device_batch(trainer.micro_batch(0))
        args = (trainer.state, trainer.frozen, trainer.loaded, arrays)
        analysis = trainer._step.lower(*args, num_groups=groups).compile().memory_analysis()
        measured = nbytes(model.state) + nbytes(trainer.state) + analysis.temp_size_in_bytes
        p = memory.plan(
            model.config,
            mode=mode,
            lora=lora,
            batch=4,
            seq_len=128,
            num_slices=0,
            param_dtype="float32",
            remat=remat,
        )
        assert abs(p.total - measured) <= 0.25 * measured, (mode, p, measured)
