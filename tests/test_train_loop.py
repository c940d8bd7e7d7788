"""The training loop on the tiny 2.6 fixture checkpoint: it learns (slow), its settings are
validated, a sharded step equals the single-device one (slow); the killed-and-resumed run, its
programs and metrics are checked through the command line (test_train_cli.py).

The processor runs at scale_resolution 112 (64 patches per image, one slice each) so a step is
cheap; everything else is the fixture model with its training tokenizer.
"""

import functools

import numpy as np
import pytest
from PIL import Image
from train_helpers import train_checkpoint, train_dir

from minicpmv_jax import MiniCPMV, MiniCPMVProcessor, train
from minicpmv_jax.errors import MiniCPMVError

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
    # greedy: chat()'s default samples (top-p, fresh randomness each call)
    return model.chat(
        [{"role": "user", "content": content}],
        max_new_tokens=16,
        sampling=False,
        num_beams=1,
        repetition_penalty=1.0,
    )


# End to end (60 steps, then chat): marked slow. Its parts run in the default suite: the loss and
# gradients against the official trainer (test_train_loss.py), the loop's update, save and resume
# (test_train_cli.py::test_finetune_lora_resumes_and_exports), LoRA paths (test_train_lora_paths.py).
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


# Two three-step runs, their compiled step's text and four restores (40 s): runs with the slow
# tests, as do the other full-mode train steps (test_it_learns, the mesh step, the remat plan).
# The default suite checks full mode's loss and gradients against the official trainer
# (test_train_loss.py) and the optimizer pieces (the clip and the decay mask above and below).
@pytest.mark.slow
def test_cpu_full_step_keeps_decoder_layers_split(tmp_path, monkeypatch):
    """CPU, full fine-tuning: the trainable decoder stack, its AdamW moments and so its
    gradients are per-layer arrays in the train state (loop.SPLIT_TRAINABLE_LAYERS), and the
    compiled step copies no decoder layer weight out of a stack. Three steps (weight decay 0.1)
    give the stacked state's losses and gradient norms (1e-6 relative); the trained weights
    agree to 1e-6 but for at most 1e-3 of each tensor's elements, which differ by at most
    2 x steps x lr (Adam's first update is lr x sign(g): where a gradient is ~0 the unrolled
    layers' other summation order can flip it; measured: at most 8 of 65,536 elements, 2.1e-5
    at most), except the key biases,
    whose exact gradient is 0 (a key bias adds one constant to each query's scores, which the
    softmax cancels), so that Adam steps them by their rounding noise. Saves hold the stacked
    layout: each layout's Trainer restores either run's save to that run's state exactly."""
    import re

    import jax
    from flax import nnx

    from minicpmv_jax.layers import LayerParts
    from minicpmv_jax.sharding import path_name
    from minicpmv_jax.train import loop

    model = small_model()
    cfg = train.TrainConfig(
        mode="full", steps=3, learning_rate=1e-3, batch_size=2, token_buckets=(128,),
        save_every=3, keep_saves=1,
    )  # fmt: skip
    is_parts = lambda x: isinstance(x, LayerParts)
    stack_names = [
        path_name(p) for p, _ in nnx.to_flat_state(model.state)
        if path_name(p).startswith("llm.model.layers.")
    ]  # fmt: skip

    def make(split: bool, out):
        monkeypatch.setattr(loop, "SPLIT_TRAINABLE_LAYERS", split)
        return train.Trainer(model, qa_examples(model), cfg, output_dir=out)

    split = make(True, tmp_path / "split")
    split_rows = split.run(progress=False)
    stacked = make(False, tmp_path / "stacked")
    stacked_rows = stacked.run(progress=False)
    # params, mu and nu of every decoder-stack tensor as parts; none in the stacked state
    count = lambda state: sum(map(is_parts, jax.tree.leaves(state, is_leaf=is_parts)))
    assert (count(split.state), count(stacked.state)) == (3 * len(stack_names), 0)
    for a, b in zip(split_rows, stacked_rows, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-6)
    got = dict(nnx.to_flat_state(split.trained_model().state))
    for path, var in nnx.to_flat_state(stacked.trained_model().state):
        if path_name(path).endswith("k_proj.bias"):
            continue
        diff = np.abs(np.asarray(got[path].get_value()) - np.asarray(var.get_value()))
        assert diff.max() <= 2 * cfg.steps * cfg.learning_rate, (path_name(path), diff.max())
        assert (diff > 1e-6).mean() <= 1e-3, (path_name(path), (diff > 1e-6).sum())

    arrays, groups = split._device_batch(split.micro_batch(0))
    with model._precision():
        hlo = (
            split._step.lower(split.state, split.frozen, split.loaded, arrays, num_groups=groups)
            .compile()
            .as_text()
        )
    copies = set(re.findall(r"%\S*dynamic-slice\S* = f32\[([\d,]*)\]", hlo))
    layer_shapes = {
        ",".join(map(str, v.get_value().shape[1:]))
        for p, v in nnx.to_flat_state(model.state)
        if path_name(p) in stack_names and v.get_value().ndim >= 3
    }
    assert layer_shapes and not copies & layer_shapes, copies & layer_shapes

    for saved in (split, stacked):
        want = jax.tree.leaves(loop.stack_parts(saved.state))
        for layout in (True, False):
            fresh = make(layout, saved.output_dir)
            assert fresh.restore_latest() and fresh.step == 3
            assert count(fresh.state) == (3 * len(stack_names) if layout else 0)
            for a, b in zip(jax.tree.leaves(loop.stack_parts(fresh.state)), want, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_clip_by_global_norm_matches_optax():
    """loop.clip_by_global_norm (one scalar factor) gives optax.clip_by_global_norm's updates
    within 2.5e-7 relative above the limit (x (m / n) against (x / n) m: two roundings each,
    measured 1.2e-7) with the clipped norm equal to the limit, and the updates unchanged below
    it, on a tree of float32 matrix, vector and scalar leaves."""
    import jax
    import jax.numpy as jnp
    import optax

    from minicpmv_jax.train import loop

    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(64, 32)), "b": rng.normal(size=(32,)), "s": rng.normal(size=())}
    tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    norm = float(optax.tree.norm(tree))
    for max_norm in (norm / 3, norm * 2):
        ours, _ = loop.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
        want, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(want), strict=True):
            assert a.dtype == b.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2.5e-7, atol=0)
        if max_norm > norm:
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(tree), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_allclose(float(optax.tree.norm(ours)), max_norm, rtol=1e-6)


