"""Gated DeltaNet (`Qwen3_5GatedDeltaNet`): the linear-attention mixer of Qwen3.5.

Per value head a float32 state S [dk, dv] is decayed by e^g and corrected by the delta rule for
every token. Multi-token calls (prefill) use the chunked form (chunk C, a unit-triangular solve per
chunk, a scan over chunks: no per-token loop); single-token calls take one recurrent step. Both
start from the cached state, so prefill-then-decode equals one long call.

State carried between calls (qwen35.HybridCache): `conv` [B, conv_dim, K] = the last K
pre-convolution q|k|v columns, `rec` [B, Hv, dk, dv] float32 = S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax.layers import dense, param
from minicpmv_jax.v46.config import Qwen35Config


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x * rsqrt(sum(x^2) + eps) over the last axis (the FLA / reference convention)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], by forward substitution row by
    row, as the reference (`torch_chunk_gated_delta_rule`) builds it: X = -A, then for i = 1..C-1
    X[i, :i] += X[i, :] @ X[:, :i] (rows above i are final), then X + I.

    Not `lax.linalg.triangular_solve`: on the CPU backend that is LAPACK trsm through jaxlib's
    FFI, whose batch parallelisation (`ParallelBatchMap` on the intra-op pool) was seen to
    deadlock (every pool thread idle, the kernel waiting for its batch) in a release-size
    1024-token prefill. The loop is C - 1 batched vector-matrix products of C x C: negligible next
    to the chunk's matmuls.
    """
    c = a.shape[-1]
    cols = jnp.arange(c)

    def row(i, x):
        r = jax.lax.dynamic_index_in_dim(x, i, axis=-2, keepdims=False)  # [..., C]: X[i, :]
        r = jnp.where(cols < i, r + jnp.einsum("...j,...jk->...k", r, x), r)
        return jax.lax.dynamic_update_index_in_dim(x, r, i, axis=-2)

    return jax.lax.fori_loop(1, c, row, -a) + jnp.eye(c, dtype=a.dtype)


def chunk_delta_rule(q, k, v, g, beta, state, chunk: int):
    """Chunked gated delta rule (`torch_chunk_gated_delta_rule`), float32.

    Args:
      q, k: [B, T, H, dk] (l2-normalised, q scaled); v: [B, T, H, dv]; g, beta: [B, T, H].
      state: [B, H, dk, dv] initial state. chunk: static chunk length C.
    Returns: (o [B, T, H, dv], final state [B, H, dk, dv]).
    """
    b, t, h, _ = k.shape
    dv = v.shape[-1]
    pad = (-t) % chunk  # zero padding: k = v = beta = g = 0 changes neither output nor state
    q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    g, beta = (jnp.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (g, beta))
    n = (t + pad) // chunk

    def chunks(a):  # [B, T, H, ...] -> [N, B, H, C, ...]
        a = a.reshape(b, n, chunk, h, *a.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(a, 1, 0), 3, 2)

    q, k, v, g, beta = (chunks(a) for a in (q, k, v, g, beta))
    gam = jnp.cumsum(g, axis=-1)  # [N, B, H, C] log-decay from the chunk start
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))  # j <= i
    diff = jnp.where(lower, gam[..., :, None] - gam[..., None, :], -jnp.inf)
    decay = jnp.exp(diff)  # [N, B, H, C, C], 0 above the diagonal
    kb = k * beta[..., None]
    strict = jnp.einsum("...id,...jd->...ij", kb, k) * decay
    inv = unit_lower_inverse(jnp.where(jnp.tril(lower, -1), strict, 0.0))  # T^-1
    u = inv @ (v * beta[..., None])
    w = inv @ (kb * jnp.exp(gam)[..., None])
    attn = jnp.einsum("...id,...jd->...ij", q, k) * decay  # intra-chunk, diagonal included
    qd = q * jnp.exp(gam)[..., None]
    kd = k * jnp.exp(gam[..., -1:] - gam)[..., None]
    cdecay = jnp.exp(gam[..., -1])[..., None, None]  # [N, B, H, 1, 1]

    def step(s, xs):
        u_c, w_c, qd_c, kd_c, attn_c, cd_c = xs
        v_new = u_c - w_c @ s  # [B, H, C, dv]
        o = qd_c @ s + attn_c @ v_new
        s = s * cd_c + jnp.swapaxes(kd_c, -1, -2) @ v_new
        return s, o

    state, o = jax.lax.scan(step, state, (u, w, qd, kd, attn, cdecay))  # o [N, B, H, C, dv]
    o = jnp.moveaxis(o, 0, 1).swapaxes(2, 3).reshape(b, n * chunk, h, dv)
    return o[:, :t], state


def recurrent_delta_rule(q, k, v, g, beta, state):
    """One token per row (`torch_recurrent_gated_delta_rule` with T = 1), float32.

    Args: q, k [B, H, dk]; v [B, H, dv]; g, beta [B, H]; state [B, H, dk, dv].
    Returns: (o [B, H, dv], state).
    """
    state = state * jnp.exp(g)[..., None, None]
    mem = jnp.einsum("bhkv,bhk->bhv", state, k)
    delta = (v - mem) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return jnp.einsum("bhkv,bhk->bhv", state, q), state


