"""Attention kernels (minicpmv_jax/kernels.py) against the plain jnp reference attention.

The splash kernel runs in Pallas interpret mode here (CPU); on TPU the same test runs it
compiled. cuDNN is exercised only where a GPU is present.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpmv_jax import kernels


def _qkv(b, t, s, n, k, h, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
    key = jax.random.normal(kk, (b, s, k, h), jnp.float32).astype(dtype)
    val = jax.random.normal(kv, (b, s, k, h), jnp.float32).astype(dtype)
    return q, key, val


def _prefill_mask(valid: np.ndarray, t: int) -> jnp.ndarray:
    """KVCache.mask(start=0, T): bool [B, 1, T, S] = valid & causal."""
    s = valid.shape[1]
    causal = np.arange(s)[None, :] <= np.arange(t)[:, None]
    return jnp.asarray(valid[:, None, :] & causal[None])[:, None]


def _valid(b, s, t, seed=0):
    rng = np.random.default_rng(seed)
    valid = np.zeros((b, s), bool)
    for r in range(b):
        n = int(rng.integers(t // 2, t + 1))  # right padding, as prepare_batch lays prompts out
        valid[r, :n] = True
        valid[r, 1 + rng.integers(n - 1, size=2)] = False  # masked id-0 tokens (2.6 / 4.5 quirk)
    return valid


def _plain(q, k, v, mask):
    """Independent yardstick: repeat kv heads, dense softmax in float64 numpy."""
    q, k, v, m = (np.asarray(x, np.float64) for x in (q, k, v, mask))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    m = np.broadcast_to(m, s.shape).astype(bool)
    s = np.where(m, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_reference_matches_plain_numpy(kv_heads):
    q, k, v = _qkv(2, 16, 24, 4, kv_heads, 32, jnp.float32)
    mask = _prefill_mask(_valid(2, 24, 16), 16)
    got = kernels.attention(q, k, v, mask, impl="reference")
    np.testing.assert_allclose(np.asarray(got), _plain(q, k, v, mask), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_xla_matches_reference(dtype, tol):
    q, k, v = _qkv(2, 16, 24, 8, 2, 64, dtype)
    mask = _prefill_mask(_valid(2, 24, 16), 16)
    with jax.default_matmul_precision("highest"):
        got = kernels.attention(q, k, v, mask, impl="xla")
        want = kernels.attention(q, k, v, mask, impl="reference")
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol
    )


def test_reference_decode_step_with_cache_mask():
    """One query against a partly filled cache (decode): reference == xla."""
    q, k, v = _qkv(3, 1, 40, 4, 2, 32, jnp.float32, seed=1)
    valid = np.zeros((3, 40), bool)
    valid[:, :21] = True
    valid[1, 5] = False
    mask = jnp.asarray(valid)[:, None, None, :]
    got = kernels.attention(q, k, v, mask, impl="splash")  # T = 1: falls back to xla
    np.testing.assert_allclose(np.asarray(got), _plain(q, k, v, mask), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "t,s,kv_heads",
    [(128, 192, 1), (100, 164, 2)],  # S = T + 64 (prompt bucket + decode bucket); unaligned T
)
def test_splash_interpret_matches_reference(t, s, kv_heads):
    b, n, h = 2, 2, 128
    q, k, v = _qkv(b, t, s, n, kv_heads, h, jnp.float32, seed=t)
    valid = np.zeros((b, s), bool)
    valid[:, :t] = _valid(b, t, t, seed=s)
    mask = _prefill_mask(valid, t)
    got = kernels.attention(q, k, v, mask, impl="splash")
    want = kernels.attention(q, k, v, mask, impl="reference")
    rows = np.asarray(mask).any(-1)[:, 0]  # [B, T]: queries with at least one key
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-4, rtol=1e-4)


def test_unknown_impl_raises():
    q, k, v = _qkv(1, 2, 2, 2, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="unknown attention"):
        kernels.attention(q, k, v, jnp.ones((1, 1, 2, 2), bool), impl="flash3")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_reference():
    q, k, v = _qkv(2, 128, 128, 8, 2, 128, jnp.bfloat16)
    mask = _prefill_mask(_valid(2, 128, 128), 128)
    got = kernels.attention(q, k, v, mask, impl="cudnn")
    want = kernels.attention(q, k, v, mask, impl="reference")
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2
    )


def test_model_prompt_logits_with_splash_match_xla():
    """from_pretrained(attn_impl="splash") on a (1, 2, 2) mesh (splash under shard_map, heads
    split over tensor) gives the prompt logits of the default XLA path on one device."""
    from conftest import FIXTURES

    from minicpmv_jax.model import MiniCPMV
    from minicpmv_jax.sharding import make_mesh

    ckpt = FIXTURES / "minicpm-v-2_6" / "checkpoint"
    xla = MiniCPMV.from_pretrained(ckpt, dtype="float32", progress=False)
    splash = MiniCPMV.from_pretrained(
        ckpt, dtype="float32", progress=False, attn_impl="splash", mesh=make_mesh((1, 2, 2))
    )
    assert (xla.config.llm.attn_impl, splash.config.llm.attn_impl) == ("xla", "splash")
    batch = xla.processor([{"role": "user", "content": "Tell me a story about a tiny robot."}])
    np.testing.assert_allclose(splash.prompt_logits(batch), xla.prompt_logits(batch), atol=1e-4)


def test_unknown_attn_impl_is_refused_before_loading(tmp_path):
    from minicpmv_jax.errors import MiniCPMVError
    from minicpmv_jax.model import MiniCPMV

    with pytest.raises(MiniCPMVError, match="attn_impl 'flash3' is not one of"):
        MiniCPMV.from_pretrained(tmp_path / "missing", attn_impl="flash3")


@pytest.mark.parametrize("out_in", ["down_proj", ("mlp",)])
def test_bad_out_in_is_refused_before_loading(tmp_path, out_in):
    from minicpmv_jax.errors import MiniCPMVError
    from minicpmv_jax.model import MiniCPMV

    with pytest.raises(MiniCPMVError, match="out_in .*expected a tuple of names from"):
        MiniCPMV.from_pretrained(tmp_path / "missing", out_in=out_in)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 1, 8)], ids=["2x2x2", "1x1x8"])
def test_splash_under_a_mesh_matches_xla(mesh_shape):
    """On a device mesh splash runs under shard_map (rows over data x fsdp, heads over tensor;
    on tensor=8 the 4 query / 2 kv heads do not divide and stay whole) and equals the XLA path."""
    from minicpmv_jax.sharding import make_mesh

    b, t, s, n, kv_heads, h = 4, 100, 164, 4, 2, 128
    q, k, v = _qkv(b, t, s, n, kv_heads, h, jnp.float32, seed=3)
    valid = np.zeros((b, s), bool)
    valid[:, :t] = _valid(b, t, t, seed=4)
    mask = _prefill_mask(valid, t)
    splash = jax.jit(lambda *a: kernels.attention(*a, impl="splash"))
    xla = jax.jit(lambda *a: kernels.attention(*a, impl="xla"))
    with jax.set_mesh(make_mesh(mesh_shape)), jax.default_matmul_precision("highest"):
        assert "shard_map" in str(jax.make_jaxpr(splash)(q, k, v, mask))
        got, want = splash(q, k, v, mask), xla(q, k, v, mask)
    rows = np.asarray(mask).any(-1)[:, 0]  # [B, T]: queries with at least one key
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-4, rtol=1e-4)


def test_cpu_bf16_dense_takes_a_float32_result():
    """On the CPU backend a bf16 dense layer multiplies with a float32 result (the form XLA:CPU
    runs on its fast bf16 kernels, see benchmarks/cpu_dot.py) and rounds it back to bf16: the
    float32 product of the same bf16 values, rounded once (1 bf16 ulp), never a bf16 accumulator."""
    import jax.numpy as jnp
    from flax import nnx

    from minicpmv_jax.layers import cpu_aware_dot

    # what layers.dense builds (without the logical-axis annotations)
    layer = nnx.Linear(96, 80, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                       dot_general=cpu_aware_dot, rngs=nnx.Rngs(0))  # fmt: skip
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 96)), jnp.bfloat16)
    y = layer(x)
    ref = np.asarray(x, np.float32) @ np.asarray(layer.kernel[...], np.float32)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2**-8, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(layer)(x))
    on_cpu = jax.default_backend() == "cpu"
    assert ("preferred_element_type=float32" in jaxpr) == on_cpu, jaxpr


@pytest.mark.parametrize(("t", "kv_heads"), [(16, 2), (1, 2), (16, 8)])
def test_cpu_bf16_attention_takes_float32_results(t, kv_heads):
    """bf16 attention of several queries through `layers.attend` on the CPU backend takes both
    products with a float32 result (XLA:CPU's fast bf16 form) and otherwise does what jax's
    "xla" attention does (one query: it is jax's): against the float64 attention of the same bf16 values it is off by the bf16 roundings
    of the probabilities and the output only (tolerance 2^-7 relative, as the jax result), and
    it is within one bf16 ulp of jax's own result."""
    from minicpmv_jax import layers

    q, k, v = _qkv(2, t, 24, 8, kv_heads, 64, jnp.bfloat16, seed=1)
    mask = _prefill_mask(_valid(2, 24, 16), 16)[:, :, -t:]
    got = layers.attend(q, k, v, mask)
    want = _plain(q, k, v, mask)
    jax_out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    assert got.dtype == jnp.bfloat16 and got.shape == q.shape
    got, jax_out = np.asarray(got, np.float32), np.asarray(jax_out, np.float32)
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-7)
    np.testing.assert_allclose(jax_out, want, rtol=2**-7, atol=2**-7)
    np.testing.assert_allclose(got, jax_out, rtol=2**-8, atol=1e-6)
    dots = [e for e in jax.make_jaxpr(layers.attend)(q, k, v, mask).eqns
            if e.primitive.name == "dot_general"]  # fmt: skip
    assert len(dots) == 2
    if jax.default_backend() == "cpu" and t > 1:  # else jax's attention (bf16 second product)
        assert all(e.params["preferred_element_type"] == jnp.float32 for e in dots), dots
    if t == 1:  # a decode step keeps jax's attention
        np.testing.assert_array_equal(got, jax_out)


def test_cpu_attention_in_query_blocks_matches_reference():
    """`layers.attend(..., q_block=...)` (the vision tower's CPU bf16 attention, queries in
    blocks run one after the other) against the float64 attention of the same bf16 values: the
    blocks cover every query once, uneven last block included, each with its own key mask."""
    from minicpmv_jax import layers

    dtype, tol = jnp.bfloat16, 2**-7
    q, k, v = _qkv(2, 21, 21, 4, 4, 32, dtype, seed=2)
    valid = _valid(2, 21, 21, seed=3)
    for mask in (jnp.asarray(valid)[:, None, None, :], _prefill_mask(valid, 21)):
        got = layers.attend(q, k, v, mask, q_block=8)
        assert got.dtype == dtype and got.shape == q.shape
        want = _plain(q, k, v, mask)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2**-7)])
