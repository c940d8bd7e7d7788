"""KV-cache LLM path (prefill + decode == one full forward) and static-shape compilation counts."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, case_dirs, load_case
from flax import nnx
from train_helpers import FAST_COMPILE

from minicpmv_jax.generate import TRACE_COUNTS
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.model import MiniCPMV
from minicpmv_jax.processor import vision_mask, vision_position_ids

FOLDER = "minicpm-v-4_5"  # Qwen3: qk-norm, head_dim 48 != hidden / heads


@functools.cache
def model():
    return MiniCPMV.from_pretrained(
        FIXTURES / FOLDER / "checkpoint", dtype="float32", load_processor=False, progress=False
    )


@functools.cache
def fixture_embeds():
    data = load_case(next(c for c in case_dirs(FOLDER) if c.name == "single_448x448"))
    return data["llm"]["inputs_embeds"].astype(np.float32), data["llm"]["prompt_logits"]


@functools.partial(jax.jit, static_argnames="graphdef")
def _llm_jit(graphdef, state, x, positions, cache, token_valid):
    return nnx.merge(graphdef, state)(x, positions, cache, token_valid)


def _llm_call(x, positions, cache, token_valid):
    graphdef, state = nnx.split(model().module.llm)
    with jax.default_matmul_precision("highest"):
        return _llm_jit(graphdef, state, x, np.asarray(positions, np.int32), cache, token_valid)


def test_full_forward_matches_fixture():
    x, want = fixture_embeds()
    t = x.shape[1]
    logits, cache = _llm_call(x, np.arange(t)[None], None, np.ones((1, t), bool))
    assert cache is None
    assert logits.dtype == jnp.float32 and logits.shape == want.shape
    np.testing.assert_allclose(np.asarray(logits), want, atol=5e-4)


def test_prefill_then_decode_equals_full_forward():
    x, _ = fixture_embeds()
    t = x.shape[1]
    full, _ = _llm_call(x, np.arange(t)[None], None, np.ones((1, t), bool))
    cfg = model().config.llm
    cache = KVCache.init(cfg, 1, t + 16, jnp.float32)
    n_pre = t - 4
    pre, cache = _llm_call(x[:, :n_pre], np.arange(n_pre)[None], cache, np.ones((1, n_pre), bool))
    steps = [np.asarray(pre)]
    for i in range(n_pre, t):
        out, cache = _llm_call(x[:, i : i + 1], np.array([[i]]), cache, np.ones((1, 1), bool))
        steps.append(np.asarray(out))
    assert int(cache.end) == t
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=2e-5)


def test_padded_batch_rows_are_independent():
    """Right-padded prompts in one batch (invalid pad slots) give each row's own logits."""
    x, _ = fixture_embeds()
    t = x.shape[1]
    short = t - 7
    cfg = model().config.llm
    xb = np.concatenate([x, np.pad(x[:, :short], ((0, 0), (0, 7), (0, 0)))], axis=0)  # [2, T, D]
    valid = np.ones((2, t), bool)
    valid[1, short:] = False
    pos = np.broadcast_to(np.arange(t), (2, t))
    cache = KVCache.init(cfg, 2, t + 8, jnp.float32)
    logits, cache = _llm_call(xb, pos, cache, valid)
    ref0, _ = _llm_call(x, np.arange(t)[None], None, np.ones((1, t), bool))
    ref1, _ = _llm_call(x[:, :short], np.arange(short)[None], None, np.ones((1, short), bool))
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(ref0[0]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(logits[1, :short]), np.asarray(ref1[0]), atol=2e-5)
    # one decode step for both rows: row 1 continues at its own position `short`
    nxt = np.stack([x[0, -1:], x[0, :1]])  # [2, 1, D]
    out, cache = _llm_call(nxt, np.array([[t], [short]]), cache, np.ones((2, 1), bool))
    ref, _ = _llm_call(
        np.concatenate([x[:, :short], x[:, :1]], axis=1),
        np.arange(short + 1)[None],
        None,
        np.ones((1, short + 1), bool),
    )
    np.testing.assert_allclose(np.asarray(out[1, 0]), np.asarray(ref[0, -1]), atol=2e-5)


