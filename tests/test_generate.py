"""Self-consistency, batching, compilation counts, bad input and memory of generation (2.6 tiny)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, load_case
from gen_helpers import TEST_BUCKETS, case_messages, load_model

from minicpmv_jax import batching
from minicpmv_jax import generate as gen
from minicpmv_jax.errors import MessageError, MiniCPMVError, PromptTooLongError
from minicpmv_jax.processor import ProcessorOutput

CASES = FIXTURES / "minicpm-v-2_6" / "cases"


@pytest.fixture(scope="module")
def model():
    return load_model("minicpm-v-2_6")


def _batch(model, name, **kw):
    return model.processor(case_messages(load_case(CASES / name)), **kw)


def test_prefill_decode_equals_full_forward(model):
    """Logits of every decode step = a full (no cache) forward pass over prompt + new tokens."""
    batch = _batch(model, "multi_image")
    out = model.generate(batch, max_new_tokens=12, return_dict=True, record_logits=True)
    new = out.sequences[0]
    t = len(batch["input_ids"])
    full = ProcessorOutput(dict(batch))
    full["input_ids"] = np.concatenate([batch["input_ids"], new[:-1]])
    full["attention_mask"] = np.ones(len(full["input_ids"]), bool)  # new tokens: always attended
    want = model.prompt_logits(full)[t - 1 :]  # [len(new), V]
    np.testing.assert_allclose(out.step_logits[0, : len(new)], want, rtol=0, atol=1e-4)


def test_prompt_positions_reproduce_the_id0_quirk():
    """generate() positions: cumsum(mask) - 1, masked positions 1 (2.6/4.5 mask = ids != 0)."""
    mask = np.array([True, True, False, True, True])
    np.testing.assert_array_equal(batching.prompt_positions(mask), [0, 1, 1, 2, 3])


def test_batch_equals_each_conversation_alone(model):
    """A list of conversations (text only, one image, two images) decodes as each one alone."""
    names = ["text_only", "single_448x448", "beam_default_multi_image"]
    batches = [_batch(model, n) for n in names]
    for kw in ({}, {"num_beams": 3, "repetition_penalty": 1.2}):
        together = model.generate(batches, max_new_tokens=10, **kw)
        for b, got in zip(batches, together, strict=True):
            np.testing.assert_array_equal(got, model.generate(b, max_new_tokens=10, **kw))


def test_chat_batch_equals_chat_alone(model):
    convs = [case_messages(load_case(CASES / n)) for n in ("text_only", "single_100x90")]
    together = model.chat(convs, sampling=False, num_beams=1, max_new_tokens=8)
    alone = [model.chat(c, sampling=False, num_beams=1, max_new_tokens=8) for c in convs]
    assert together == alone


def test_no_compilation_inside_existing_buckets(model):
    """After warm-up, other prompt lengths / image sizes / sampling values in the same buckets
    (token, slice and patch bucket, decode mode) compile nothing."""
    warm = [_batch(model, "single_448x448"), _batch(model, "text_only")]
    settings = gen.GenerationSettings(max_new_tokens=8, do_sample=True, top_k=3)
    for b in warm:
        model.generate(b, max_new_tokens=8)
        model.generate(b, max_new_tokens=8, sampling=True, temperature=0.7, top_p=0.8)
        list(model.sampler.stream([b], settings))
    before = dict(gen.TRACE_COUNTS)
    others = [_batch(model, "greedy_rep_penalty"), _batch(model, "single_100x90")]
    others.append(model.processor([{"role": "user", "content": "another question, longer " * 5}]))
    for b in others:
        assert len(b["input_ids"]) <= 256 and b["pixel_patches"].shape[0] <= 1
        model.generate(b, max_new_tokens=5, repetition_penalty=1.3)
        model.generate(b, max_new_tokens=20, sampling=True, temperature=1.3, top_k=5, seed=3)
        list(model.sampler.stream([b], dataclasses.replace(settings, max_new_tokens=4)))
    assert dict(gen.TRACE_COUNTS) == before
    assert model.last_stats.compiled == 0


def test_streaming_matches_blocking(model):
    msgs = case_messages(load_case(CASES / "single_448x448"))
    kw = {"sampling": False, "num_beams": 1, "max_new_tokens": 16}
    answer = model.chat(msgs, **kw)
    pieces = list(model.chat(msgs, stream=True, **kw))
    assert all(isinstance(p, str) and p for p in pieces)
    assert all(p.encode("utf-8").decode("utf-8") == p for p in pieces)
    assert "".join(pieces) == answer


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    msgs = case_messages(load_case(CASES / "single_448x448"))
    greedy = model.chat(msgs, sampling=False, num_beams=1, max_new_tokens=10)
    assert model.chat(msgs, top_k=1, max_new_tokens=10, seed=5) == greedy
    a = model.chat(msgs, max_new_tokens=10, seed=1, temperature=2.0, top_p=1.0, top_k=0)
    b = model.chat(msgs, max_new_tokens=10, seed=1, temperature=2.0, top_p=1.0, top_k=0)
    assert a == b


def test_sampling_without_seed_draws_fresh_randomness(model):
    """No seed: every call draws new randomness (12 tokens at temperature 2 over the whole
    vocabulary: three equal answers would have probability far below 1e-9)."""
    batch = _batch(model, "single_448x448")
    kw = {"sampling": True, "max_new_tokens": 12, "temperature": 2.0, "top_p": 1.0, "top_k": 0}
    unseeded = [tuple(model.generate(batch, **kw)) for _ in range(3)]
    assert len(set(unseeded)) > 1
    seeded = {tuple(model.generate(batch, seed=7, **kw)) for _ in range(2)}
    assert len(seeded) == 1


def test_min_new_tokens_delays_the_terminator(model):
    batch = _batch(model, "beam_default_single")  # greedy ends with a terminator at step 15
    ids = model.generate(batch, max_new_tokens=16, num_beams=3, repetition_penalty=1.2)
    assert ids[-1] in model.processor.terminators and len(ids) == 15
    ids = model.generate(
        batch, max_new_tokens=16, num_beams=3, repetition_penalty=1.2, min_new_tokens=16
    )
    assert len(ids) == 16 and not set(ids[:-1].tolist()) & set(model.processor.terminators)


# ---------------------------------------------------------------------------------- bad input


def test_prompt_longer_than_cache(model):
    small = model.configure_generation(dataclasses.replace(TEST_BUCKETS, max_cache_len=50))
    try:
        batch = _batch(model, "single_448x448")
        n = len(batch["input_ids"])
        with pytest.raises(PromptTooLongError, match=f"{n} tokens.*50"):
            model.generate(batch, max_new_tokens=4)
        short = model.processor([{"role": "user", "content": "hi"}])
        m = len(short["input_ids"])
        with pytest.raises(PromptTooLongError, match=f"{m} tokens.*max_new_tokens=100.*50"):
            model.generate(short, max_new_tokens=100)
        assert small is model.sampler
    finally:
        model.configure_generation(TEST_BUCKETS)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampling": True, "temperature": 0.0}, "temperature"),
        ({"sampling": True, "temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.2}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"num_beams": 0}, "num_beams"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer, got 2.5"),
        ({"max_new_tokens": "8"}, "max_new_tokens must be an integer"),
        ({"top_k": 2.0}, "top_k must be an integer"),
        ({"seed": 1.5}, r"seed must be an integer in \[0, 2\*\*32\) or None, got 1.5"),
        ({"seed": "7"}, "seed must be an integer"),
        ({"seed": -1}, "seed must be"),
        ({"sampling": True, "min_p": 1.5}, "min_p"),
        ({"sampling": True, "num_beams": 2}, "num_beams"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"do_what_i_mean": True}, "do_what_i_mean"),
        ({"stream": True, "sampling": False}, "num_beams"),
    ],
)
def test_invalid_generation_settings(model, kwargs, match):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(MiniCPMVError, match=match):
        out = model.chat(msgs, **kwargs)
        list(out)


@pytest.mark.parametrize(
    "msgs",
    [[], [[]], [{"role": "assistant", "content": "hi"}], [{"role": "user"}], "hello"],
    ids=["empty", "empty-batch-item", "assistant-first", "no-content", "string"],
)
def test_invalid_messages(model, msgs):
    with pytest.raises(MessageError):
        model.chat(msgs, sampling=False, max_new_tokens=2)


def test_images_where_none_are_allowed(model):
    img = CASES / "single_100x90" / "image_0.png"
    with pytest.raises(MessageError, match="system"):
        model.chat([{"role": "system", "content": [img]}, {"role": "user", "content": "hi"}])
    with pytest.raises(MessageError, match="4.5"):  # video groups are a 4.5 feature
        model.chat([{"role": "user", "content": [img, "hi"]}], temporal_ids=[[1]])


def test_empty_generate_batch(model):
    with pytest.raises(MiniCPMVError, match="empty"):
        model.generate([], max_new_tokens=2)


# ---------------------------------------------------------------------------------- memory


def test_memory_report_and_bf16_cache_halves_it(model):
    f32 = model.memory_report(batch=2, prompt_len=100, max_new_tokens=20, num_slices=1)
    cfg = model.config.llm
    s = 256 + 32  # token bucket + decode bucket
    assert f32["cache_len"] == s
    assert f32["kv_cache_bytes"] == 2 * cfg.num_layers * 2 * s * cfg.num_kv_heads * cfg.head_dim * 4
    for prog in ("prefill", "decode"):
        assert f32[prog]["argument_bytes"] is None or f32[prog]["argument_bytes"] > 0
    model.configure_generation(TEST_BUCKETS, cache_dtype=jnp.bfloat16)
    try:
        bf16 = model.memory_report(batch=2, prompt_len=100, max_new_tokens=20, num_slices=1)
        assert bf16["kv_cache_bytes"] * 2 == f32["kv_cache_bytes"]
        assert bf16["cache_dtype"] == "bfloat16"
        # a bf16 cache still decodes (greedy ids of a float32 model stay close)
        batch = _batch(model, "single_448x448")
        assert len(model.generate(batch, max_new_tokens=4)) == 4
    finally:
        model.configure_generation(TEST_BUCKETS)


def test_beam_search_reorders_the_cache_in_place(model):
    """The beam decode program reorders the B * N cache rows inside the donated buffer (its
    output aliases it) and copies only the generated slots: XLA plans temporaries of a fraction
    of the cache, where a per-step copy of the whole cache (the earlier program: 2.1x the B * N
    cache at this shape) needs more than the cache itself.

    A 4-layer 2.6 LLM with a small vocabulary at a 4000-token prompt, built abstractly (compiled,
    not run): there the cache, not the weights, dominates the program's memory.
    """
    from flax import nnx

    from minicpmv_jax.config import PRESETS

    base = PRESETS["2.6"].with_dtype("float32")
    llm = dataclasses.replace(base.llm, num_layers=4, vocab_size=4096)
    config = dataclasses.replace(base, llm=llm)
    graphdef, abstract = model.abstract_module(config)
    shapes = type(model)(config, nnx.merge(graphdef, abstract), model.processor)
    shapes.configure_generation(dataclasses.replace(TEST_BUCKETS, tokens=(4096,)))
    report = shapes.memory_report(batch=1, prompt_len=4000, max_new_tokens=30, num_beams=3)
    kv, decode = report["kv_cache_bytes"], report["decode"]
    assert decode["alias_bytes"] >= kv  # the work cache is updated in the donated buffer
    # Elsewhere than on CPU the layer scan slices one layer's weights out of the stacked
    # parameters per step, which a compiler may materialise as a temporary (one layer, not the
    # cache): not counted there. On CPU the decoder reads per-layer parts in place.
    layer = nnx.state(shapes.module.llm.model.layers, nnx.Param)
    layer_bytes = sum(x.size // x.shape[0] * x.dtype.itemsize for x in jax.tree.leaves(layer))
    if jax.default_backend() == "cpu":
        layer_bytes = 0
    assert decode["temp_bytes"] - layer_bytes < 0.5 * kv, (decode["temp_bytes"], layer_bytes, kv)


def _weight_slice_copies(sampler, shapes) -> tuple[list[str], int]:
    """(fusions of the compiled batch-1 greedy decode program that slice out a buffer of one of
    `shapes`, the program's temporary bytes)."""
    import re

    from minicpmv_jax.sampling import DecodeMode, SamplingParams

    sds, v = jax.ShapeDtypeStruct, sampler.llm_config.vocab_size
    args = (sds((1, v), jnp.float32), sds((1,), jnp.int32), sds((), jnp.int32))
    with sampler.context():
        compiled = sampler._decode_sample.lower(
            sampler.graphdef, sampler.state, sampler._abstract_cache(1, 64), *args,
            SamplingParams.create(), jax.random.key(0),
            mode=DecodeMode(), terminators=(0,), buffer=16, record_logits=False,
        ).compile()  # fmt: skip
    pattern = re.compile(r"%(\S*slice\S*) = f32\[([\d,]*)\]\S* fusion\(")
    copies = [
        m[1]
        for m in pattern.finditer(compiled.as_text())
        if tuple(int(d) for d in m[2].split(",") if d) in shapes
    ]
    return copies, compiled.memory_analysis().temp_size_in_bytes


def test_cpu_decoder_reads_layer_weights_in_place(model, monkeypatch):
    """CPU, float32: the sampler passes each decoder-stack parameter as its L layer slices,
    views of the stacked buffer (`generate.split_layers`), and the decoder runs as a loop over
    them. The compiled decode program then multiplies by the weights in place: scanned, XLA:CPU
    copied each layer's slice of every stacked kernel before its dot (a fusion per kernel, one
    layer's weights in the temporaries; 2.4x slower batch-1 steps at 2.6 width, BENCHMARKS.md).
    The tokens are those of the stacked weights (the parity tests run on the parts)."""
    from flax import nnx

    from minicpmv_jax.layers import LayerParts
    from minicpmv_jax.sharding import path_name

    sampler = model.sampler
    monkeypatch.setattr(gen, "split_layers", lambda state, *dtypes: (state, []))
    stacked = gen.Sampler(model, buckets=TEST_BUCKETS)
    whole = {path_name(p): v.get_value() for p, v in nnx.to_flat_state(model.state)}
    split = {path_name(p): v.get_value() for p, v in nnx.to_flat_state(sampler.state)}
    names = [n for n in whole if n.startswith(gen.SPLIT_STACKS)]
    if jax.default_backend() != "cpu":  # other compilers slice a stack in place
        assert not any(isinstance(split[n], LayerParts) for n in names)
        return
    num = model.config.llm.num_layers
    for n in names:
        x, parts = whole[n], split[n]
        assert isinstance(parts, LayerParts) and len(parts) == num, n
        for i, part in enumerate(parts.parts):  # a view: no copy, the model's memory unchanged
            assert part.unsafe_buffer_pointer() == x.unsafe_buffer_pointer() + i * part.nbytes
            np.testing.assert_array_equal(np.asarray(part), np.asarray(x[i]))
    kernels = {whole[n].shape[1:] for n in names if n.endswith(".kernel")}
    layer_bytes = sum(whole[n].nbytes // num for n in names)
    copies, temp = _weight_slice_copies(sampler, kernels)
    copies_stacked, temp_stacked = _weight_slice_copies(stacked, kernels)
    assert len(copies_stacked) >= len(kernels) and temp_stacked > layer_bytes  # can fail
    assert not copies, copies
    assert temp < 0.1 * layer_bytes, (temp, layer_bytes)
    batch = model.processor([{"role": "user", "content": "name three colours"}])
    settings = gen.GenerationSettings(max_new_tokens=4, min_new_tokens=4)
    got, want = sampler.run([batch], settings), stacked.run([batch], settings)
    np.testing.assert_array_equal(got.sequences[0], want.sequences[0])


def test_cpu_bf16_lm_head_tiles_read_in_place(monkeypatch):
    """CPU, bf16: `generate.split_head` gives the lm_head [V, D] as row tiles of
    `llm.SPLIT_TILE` weights plus the rest rows, views of its memory, and `Llm.logits` over the
    tiles equals the product of the whole weight: a float32 reference (x W^T of the bf16
    values) within the bf16 rounding of the result (2^-8 relative), and the whole (unsplit)
    weight's logits within one bf16 ulp."""
    from flax import nnx

    from minicpmv_jax import llm, sharding
    from minicpmv_jax.config import LlmConfig
    from minicpmv_jax.layers import LayerParts
    from minicpmv_jax.sharding import make_mesh

    cfg = LlmConfig(vocab_size=203, hidden_size=64, intermediate_size=96, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=32)  # fmt: skip
    with jax.set_mesh(make_mesh()), nnx.logical_axis_rules(sharding.RULES):
        module = llm.Llm(cfg, rngs=nnx.Rngs(0))
    monkeypatch.setattr(llm, "SPLIT_TILE", 50 * cfg.hidden_size)  # 4 tiles of 50 rows + 3 rows
    graphdef, state = nnx.split(module)
    split, sources = gen.split_head(state, tables=("lm_head.weight",))
    weight = module.lm_head.weight[...]
    h = jax.random.normal(jax.random.key(1), (2, 3, cfg.hidden_size), jnp.bfloat16)
    whole = np.asarray(jax.jit(lambda m, h: m.logits(h))(module, h))
    if jax.default_backend() != "cpu":  # other backends take the weight whole
        assert not sources
        return
    tiles = split["lm_head"]["weight"].get_value()
    assert sources == [weight] and isinstance(tiles, LayerParts)
    assert [t.shape[0] for t in tiles.parts] == [50, 50, 50, 50, 3]
    step = tiles.parts[0].nbytes
    for i, t in enumerate(tiles.parts):  # a view: no copy, the model's memory unchanged
        assert t.unsafe_buffer_pointer() == weight.unsafe_buffer_pointer() + i * step
    got = np.asarray(jax.jit(lambda s, h: nnx.merge(graphdef, s).logits(h))(split, h))
    want = np.asarray(h, np.float32) @ np.asarray(weight, np.float32).T
    assert got.shape == want.shape == (2, 3, cfg.vocab_size)
    np.testing.assert_allclose(got, want, rtol=2.0**-8, atol=1e-6)
    np.testing.assert_allclose(got, whole, rtol=2.0**-7, atol=0)


# generation on a mesh is in the default run through test_sharding.py's (2, 2, 2) mesh and
# test_cli.py's --mesh answer; this (2, 1, 4) batch-and-beam case runs with the slow tests
@pytest.mark.slow
def test_sharded_generation_matches_fixtures():
    """On a (data=2, fsdp=1, tensor=4) mesh a batch of two conversations decodes the official ids
    (greedy + repetition penalty and beam search): params, cache and batch are sharded."""
    from minicpmv_jax.model import MiniCPMV
    from minicpmv_jax.sharding import make_mesh

    mesh = make_mesh((2, 1, 4))
    sharded = MiniCPMV.from_pretrained(
        FIXTURES / "minicpm-v-2_6" / "checkpoint", dtype="float32", progress=False, mesh=mesh
    )
    sharded.configure_generation(TEST_BUCKETS)
    cases = [load_case(CASES / n) for n in ("greedy_rep_penalty", "beam_default_single")]
    batches = [sharded.processor(case_messages(c)) for c in cases]
    for c in cases:
        kw = c["case"]["chat_kwargs"]
        got = sharded.generate(
            batches, max_new_tokens=kw["max_new_tokens"], num_beams=kw["num_beams"],
            repetition_penalty=kw["repetition_penalty"],
        )  # fmt: skip
        row = cases.index(c)
        np.testing.assert_array_equal(got[row], c["llm"]["generated_ids"][0])


# With the slow tests (.ci/run): test_warmup_covers_streaming and
# test_no_compilation_inside_existing_buckets keep warm-up's "no compilation later" in the default
# suite.
@pytest.mark.slow
def test_warmup_compiles_what_requests_then_run(model):
    """After warmup() of their shapes, real requests (text, one and several images; greedy,
    sampling, beams; batches of 1 and 2) trace nothing, and their results are unchanged."""
    requests = [
        ([_batch(model, "text_only")], gen.GenerationSettings(max_new_tokens=6)),
        ([_batch(model, "single_448x448")], gen.GenerationSettings(max_new_tokens=6)),
        (
            [_batch(model, "multi_image"), _batch(model, "single_100x90")],
            gen.GenerationSettings(max_new_tokens=40, do_sample=True, top_p=0.8, seed=3),
        ),
        ([_batch(model, "single_448x448")], gen.GenerationSettings(max_new_tokens=5, num_beams=2)),
    ]
    with model._precision():
        want = [model.sampler.run(outs, s).sequences for outs, s in requests]
    # buckets no other test uses: these programs cannot be in jax's caches yet
    warm = gen.Sampler(model, buckets=gen.Buckets(tokens=(200, 1000), slices=(3, 12)))
    shapes = [gen.RequestShape.of(outs, s) for outs, s in requests]  # sizes only
    with model._precision():
        report = warm.warmup(shapes)
        # 3 prefills (text; one image; the 2-row batch) and 3 decodes (greedy and beam share the
        # text / image requests' 264-slot cache shape; sampling has the batch's)
        assert report["signatures"] == 4 and report["programs"] == 6
        before = sum(gen.TRACE_COUNTS.values())
        got = [warm.run(outs, s).sequences for outs, s in requests]
        assert sum(gen.TRACE_COUNTS.values()) == before
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            np.testing.assert_array_equal(a, b)


def test_warmup_covers_streaming(model):
    """A streamed request after warmup(RequestShape(stream=True)) compiles no XLA program at all
    (the per-token programs and every eager op), and streams the blocking answer's tokens."""
    import sys

    sys.path.insert(0, str(FIXTURES.parents[1]))
    from benchmarks.measure import CompileCounter

    CompileCounter.install()
    b = _batch(model, "single_100x90")
    settings = gen.GenerationSettings(max_new_tokens=30, do_sample=True, top_k=4, seed=5)
    warm = gen.Sampler(model, buckets=gen.Buckets(tokens=(176,), slices=(5,)))
    shape = gen.RequestShape.of([b], settings, stream=True)
    assert (shape.prompt_tokens, shape.slices, shape.stream) == (len(b["input_ids"]), 1, True)
    with model._precision():
        assert warm.warmup([shape])["programs"] == 3  # prefill, first token, next token
        c0 = CompileCounter.count()
        streamed = np.concatenate(list(warm.stream([b], settings)))
        assert CompileCounter.count() == c0
        blocking = warm.run([b], settings).sequences[0]
    np.testing.assert_array_equal(streamed[: len(blocking)], blocking)


def test_warmup_rejects_bad_shapes(model):
    with pytest.raises(MiniCPMVError, match="slices"):
        gen.RequestShape(slices=-1)
    with pytest.raises(MiniCPMVError, match="RequestShape"):
        model.warmup([{"prompt_tokens": 10}])
    with pytest.raises(MiniCPMVError, match="num_beams"):
        gen.RequestShape(num_beams=2, stream=True)
    with pytest.raises(PromptTooLongError):
        model.warmup([gen.RequestShape(prompt_tokens=10**6)])


def test_cpu_sampler_returns_compiler_memory_after_each_compilation(model, monkeypatch):
    """On the CPU backend a Sampler registers the listener that hands the heap's free memory
    back to the OS (glibc malloc_trim) after each XLA compilation: a fresh compilation calls it
    once, with pad 0; running a compiled program does not."""
    if jax.default_backend() != "cpu" or gen._malloc_trim() is None:
        pytest.skip("CPU backend with glibc only")
    gen.Sampler(model)
    assert gen.trim_after_compiles() and gen._trim_registered
    calls = []
    monkeypatch.setattr(gen, "_malloc_trim", lambda: calls.append)
    f = jax.jit(lambda x: x * 3.0 + 1.0)
    x = np.arange(13.0, dtype=np.float32)  # a shape no other test compiles this function for
    f(x).block_until_ready()
    assert calls == [0]
    f(x).block_until_ready()
    assert calls == [0]