def test_vision_heads_first_attention_matches_reference(dtype, tol, monkeypatch):
    """The vision tower's CPU attention (`vision._attend_heads_first`, a few (slice, head) pairs
    per loop step) against the float64 attention of the same values, with a key mask per slice
    (a slice that attends only 3 keys included); steps of 1 and of 3 heads (uneven step counts
    are impossible: the step divides slices x heads); within one bf16 ulp of jax's attention."""
    from minicpmv_jax import vision

    q, k, v = _qkv(3, 20, 20, 4, 4, 24, dtype, seed=4)
    mask = jnp.asarray(np.arange(20)[None] < np.array([20, 11, 3])[:, None])[:, None, None, :]
    want = _plain(q, k, v, mask)
    for step_bytes, g in ((20 * 20 * 4, 1), (3 * 20 * 20 * 4, 3)):
        monkeypatch.setattr(vision, "HEADS_STEP_BYTES", step_bytes)
        assert vision.heads_per_step(12, 20) == g
        got = vision._attend_heads_first(q, k, v, mask)
        assert got.dtype == dtype and got.shape == q.shape
        got = np.asarray(got, np.float32)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        jax_out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
        np.testing.assert_allclose(got, np.asarray(jax_out, np.float32), rtol=2**-8, atol=1e-6)