def test_kv_cache_api():
    cfg = model().config.llm
    cache = KVCache.init(cfg, 2, 10)
    assert cache.k.shape == (cfg.num_layers, 2, 10, cfg.num_kv_heads, cfg.head_dim)
    cache, start = cache.append(jnp.array([[True, True, False], [True, False, False]]))
    assert int(start) == 0 and int(cache.end) == 3
    mask = cache.mask(start, 3)
    assert mask.shape == (2, 1, 3, 10)
    assert not bool(mask[0, 0, 0, 1]) and bool(mask[0, 0, 1, 1]) and not bool(mask[1, 0, 2, 1])


def _synthetic_batch(tgt_sizes, p, version="4.5", seed=0):
    tgt = np.asarray(tgt_sizes, np.int64)
    i = len(tgt)
    rng = np.random.default_rng(seed)
    valid = np.arange(p)[None] < (tgt[:, 0] * tgt[:, 1])[:, None]
    return {
        "pixel_patches": np.where(valid[..., None], rng.standard_normal((i, p, 588)), 0).astype(
            np.float32
        ),
        "patch_valid": valid,
        "vision_mask": vision_mask(tgt, p, version),
        "position_ids": vision_position_ids(tgt, p, version),
        "tgt_sizes": tgt,
        "temporal_ids": np.full((i,), -1, np.int64),
        "group_sizes": np.ones((i,), np.int64),
    }


def test_vision_and_resampler_compile_once_per_bucket():
    """Differently sized images in one (slice bucket, patch bucket) share one compilation."""
    m = model()
    same_bucket = [  # 3 or 4 slices -> slice bucket 4; <= 1024 patches -> patch bucket 1024
        [(32, 32), (10, 12), (28, 36)],
        [(20, 30), (16, 16), (5, 70), (30, 34)],
        [(1, 1), (25, 40), (31, 33)],
    ]
    out = m.resample(_synthetic_batch(same_bucket[0], 1024))  # may compile (first use)
    assert out.shape == (3, m.config.query_num, m.config.llm.hidden_size)
    before = TRACE_COUNTS["encode"]
    for tgt in same_bucket[1:]:
        out = m.resample(_synthetic_batch(tgt, 1024))
        assert out.shape[0] == len(tgt) and np.isfinite(out).all()
    assert TRACE_COUNTS["encode"] == before, "same bucket recompiled"
    m.resample(_synthetic_batch([(8, 8)] * 5, 1024))  # 5 slices -> bucket 5: a new compilation
    assert TRACE_COUNTS["encode"] == before + 1


def test_padding_slices_do_not_change_outputs():
    """A slice's resampler output does not depend on the bucket it is padded into."""
    m = model()
    tgt = [(20, 30), (16, 16), (5, 70)]
    three = m.resample(_synthetic_batch(tgt, 1024))
    alone = m.resample(_synthetic_batch(tgt[:1], 1024))
    np.testing.assert_allclose(three[0], alone[0], atol=1e-5)


