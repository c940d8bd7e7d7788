"""Sharding over a device mesh (8 simulated CPU devices): meshes, the rule table and its
fallbacks, sharded parity with one device (prompt logits and greedy tokens), parameter and KV
cache layouts, and the memory planner against real per-device shard sizes.

The tiny 2.6 fixture (hidden 256, 4 heads, 2 KV heads, vocab 423) does not divide by 8 in
several places: exactly the cases the fallback rules exist for."""

from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
import pytest
from conftest import FIXTURES, load_case
from flax import nnx
from gen_helpers import TEST_BUCKETS, case_messages
from model_inputs import batch_from_case

from minicpmv_jax import sharding
from minicpmv_jax.config import MINICPM_V_2_6, MINICPM_V_4_5, MiniCPMVConfig
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.sharding import ShardingError, make_mesh

FOLDER = FIXTURES / "minicpm-v-2_6"
CKPT = FOLDER / "checkpoint"
CASE = FOLDER / "cases" / "single_100x90"
# fsdp alone, tensor alone, all three axes, the README's (1, 2, 4); no data-only mesh: the
# one-row request of `_run` is replicated over "data", so that would repeat one device's run
MESHES = [(1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]
# The README command runs two of the four meshes: (2, 2, 2) puts every axis to work and (1, 1, 8)
# is the one whose tensor axis does not divide the KV heads (replicated heads); the other two
# (fsdp alone over 8 devices, tensor over 4) run with the slow tests, as .ci/run does.
DEFAULT_MESHES = ((2, 2, 2), (1, 1, 8))
NEW_TOKENS = 6


def _config() -> MiniCPMVConfig:
    return MiniCPMVConfig.from_pretrained(CKPT, dtype="float32")


def _load(mesh=None):
    from minicpmv_jax.model import MiniCPMV

    model = MiniCPMV.from_pretrained(CKPT, dtype="float32", mesh=mesh, progress=False)
    model.configure_generation(buckets=TEST_BUCKETS)
    return model


def _run(model) -> dict:
    """Prompt logits of a fixture case, greedy tokens and the prefilled cache of one request."""
    data = load_case(CASE)
    logits = model.prompt_logits(batch_from_case(data, "2.6"))
    processed = model.processor(case_messages(data))
    tokens = model.generate(processed, max_new_tokens=NEW_TOKENS)
    gen = model.sampler
    prepared = gen.prepare([processed])
    _, _, s_len = gen.cache_len(max(prepared.lengths), NEW_TOKENS)
    with model._precision():
        _, cache = gen.prefill(prepared, s_len)
    return {"logits": logits, "tokens": np.asarray(tokens), "cache": cache}


@functools.cache
def _reference() -> dict:
    return _run(_load())


# ------------------------------------------------------------------------------------------------
# Mesh construction
# ------------------------------------------------------------------------------------------------


def test_make_mesh_shapes():
    assert jax.device_count() == 8
    assert dict(make_mesh(None).shape) == {"data": 1, "fsdp": 8, "tensor": 1}  # all devices
    assert dict(make_mesh("2,2,2").shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh("tensor=4").shape) == {"data": 1, "fsdp": 1, "tensor": 4}
    assert dict(make_mesh((2, -1, 1)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert make_mesh().devices.size == 1  # default: one device
    mesh = make_mesh((1, 2, 4))
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "shape, msg",
    [((4, 4, 1), "needs 16 devices"), ((2, 2), "3 entries"), ("pipe=2", "unknown mesh axis")],
)
def test_make_mesh_errors(shape, msg):
    with pytest.raises(ShardingError, match=msg):
        make_mesh(shape)


# ------------------------------------------------------------------------------------------------
# Rule table and fallbacks (no compilation involved)
# ------------------------------------------------------------------------------------------------


def test_rules_cover_every_parameter_cache_and_activation():
    """Every logical name used by a parameter, the cache or activations has a rule."""
    from minicpmv_jax.memory import param_inventory

    names = {n for *_, ns in param_inventory(_config()) for n in ns if n is not None}
    names |= set(sharding.CACHE_AXES) | set(sharding.ACT_AXES) | set(sharding.CACHE_VALID_AXES)
    assert names <= {n for n, _ in sharding.RULES}


def test_fallback_rules_on_fixture_sizes():
    cfg = _config()  # 4 heads, 2 KV heads, vocab 423, mlp 512
    r = dict(sharding.rules_for(cfg, (1, 1, 8)))
    assert r["vocab"] is None and r["kv_heads"] is None and r["q_heads"] is None
    assert r["mlp"] == "tensor" and r["embed"] == "fsdp"
    r = dict(sharding.rules_for(cfg, (2, 2, 2)))
    assert r["kv_heads"] == "tensor" and r["q_heads"] == "tensor" and r["vocab"] is None
    r = dict(sharding.rules_for(cfg, (1, 2, 4)))
    assert r["kv_heads"] is None and r["q_heads"] == "tensor"  # 4 KV heads need tensor | 2
    # real presets: 2.6 has 4 KV heads and 28 heads, vocab 151666 = 2 * 75833
    r = dict(sharding.rules_for(MINICPM_V_2_6, (1, 1, 8)))
    assert r["kv_heads"] is None and r["q_heads"] is None and r["vocab"] is None
    assert r["mlp"] == "tensor"
    r = dict(sharding.rules_for(MINICPM_V_4_5, (1, 1, 8)))
    assert r["kv_heads"] == "tensor" and r["q_heads"] == "tensor" and r["vocab"] is None


def test_strict_mode_fails_before_compilation():
    with pytest.raises(ShardingError, match="kv_heads") as e:
        sharding.rules_for(_config(), (1, 1, 8), strict=True)
    assert "vocab" in str(e.value)
    sharding.rules_for(MINICPM_V_4_5, (1, 4, 2), strict=True)  # divides: no error


def test_check_divisible_names_the_parameter():
    """Without the fallback (raw RULES) the abstract model is rejected with a clear message,
    before anything is placed or compiled."""
    from minicpmv_jax.model import MiniCPMVModule

    mesh = make_mesh((1, 1, 8))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        _, abstract = nnx.get_abstract_model(
            lambda: MiniCPMVModule(_config(), rngs=nnx.Rngs(0)), mesh
        )
    with pytest.raises(ShardingError, match=r"llm\.lm_head\.weight .*423 % 8"):
        sharding.check_divisible(abstract)


def test_batch_and_cache_specs():
    mesh = make_mesh((2, 2, 2))
    P = jax.sharding.PartitionSpec
    assert sharding.batch_sharding(mesh, (8, 16)).spec == P(("data", "fsdp"), None)
    assert sharding.batch_sharding(mesh, (2, 16)).spec == P("data", None)  # prefix fallback
    assert sharding.batch_sharding(mesh, (1, 16)).spec == P(None, None)
    cache = jax.eval_shape(lambda: KVCache.init(_config().llm, 4, 64))
    sh = sharding.cache_shardings(mesh, cache)
    assert sh.k.spec == P(None, ("data", "fsdp"), None, "tensor", None)
    assert sh.valid.spec == P(("data", "fsdp"), None)


def test_constrain_is_noop_without_mesh():
    x = np.ones((2, 3, 4), np.float32)
    assert sharding.constrain(x) is x


# ------------------------------------------------------------------------------------------------
# Sharded parity and layouts
# ------------------------------------------------------------------------------------------------


def _expected(mesh, cfg, var) -> jax.sharding.NamedSharding:
    names = sharding.logical_names(var)
    value = var.get_value()
    rules = sharding.rules_for(cfg, mesh)
    return sharding.named(mesh, names, value.shape, rules)


@pytest.mark.parametrize(
    "shape",
    [s if s in DEFAULT_MESHES else pytest.param(s, marks=pytest.mark.slow) for s in MESHES],
    ids=lambda s: "x".join(map(str, s)),
)
def test_mesh_matches_single_device(shape):
    ref = _reference()
    mesh = make_mesh(shape)
    model = _load(mesh)
    # parameters carry the shardings the (resolved) rules imply
    for path, var in nnx.to_flat_state(model.state):
        value = var.get_value()
        want = _expected(mesh, model.config, var)
        assert value.sharding.is_equivalent_to(want, value.ndim), (path, value.sharding)
    specs = sharding.describe(model.state)
    if shape == (1, 1, 8):  # vocab 423, 4 heads, 2 KV heads: replicated over tensor
        assert specs["llm.lm_head.weight"] == "P(None, 'fsdp')"  # [V, D]
        layer = "llm.model.layers."  # stacked: the leading layer axis is replicated
        assert specs[layer + "self_attn.k_proj.kernel"] == "P(None, 'fsdp', None)"
        assert specs[layer + "mlp.up_proj.kernel"] == "P(None, 'fsdp', 'tensor')"
    out = _run(model)
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    # the KV cache carries the rule layout (KV heads replicated where tensor does not divide 2)
    cache = out["cache"]
    want = sharding.cache_shardings(mesh, cache)
    for name in ("k", "v", "valid"):
        arr = getattr(cache, name)
        assert arr.sharding.is_equivalent_to(getattr(want, name), arr.ndim), (name, arr.sharding)
    if shape[2] > 2:  # 2 KV heads over tensor = 4 / 8: whole heads, replicated
        assert want.k.spec[3] is None
    elif shape[2] == 2:
        assert want.k.spec[3] == "tensor"


# ------------------------------------------------------------------------------------------------
# Memory planner vs real shard sizes
# ------------------------------------------------------------------------------------------------


def _per_device_bytes(arrays) -> dict:
    out: dict = {}
    for a in arrays:
        for s in a.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


def test_memory_plan_matches_real_shards():
    """Planner bytes == bytes of the shards each device really holds (loaded model, real cache)."""
    from minicpmv_jax.memory import plan
    from minicpmv_jax.model import MiniCPMV

    cfg = _config()
    mesh = make_mesh((1, 2, 4))
    model = MiniCPMV.from_pretrained(
        CKPT, dtype="float32", mesh=mesh, progress=False, load_processor=False
    )
    params = _per_device_bytes(x.get_value() for _, x in nnx.to_flat_state(model.state))
    batch, slots = 4, 96
    cache = KVCache.init(cfg.llm, batch, slots, cfg.llm.dtype)
    cache = jax.device_put(cache, sharding.cache_shardings(mesh, cache))
    kv = _per_device_bytes([cache.k, cache.v, cache.valid])
    p = plan(cfg, mesh, batch=batch, cache_len=slots)
    assert p.params == max(params.values())
    assert p.kv_cache == max(kv.values())
    # another mesh, checked against jax's own shard shapes of the abstract model
    mesh = make_mesh((2, 2, 2))
    _, abstract = MiniCPMV.abstract_module(cfg, mesh)
    want = sum(
        int(np.prod(v.sharding.shard_shape(v.shape))) * v.dtype.itemsize
        for v in (var.get_value() for _, var in nnx.to_flat_state(abstract))
    )
    assert plan(cfg, mesh).params == want
    # int8 weights: the planner counts int8 kernels + float32 scales, as loaded
    q8 = MiniCPMV.from_pretrained(
        CKPT, dtype="float32", mesh=make_mesh((1, 2, 4)), quant="int8", progress=False,
        load_processor=False,
    )  # fmt: skip
    q8_bytes = _per_device_bytes(x.get_value() for _, x in nnx.to_flat_state(q8.state))
    assert plan(cfg, (1, 2, 4), quant="int8").params == max(q8_bytes.values())
    assert plan(cfg, (1, 2, 4), quant="int8").params < plan(cfg, (1, 2, 4)).params
    # activations shrink with the batch split over data x fsdp
    assert (
        plan(cfg, mesh, batch=4, cache_len=slots).activations
        < plan(cfg, (1, 1, 1), batch=4, cache_len=slots).activations
    )


def test_memory_plan_presets():
    from minicpmv_jax.memory import GiB, plan

    one = plan(MINICPM_V_2_6, (1, 1, 1), batch=1, cache_len=4096)
    # 2.6: about 8.1 B parameters in bfloat16
    assert 7.9e9 * 2 < one.params < 8.3e9 * 2
    # KV cache: 28 layers x 2 x 4 KV heads x 128 x 4096 slots x 2 bytes (+ the valid mask)
    assert one.kv_cache == 28 * 2 * 4 * 128 * 4096 * 2 + 4096
    eight = plan(MINICPM_V_2_6, (1, 2, 4), batch=1, cache_len=4096)
    assert eight.params < one.params / 4  # vocab replicated over tensor, the rest split 8 ways
    assert plan(MINICPM_V_4_5, (1, 1, 8)).fits(16 * GiB)


@pytest.mark.parametrize("mesh", [None, (1, 2), "1,2,4", 8])
def test_memory_plan_bad_mesh_is_a_clear_error(mesh):
    from minicpmv_jax.errors import MiniCPMVError
    from minicpmv_jax.memory import plan

    with pytest.raises(MiniCPMVError, match=r"mesh must be a Mesh.*\(data, fsdp, tensor\) tuple"):
        plan(MINICPM_V_2_6, mesh)


@pytest.mark.parametrize("argv", [[], ["--quant", "int8", "--single-device"]])
def test_readme_memory_tables_are_current(argv, capsys):
    """The README's memory tables are exactly what `python -m minicpmv_jax.memory` prints."""
    from minicpmv_jax import memory

    memory.main(argv)
    table = capsys.readouterr().out.strip()
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert table.count("\n") > 5
    assert table in readme, f"README table out of date: regenerate with {argv}"