class GatedRMSNorm(nnx.Module):
    """`Qwen3_5RMSNormGated`: w * rmsnorm(x) * silu(z) (weight not zero-centred)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.weight = param(
            (dim,), ("head_dim",), param_dtype=param_dtype, rngs=rngs, init=nnx.initializers.ones
        )
        self.eps = eps

    def __call__(self, x, z):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        y = self.weight[...].astype(x.dtype) * xf.astype(x.dtype)
        return (y * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)


class DepthwiseConv(nnx.Module):
    """`conv1d`: the depthwise causal conv's weight in the checkpoint layout [conv_dim, 1, K]."""

    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs):
        self.weight = param(
            (cfg.conv_dim, 1, cfg.conv_kernel),
            ("lin_heads", None, None),
            param_dtype=cfg.param_dtype,
            rngs=rngs,
            init=nnx.initializers.normal(0.5),
        )


class GatedDeltaNet(nnx.Module):
    """`linear_attn`: in_proj_{qkv,z,b,a} -> causal depthwise conv + SiLU -> delta rule ->
    gated RMSNorm -> out_proj."""

    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs, "bias": False}
        hv = cfg.lin_num_value_heads
        self.in_proj_qkv = dense(d, cfg.conv_dim, ("embed", "lin_heads"), **kw)
        self.in_proj_z = dense(d, cfg.value_dim, ("embed", "lin_heads"), **kw)
        self.in_proj_b = dense(d, hv, ("embed", "lin_v_heads"), **kw)
        self.in_proj_a = dense(d, hv, ("embed", "lin_v_heads"), **kw)
        self.conv1d = DepthwiseConv(cfg, rngs=rngs)
        pkw = {"param_dtype": cfg.param_dtype, "rngs": rngs}
        self.A_log = param((hv,), ("lin_v_heads",), init=nnx.initializers.zeros_init(), **pkw)
        self.dt_bias = param((hv,), ("lin_v_heads",), init=nnx.initializers.ones, **pkw)
        self.norm = GatedRMSNorm(
            cfg.lin_value_head_dim, cfg.rms_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.out_proj = dense(cfg.value_dim, d, ("lin_heads", "embed"), **kw)
        self.cfg = cfg

    def __call__(self, x, token_valid, conv_state, rec_state):
        """x [B, T, D]; token_valid bool [B, T] (pads are zeroed and leave the state alone);
        conv_state [B, conv_dim, K]; rec_state float32 [B, Hv, dk, dv].
        Returns (out [B, T, D], conv_state, rec_state)."""
        c, (b, t, _) = self.cfg, x.shape
        x = jnp.where(token_valid[..., None], x, 0).astype(x.dtype)
        qkv = self.in_proj_qkv(x)  # [B, T, conv_dim]
        z = self.in_proj_z(x).reshape(b, t, c.lin_num_value_heads, c.lin_value_head_dim)
        beta = jax.nn.sigmoid(self.in_proj_b(x).astype(jnp.float32))  # [B, T, Hv]
        a = self.in_proj_a(x).astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a + self.dt_bias[...].astype(jnp.float32)
        )
        beta = jnp.where(token_valid[..., None], beta, 0.0)
        g = jnp.where(token_valid[..., None], g, 0.0)

        # causal depthwise conv over [stored K columns | new columns]
        kk = c.conv_kernel
        full = jnp.concatenate([jnp.swapaxes(conv_state, 1, 2).astype(qkv.dtype), qkv], axis=1)
        w = self.conv1d.weight[...][:, 0, :].astype(qkv.dtype)  # [C, K]
        conv = sum(full[:, 1 + j : 1 + j + t] * w[:, j] for j in range(kk))  # [B, T, C]
        conv = jax.nn.silu(conv)
        conv_state = jnp.swapaxes(full[:, -kk:], 1, 2).astype(conv_state.dtype)

        hk, hv, dk, dv = (
            c.lin_num_key_heads,
            c.lin_num_value_heads,
            c.lin_key_head_dim,
            c.lin_value_head_dim,
        )
        q = conv[..., : c.key_dim].reshape(b, t, hk, dk).astype(jnp.float32)
        k = conv[..., c.key_dim : 2 * c.key_dim].reshape(b, t, hk, dk).astype(jnp.float32)
        v = conv[..., 2 * c.key_dim :].reshape(b, t, hv, dv).astype(jnp.float32)
        if hv != hk:  # repeat_interleave: value head j reads key head j // (Hv / Hk)
            q, k = (jnp.repeat(a, hv // hk, axis=2) for a in (q, k))
        q = l2norm(q) * dk**-0.5
        k = l2norm(k)
        if t == 1:
            o, rec_state = recurrent_delta_rule(
                q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], rec_state
            )
            o = o[:, None]
        else:
            o, rec_state = chunk_delta_rule(q, k, v, g, beta, rec_state, c.chunk_size)
        o = self.norm(o.astype(x.dtype), z)
        return self.out_proj(o.reshape(b, t, hv * dv)), conv_state, rec_state