@pytest.mark.parametrize(
    ("chunk", "skipped"),
    [
        (16, [False] * 5),  # one chunk: computed whole (padding slices too)
        (2, [False, False, False, False, True]),  # chunks {0, 1}, {2, 3}, {4}: the last skipped
    ],
)
def test_cpu_tower_skips_padding_slices(chunk, skipped):
    """On the CPU backend the tower does not compute a chunk of padding slices only (its rows
    are zero) and the other slices come out as without the skip (float32 summation-order
    noise); a request within one chunk runs whole."""
    from minicpmv_jax import vision

    m = model()
    batch = _synthetic_batch([(20, 30), (16, 16), (5, 70), (8, 8), (1, 1)], 1024)
    xs = (batch["pixel_patches"], batch["position_ids"], batch["vision_mask"])
    valid = np.array([True, False, True, False, False])
    graphdef, state = nnx.split(m.module.vpm)
    vpm = nnx.merge(graphdef, state)
    vpm.cfg = dataclasses.replace(vpm.cfg, batch_size=chunk)

    @jax.jit
    def tower(xs, valid):
        return vpm(*xs, valid)

    got = np.asarray(tower(xs, valid))
    try:
        vision.CPU_SKIP_PADDING_SLICES = False
        want = np.asarray(jax.jit(lambda xs: vpm(*xs))(xs))
    finally:
        vision.CPU_SKIP_PADDING_SLICES = True
    skipped = np.array(skipped) & (jax.default_backend() == "cpu")
    np.testing.assert_allclose(got[~skipped], want[~skipped], rtol=1e-5, atol=1e-5)
    assert not got[skipped].any()


@pytest.mark.parametrize("groups", [[3, 1, 2], [1, 1, 1, 1, 1, 1]])
def test_grouped_resampler_matches_concatenated_attention(groups):
    """4.5 groups: the segment-combined softmax equals one attention over the joined keys."""
    m = model()
    n = sum(groups)
    tgt = [(10 + i, 12 - i) for i in range(n)]
    batch = _synthetic_batch(tgt, 256, seed=1)
    batch["group_sizes"] = np.asarray(groups, np.int64)
    batch["temporal_ids"] = np.arange(n, dtype=np.int64) * 5 - 1  # includes -1 and 0-based ids
    got = m.resample(batch)
    # reference: numpy attention over each group's concatenated valid keys
    r = m.module.resampler
    with jax.default_matmul_precision("highest"):
        feats = np.asarray(m.vision_features(batch))
        from minicpmv_jax.resampler import sincos_2d, sincos_temporal

        kv = r.ln_kv(r.kv_proj(jnp.asarray(feats)))
        k_in = kv + sincos_2d(jnp.asarray(batch["tgt_sizes"]), 256, kv.shape[-1])
        k_in = k_in + sincos_temporal(jnp.asarray(batch["temporal_ids"]), kv.shape[-1])[:, None]
        q = np.asarray(r.attn.q_proj(r.ln_q(r.query[...])))
        k, v = np.asarray(r.attn.k_proj(k_in)), np.asarray(r.attn.v_proj(kv))
    nh, hd = r.cfg.num_heads, r.cfg.head_dim
    start, outs = 0, []
    for g in groups:
        sel = [
            (i, p)
            for i in range(start, start + g)
            for p in range(256)
            if batch["patch_valid"][i, p]
        ]
        kk = np.stack([k[i, p] for i, p in sel]).reshape(-1, nh, hd)
        vv = np.stack([v[i, p] for i, p in sel]).reshape(-1, nh, hd)
        qq = q.reshape(-1, nh, hd) / np.sqrt(hd)
        s = np.einsum("qnh,snh->nqs", qq, kk)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        outs.append(np.einsum("nqs,snh->qnh", a, vv).reshape(q.shape[0], -1))
        start += g
    with jax.default_matmul_precision("highest"):
        ref = r.ln_post(r.attn.out_proj(jnp.asarray(np.stack(outs)))) @ r.proj[...]
    np.testing.assert_allclose(got, np.asarray(ref), atol=1e-4)


