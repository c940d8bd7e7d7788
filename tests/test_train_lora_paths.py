"""LoRA on the layer input path (dropout, int8 base), frozen weights in bfloat16.

LoraLinear against a numpy computation with the same mask; its expectation over masks against
the undropped branch; the input path against the weight delta on the fixture batch (1e-5) and
over two train steps (1e-5); on CPU the step reads the frozen decoder layers in place (no
weight copies; the stacked step's loss); the train step with dropout reproducible for a seed; QLoRA-style training on the int8 base (loss near
the float base's, it learns, the adapter exports in PEFT's layout); frozen bfloat16 storage.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from test_train_loop import VERSION, qa_examples, small_model
from train_helpers import batch_rows, load_train_model, train_checkpoint

from minicpmv_jax import MiniCPMV, MiniCPMVProcessor, train
from minicpmv_jax.errors import MiniCPMVError
from minicpmv_jax.train import lora as L
from minicpmv_jax.train.loss import device_arrays, prepare_batch, train_logits


def test_lora_linear_matches_numpy_with_its_mask():
    """One forward with rate 0.3: base + s * (x * keep / 0.7) A^T B^T, the mask being the
    bernoulli draw of the layer's key; the mean over 4000 masks is the undropped branch."""
    rng = np.random.default_rng(0)
    d_in, d_out, r, s, p = 6, 5, 3, 2.5, 0.3
    base = nnx.Linear(d_in, d_out, rngs=nnx.Rngs(0))
    a = rng.normal(size=(r, d_in)).astype(np.float32)
    b = rng.normal(size=(d_out, r)).astype(np.float32)
    x = rng.normal(size=(2, 4, d_in)).astype(np.float32)
    key = jax.random.key(7)

    def forward(key_data, rate):
        layer = L.LoraLinear(
            base, jnp.asarray(a), jnp.asarray(b), jnp.float32(1), key_data, rate=rate, scaling=s
        )
        return layer(jnp.asarray(x))

    got = np.asarray(forward(jax.random.key_data(key), p))
    keep = np.asarray(jax.random.bernoulli(key, 1 - p, x.shape))
    w, bias = np.asarray(base.kernel[...]), np.asarray(base.bias[...])
    want = x @ w + bias + s * ((x * keep / (1 - p)) @ a.T) @ b.T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert 0 < (~keep).sum() < keep.size  # the mask drops some inputs, not all

    keys = jax.random.key_data(jax.random.split(jax.random.key(1), 4000))
    mean = np.asarray(jax.jit(jax.vmap(lambda k: forward(k, p)))(keys)).mean(0)
    undropped = np.asarray(forward(jax.random.key_data(key), 0.0))
    # per-element std of one sample is ~ s*|branch| * sqrt(p/(1-p)); 4000 samples: / 63
    np.testing.assert_allclose(mean, undropped, atol=0.25)
    np.testing.assert_allclose(undropped, x @ w + bias + s * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", [False, True], ids=["attention", "attention+lm_head"])
def test_input_path_equals_weight_delta(head):
    """rate 0: the LoraLinear graph gives the weight-delta logits on the fixture batch (1e-5);
    also with the lm_head (a torch-layout weight [V, D]) as a target, whose delta is s * B A
    (numpy)."""
    model = load_train_model(VERSION)
    prepared = prepare_batch(model, train.collate(batch_rows(VERSION, model)))
    arrays, num_groups = device_arrays(prepared), prepared["num_groups"]
    target = f"(?:{L.DEFAULT_TARGET})|llm\\.lm_head" if head else L.DEFAULT_TARGET
    cfg = L.LoraConfig(r=4, alpha=8, target_modules=target)
    state, graphdef = model.state, model.graphdef
    targets = L.lora_targets(state, cfg)
    assert ("llm.lm_head" in {t.name for t in targets}) == head
    lora = L.init_lora(state, cfg, seed=1)
    for i, ab in enumerate(lora.values()):  # a trained-looking B (fresh LoRA has B = 0)
        ab["B"] = 0.1 * jax.random.normal(jax.random.key(i), ab["B"].shape)
    if head:
        w = np.asarray(state["llm"]["lm_head"]["weight"].get_value())  # [V, D]
        ab = lora["llm.lm_head"]
        assert ab["A"].shape == (4, w.shape[1]) and ab["B"].shape == (w.shape[0], 4)
        merged = L.apply_lora(state, targets, lora, cfg.scaling)
        got = np.asarray(merged["llm"]["lm_head"]["weight"].get_value())
        want = w + cfg.scaling * np.asarray(ab["B"]) @ np.asarray(ab["A"])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    groups = L.lora_groups(targets, state)
    graph = L.lora_graph(graphdef, [state], groups, cfg.r, rate=0.0, scaling=cfg.scaling)

    @jax.jit
    def both(state, lora):
        delta = nnx.merge(graphdef, L.apply_lora(state, targets, lora, cfg.scaling))
        wrapped = L.lora_module(graph, [state], groups, lora)
        return train_logits(delta, arrays, num_groups), train_logits(wrapped, arrays, num_groups)

    want, got = both(state, lora)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def run_steps(model, steps=2, **kw):
    """A LoRA run (r 4 on the LLM's q/k/v only) on the four QA samples; (trainer, metrics)."""
    lora = {"r": 4, "alpha": 8, "modules_to_save": (), **kw.pop("lora", {})}
    cfg = train.TrainConfig(
        mode=kw.pop("mode", "lora"),
        steps=steps,
        learning_rate=kw.pop("learning_rate", 1e-2),
        batch_size=4,
        token_buckets=(128,),
        lora=train.LoraConfig(**lora),
        **kw,
    )
    trainer = train.Trainer(model, qa_examples(model), cfg)
    return trainer, trainer.run(progress=False)


@functools.cache
def plain_run():
    """The float base, no dropout (LoRA on the input path, the default): the reference of the
    runs below (compiled once)."""
    return run_steps(small_model())


# three optimizer steps of both LoRA paths run with the slow tests; one step's equality
# (test_input_path_equals_weight_delta) stays in the default run
@pytest.mark.slow
def test_weight_delta_steps_equal_input_path():
    """TrainConfig(lora_path="delta") (the step differentiates W + s (B A)^T) gives the default
    input path's losses and gradient norms over two steps (1e-5 relative); it refuses dropout."""
    _, delta = run_steps(small_model(), lora_path="delta")
    _, plain = plain_run()
    for a, b in zip(delta, plain, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    with pytest.raises(MiniCPMVError, match="dropout 0.05"):
        run_steps(small_model(), lora_path="delta", lora={"dropout": 0.05})
    with pytest.raises(MiniCPMVError, match="lora_path"):
        train.TrainConfig(lora_path="merged")


# Runs with the slow tests (two compiled steps and their text, 20 s); every default-run LoRA step
# on the CPU takes the frozen per-layer views (train.loop.SPLIT_FROZEN_LAYERS is the default).
@pytest.mark.slow
def test_cpu_step_reads_frozen_decoder_layers_in_place(monkeypatch):
    """CPU, float32 base: the train step gets the frozen decoder stack as per-layer arrays
    (layers.LayerParts) and its compiled program makes no dynamic-slice copy of a decoder layer
    weight (the stacked, scanned step makes one per weight); the first step's loss and gradient
    norm equal the stacked step's (1e-6 relative), and so do those of the unrolled layers
    rematerialised (remat "full")."""
    import re

    from minicpmv_jax.layers import LayerParts
    from minicpmv_jax.sharding import path_name
    from minicpmv_jax.train import loop

    trainer, plain = plain_run()
    is_parts = lambda x: isinstance(x, LayerParts)
    parts = [x for x in jax.tree.leaves(trainer.frozen, is_leaf=is_parts) if is_parts(x)]
    stack = [
        v.get_value()
        for p, v in nnx.to_flat_state(trainer.frozen_as_loaded)
        if path_name(p).startswith("llm.model.layers.")
    ]
    assert len(parts) == len(stack) > 0
    arrays, groups = trainer._device_batch(trainer.micro_batch(0))
    args = (trainer.state, trainer.frozen, trainer.loaded, arrays)
    with trainer.model._precision():  # the program plain_run() ran: the compilation cache has it
        hlo = trainer._step.lower(*args, num_groups=groups).compile().as_text()
    copies = set(re.findall(r"%\S*dynamic-slice\S* = f32\[([\d,]*)\]", hlo))
    layer_shapes = {",".join(map(str, x.shape[1:])) for x in stack if x.ndim >= 3}
    assert layer_shapes and not copies & layer_shapes, copies & layer_shapes

    monkeypatch.setattr(loop, "SPLIT_FROZEN_LAYERS", False)
    stacked_trainer, stacked = run_steps(small_model(), steps=1)
    assert not any(is_parts(x) for x in jax.tree.leaves(stacked_trainer.frozen, is_leaf=is_parts))
    np.testing.assert_allclose(stacked[0]["loss"], plain[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(stacked[0]["grad_norm"], plain[0]["grad_norm"], rtol=1e-6)
    monkeypatch.setattr(loop, "SPLIT_FROZEN_LAYERS", True)
    _, remat = run_steps(small_model(), steps=1, remat="full")
    np.testing.assert_allclose(remat[0]["loss"], plain[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(remat[0]["grad_norm"], plain[0]["grad_norm"], rtol=1e-6)


def test_dropout_steps_are_reproducible():
    """dropout 0.5: the same seed gives the same losses and gradient norms; the first loss is
    the undropped one (B = 0 makes the branch zero) while its gradient differs; eval (no
    dropout) of the trained adapter equals the weight-delta forward of the same adapter."""
    model = small_model()
    _, a = run_steps(model, lora={"dropout": 0.5})
    _, b = run_steps(model, lora={"dropout": 0.5})
    _, plain = plain_run()
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]
    np.testing.assert_allclose(a[0]["loss"], plain[0]["loss"], rtol=1e-6)
    assert abs(a[0]["grad_norm"] - plain[0]["grad_norm"]) > 1e-2 * plain[0]["grad_norm"]
    assert abs(a[1]["loss"] - plain[1]["loss"]) > 1e-5


@functools.cache
def int8_model():
    folder = train_checkpoint(VERSION)
    model = MiniCPMV.from_pretrained(folder, dtype="float32", quant="int8", progress=False)
    model.processor = MiniCPMVProcessor.from_pretrained(
        folder, scale_resolution=112, max_slice_nums=1, patch_buckets=(64,)
    )
    return model


def test_qlora_trains_on_int8_base_and_exports(tmp_path):
    """LoRA on the int8 base: frozen int8 kernels, float32 adapters; the first loss is within
    2% of the float base's, 10 steps take it below 65% of its start, and the adapter is written
    in PEFT's layout (the float run's tensor names and shapes, the trained B)."""
    model = int8_model()
    trainer, history = run_steps(model, steps=10, learning_rate=5e-2, weight_decay=0.0)
    kernels = dict(nnx.to_flat_state(trainer.frozen))
    q = kernels[("llm", "model", "layers", "self_attn", "q_proj", "kernel")].get_value()
    assert q.dtype == jnp.int8
    assert {x.dtype for x in jax.tree.leaves(trainer.state["lora"])} == {jnp.dtype("float32")}
    float_trainer, float_run = plain_run()
    np.testing.assert_allclose(history[0]["loss"], float_run[0]["loss"], rtol=2e-2)
    losses = [r["loss"] for r in history]
    assert losses[-1] < 0.65 * losses[0], losses
    # eval on the input path without dropout (int8 kernels take no weight delta): the four
    # trained samples after one more update score at most about the last training loss
    trainer.eval_examples = trainer.examples
    assert 0 < trainer.eval_loss() < 1.05 * losses[-1]
    trained = trainer.trained_model()
    got_dir = train.export_adapter(trained, tmp_path / "q")
    got = load_file(str(got_dir / "adapter_model.safetensors"))
    want_dir = train.export_adapter(float_trainer.trained_model(), tmp_path / "f")
    want = load_file(str(want_dir / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    name = "base_model.model.llm.model.layers.1.self_attn.v_proj.lora_B.weight"
    b = trainer.state["lora"]["llm.model.layers.1.self_attn.v_proj"]["B"]
    np.testing.assert_array_equal(got[name], np.asarray(b))
    assert np.abs(got[name]).max() > 0
    with pytest.raises(MiniCPMVError, match="int8"):
        run_steps(model, mode="full")


def test_frozen_bfloat16():
    """frozen_dtype bfloat16: frozen matrices stored bf16, trainable weights and AdamW moments
    float32; the first loss within 1e-2 of the float32 run's."""
    trainer, history = run_steps(small_model(), frozen_dtype="bfloat16")
    from minicpmv_jax.train.loop import layer_ndim

    frozen = jax.tree_util.tree_leaves_with_path(trainer.frozen)  # [L, D] stacked vectors stay
    assert {x.dtype for p, x in frozen if layer_ndim(p, x) >= 2} == {jnp.dtype("bfloat16")}
    assert {x.dtype for p, x in frozen if layer_ndim(p, x) < 2} == {jnp.dtype("float32")}
    trained = jax.tree.leaves((trainer.state["params"], trainer.state["opt"]))
    assert {x.dtype for x in trained if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype("float32")
    }
    np.testing.assert_allclose(history[0]["loss"], plain_run()[1][0]["loss"], rtol=1e-2)


def test_peft_adapter_onto_int8_base():
    """from_pretrained(quant="int8", adapter=...): the adapter is merged by dequantizing,
    adding and quantizing again; the batch logits are the fixture's float LoRA logits within the
    int8 base's own quantization error (x1.5), the adapter moving them 10x further."""
    from train_helpers import fixture_logits, train_dir

    folder = train_checkpoint(VERSION)
    kw = {"dtype": "float32", "quant": "int8", "progress": False}
    adapter = train_dir(VERSION) / "batch" / "lora" / "adapter"
    merged = MiniCPMV.from_pretrained(folder, adapter=adapter, **kw)
    base = MiniCPMV.from_pretrained(folder, **kw)
    batch = train.collate(batch_rows(VERSION, base))
    want = fixture_logits(VERSION, "lora/logits.npz")
    float_base = fixture_logits(VERSION, "full/logits.npz")
    quant_error = np.abs(train.forward_logits(base, batch) - float_base).max()
    error = np.abs(train.forward_logits(merged, batch) - want).max()
    shift = np.abs(want - float_base).max()
    assert error < 1.5 * quant_error and error < 0.15 * shift, (error, quant_error, shift)


def test_lora_on_decoder_mlp_in_torch_layout():
    """LoRA on gate / up / down_proj stored [out, in] (`LlmConfig.out_in`, a bf16 model's
    layout on CPU): the same targets and A / B shapes as in the [in, out] layout, merged weights
    equal to the [in, out] ones transposed, and the LoraLinear graph's logits equal to the
    weight-delta logits of both layouts (float32, 1e-5)."""
    from minicpmv_jax.model import CPU_BF16_OUT_IN

    folder = train_checkpoint(VERSION)
    kernel = load_train_model(VERSION)
    weight = MiniCPMV.from_pretrained(
        folder, dtype="float32", progress=False, out_in=CPU_BF16_OUT_IN
    )
    prepared = prepare_batch(weight, train.collate(batch_rows(VERSION, weight)))
    arrays, num_groups = device_arrays(prepared), prepared["num_groups"]
    cfg = L.LoraConfig(r=4, alpha=8, target_modules=("q_proj", *CPU_BF16_OUT_IN))
    lora, merged, logits = {}, {}, {}
    for layout, model in (("kernel", kernel), ("weight", weight)):
        state, graphdef = model.state, model.graphdef
        targets = L.lora_targets(state, cfg)
        mlp = [t for t in targets if t.name.endswith(CPU_BF16_OUT_IN)]
        assert len(mlp) == 3 * model.config.llm.num_layers
        assert {t.path[-1] for t in mlp} == {layout}
        if not lora:
            lora = L.init_lora(state, cfg, seed=1)
            for i, ab in enumerate(lora.values()):  # a trained-looking B (fresh LoRA: B = 0)
                ab["B"] = 0.1 * jax.random.normal(jax.random.key(i), ab["B"].shape)
        else:  # the same A / B shapes in both layouts
            assert jax.tree.map(jnp.shape, L.init_lora(state, cfg)) == jax.tree.map(jnp.shape, lora)
        merged[layout] = L.apply_lora(state, targets, lora, cfg.scaling)
        groups = L.lora_groups(targets, state)
        graph = L.lora_graph(graphdef, [state], groups, cfg.r, rate=0.0, scaling=cfg.scaling)

        @jax.jit
        def both(state, lora, graphdef=graphdef, targets=targets, groups=groups, graph=graph):
            delta = nnx.merge(graphdef, L.apply_lora(state, targets, lora, cfg.scaling))
            wrapped = L.lora_module(graph, [state], groups, lora)
            return (train_logits(delta, arrays, num_groups),
                    train_logits(wrapped, arrays, num_groups))  # fmt: skip

        want, got = both(state, lora)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        logits[layout] = np.asarray(want)
    np.testing.assert_allclose(logits["weight"], logits["kernel"], atol=1e-5)
    for name in CPU_BF16_OUT_IN:
        k = merged["kernel"]["llm"]["model"]["layers"]["mlp"][name]["kernel"].get_value()
        w = merged["weight"]["llm"]["model"]["layers"]["mlp"][name]["weight"].get_value()
        np.testing.assert_array_equal(np.asarray(w), np.swapaxes(np.asarray(k), 1, 2))