def test_weight_decay_spares_biases_and_norms_as_the_official_trainer_does():
    """AdamW decays what transformers' Trainer decays (`get_decay_parameter_names`: every
    parameter but biases and norm weights), judged here by name on the 2.6 fixture model, with
    its decoder and vision stacks scanned ([L, D] biases and norm scales are not decayed) and
    with the decoder stack as per-layer arrays. The frozen-weight cast (`frozen_dtype`) follows
    the same rule: stacked norms and biases stay float32."""
    import re

    import jax.numpy as jnp
    from flax import nnx

    from minicpmv_jax.layers import LayerParts
    from minicpmv_jax.sharding import path_name
    from minicpmv_jax.train import loop

    model = small_model()
    _, params = nnx.split(model.module, nnx.Param)
    spared = re.compile(r"\.bias$|layernorm|layer_norm|(^|\.)ln_|(^|\.)norm\.")
    want = {path_name(p): not spared.search(path_name(p)) for p, _ in nnx.to_flat_state(params)}
    assert sum(want.values()) >= 20 and sum(not v for v in want.values()) >= 20

    for tree in (params, loop.split_trainable(params)):
        mask = loop._decay_mask(tree)
        got = {}
        for path, var in nnx.to_flat_state(mask):
            value = var.get_value() if hasattr(var, "get_value") else var
            if isinstance(value, LayerParts):  # every layer judged alike
                assert len(set(value.parts)) == 1, path_name(path)
                value = value.parts[0]
            got[path_name(path)] = bool(value)
        assert got == want

    trainer = loop.Trainer(
        model, [{"input_ids": [1]}], train.TrainConfig(mode="lora", frozen_dtype="bfloat16")
    )
    for path, var in nnx.to_flat_state(loop.stack_parts(trainer.frozen)):
        name, x = path_name(path), var.get_value()
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert (x.dtype == jnp.bfloat16) == want[name], (name, x.dtype)