def _official_1d(dim, pos):
    """The official numpy float32 `get_1d_sincos_pos_embed_from_grid`."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def test_sincos_tables_match_official_numpy():
    from minicpmv_jax.resampler import sincos_2d, sincos_temporal

    d = 64
    tgt = np.array([[70, 70], [11, 90], [2, 3]])  # incl. a side > 70 (official table grows)
    got = np.asarray(sincos_2d(jnp.asarray(tgt), 4900, d))
    for i, (h, w) in enumerate(tgt):
        gw, gh = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        want = np.concatenate([_official_1d(d // 2, gw), _official_1d(d // 2, gh)], axis=1)
        np.testing.assert_allclose(got[i, : h * w], want, atol=1e-6)
        assert not got[i, h * w :].any()
    # spec §4.2 check values, D = 8, (h, w) = (2, 3)
    small = np.asarray(sincos_2d(jnp.asarray([[2, 3]]), 6, 8))[0]
    np.testing.assert_allclose(small[1], [0.8415, 0.01, 0.5403, 0.99995, 0, 0, 1, 1], atol=1e-4)
    np.testing.assert_allclose(small[3], [0, 0, 1, 1, 0.8415, 0.01, 0.5403, 0.99995], atol=1e-4)
    ids = np.array([-1, 0, 1, 110, 71999])
    got_t = np.asarray(sincos_temporal(jnp.asarray(ids), 4096))
    np.testing.assert_allclose(got_t[1:], _official_1d(4096, ids[1:].astype(np.float32)), atol=1e-6)
    assert not got_t[0].any()  # id -1 (image): no temporal term; id 0 is not zero
    assert got_t[1].any()


@functools.cache
def _remat_case():
    """(loss_fn(params, remat), grad(remat) -> (loss, grads), params, the no-remat (loss,
    grads)): the reference runs once for every policy."""
    m = model()
    graphdef, state = nnx.split(m.module, nnx.Param)
    rng = np.random.default_rng(0)
    x, _ = fixture_embeds()
    t = x.shape[1]
    weights = rng.normal(size=(1, t, m.config.llm.vocab_size)).astype(np.float32)
    i, p, vis = 2, 16, m.config.vision
    patches = rng.normal(size=(i, p, vis.patch_dim)).astype(np.float32)
    pos = np.tile(np.arange(p, dtype=np.int32), (i, 1))
    key_mask = np.arange(p)[None, :] < np.array([[16], [9]])

    def loss_fn(params, remat):
        module = nnx.merge(graphdef, params)
        module.llm.cfg = dataclasses.replace(module.llm.cfg, remat=remat)
        module.vpm.cfg = dataclasses.replace(module.vpm.cfg, remat=remat)
        logits, _ = module.llm(x, np.arange(t)[None], None, np.ones((1, t), bool))
        feats = module.vpm(patches, pos, key_mask)
        return jnp.sum(logits * weights) + jnp.sum(jnp.where(key_mask[..., None], feats, 0) ** 2)

    def grad(remat):  # compiled for the comparison only: FAST_COMPILE (same numbers per policy)
        with jax.default_matmul_precision("highest"):
            step = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1).lower(state, remat)
        return step.compile(FAST_COMPILE)(state)

    return loss_fn, grad, state, grad("none")


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_loss_and_gradients(policy):
    """Per-layer rematerialisation (LLM and vision stacks) changes what the backward pass keeps,
    not the numbers: loss and every gradient equal the no-remat ones (float32: 1e-5 relative)."""
    loss_fn, grad, state, (want_loss, want) = _remat_case()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn), static_argnums=1)(state, policy))
    assert jaxpr.count("remat") >= 2  # one per stack: the policy really is applied
    got_loss, got = grad(policy)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    want, got = nnx.to_flat_state(want), nnx.to_flat_state(got)
    # absolute floor: 1e-6 of the largest gradient (the key-bias gradients are exactly zero in
    # exact arithmetic, softmax being shift-invariant, and come out as rounding noise)
    floor = 1e-6 * max(float(np.abs(v.get_value()).max()) for _, v in want)
    for (path, a), (_, b) in zip(want, got, strict=True):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=floor, err_msg=str(path))


def test_unknown_remat_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        dataclasses.replace(model().config.llm, remat="some")
