"""Perceiver resampler (`resampler`): Q learned queries, one cross-attention per output group.

2D (2.5, 2.6): one group per slice. 3D (4.5): keys also get a temporal sin-cos term per slice and
the slices of one temporal group (video frames) are attended together: one output per group.

Groups are handled with static shapes by a flash-attention style combination: every slice computes
its own softmax statistics (max m, sum l, unnormalised output o) over its P keys, and slices of one
group are merged with segment ops (exp(m_i - max_g m) rescaling). For a singleton group this is the
ordinary softmax; for a group it equals attention over the concatenated keys of its members, as the
official `batch_infer` path computes (padded keys of every member masked).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpmv_jax.config import ResamplerConfig
from minicpmv_jax.layers import LayerNorm, dense, param


def _omega(n: int) -> np.ndarray:
    """Official numpy float32 frequencies: 1 / 10000 ** (arange(n) / n), n = half the encoding."""
    omega = np.arange(n, dtype=np.float32)
    omega /= np.float32(n)
    return (1.0 / 10000**omega).astype(np.float32)


def sincos_2d(tgt_sizes: jax.Array, num_patches: int, dim: int) -> jax.Array:
    """2D sin-cos table of every slice, zero on padding.

    `pos2d[row, col] = [sin(col w), cos(col w), sin(row w), cos(row w)]` with w = 1 / 10000 **
    (j / (dim/4)): the official `get_2d_sincos_pos_embed` feeds the width grid first
    (`meshgrid(grid_w, grid_h)`), so the first half encodes the column.

    Args:
      tgt_sizes: int [I, 2] (h, w) patches per slice.
    Returns: float32 [I, P, dim], row-major (index row * w + col), 0 at p >= h * w.
    """
    omega = jnp.asarray(_omega(dim // 4))  # [dim/4]
    h, w = tgt_sizes[:, 0:1].astype(jnp.int32), jnp.maximum(tgt_sizes[:, 1:2], 1).astype(jnp.int32)
    p = jnp.arange(num_patches, dtype=jnp.int32)[None, :]  # [1, P]
    row, col = (p // w).astype(jnp.float32), (p % w).astype(jnp.float32)  # [I, P]

    def enc(pos):  # [I, P] -> [I, P, dim/2]
        ang = pos[..., None] * omega
        return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)

    table = jnp.concatenate([enc(col), enc(row)], axis=-1)  # [I, P, dim]
    return jnp.where((p < h * w)[..., None], table, 0.0)


def sincos_temporal(temporal_ids: jax.Array, dim: int) -> jax.Array:
    """4.5 temporal term [sin(t w'), cos(t w')], w' = 1 / 10000 ** (j / (dim/2)); id -1 -> zeros.

    Args: temporal_ids int [I]. Returns float32 [I, dim].
    """
    omega = jnp.asarray(_omega(dim // 2))  # [dim/2]
    ang = jnp.maximum(temporal_ids, 0).astype(jnp.float32)[:, None] * omega  # [I, dim/2]
    emb = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)
    return jnp.where((temporal_ids >= 0)[:, None], emb, 0.0)


class ResamplerAttention(nnx.Module):
    """`resampler.attn` (torch nn.MultiheadAttention); the fused in_proj is split on load."""

    def __init__(self, cfg: ResamplerConfig, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        self.q_proj = dense(d, d, ("embed", "q_heads"), **kw)
        self.k_proj = dense(d, d, ("embed", "q_heads"), **kw)
        self.v_proj = dense(d, d, ("embed", "q_heads"), **kw)
        self.out_proj = dense(d, d, ("q_heads", "embed"), **kw)


class Resampler(nnx.Module):
    def __init__(self, cfg: ResamplerConfig, *, rngs: nnx.Rngs):
        d, pdt = cfg.embed_dim, cfg.param_dtype
        self.query = param((cfg.num_queries, d), ("queries", "embed"), param_dtype=pdt, rngs=rngs)
        # Official: kv_proj = Linear(kv_dim, D, bias=False) if kv_dim != D else Identity.
        self.kv_proj = (
            dense(
                cfg.kv_dim,
                d,
                ("vis_embed", "embed"),
                dtype=cfg.dtype,
                param_dtype=pdt,
                rngs=rngs,
                bias=False,
            )
            if cfg.kv_dim != d
            else None
        )
        self.attn = ResamplerAttention(cfg, rngs=rngs)
        nkw = {"param_dtype": pdt, "rngs": rngs, "name": "embed"}
        self.ln_q = LayerNorm(d, cfg.layer_norm_eps, **nkw)
        self.ln_kv = LayerNorm(d, cfg.layer_norm_eps, **nkw)
        self.ln_post = LayerNorm(d, cfg.layer_norm_eps, **nkw)
        self.proj = param((d, d), ("embed", None), param_dtype=pdt, rngs=rngs)  # used as x @ proj
        self.cfg = cfg

    def __call__(
        self,
        x: jax.Array,
        tgt_sizes: jax.Array,
        key_valid: jax.Array,
        group_index: jax.Array,
        num_groups: int,
        temporal_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Resample vision features into Q tokens per group.

        Args:
          x: [I, P, Dv] vision features.
          tgt_sizes: int [I, 2] (h, w) per slice (true sizes, also for 2.5).
          key_valid: bool [I, P] = p < h*w (the official key_padding_mask, negated).
          group_index: int [I] output group of each slice; -1 = padding slice (ignored).
          num_groups: static G, number of output rows (unused groups come out finite, unused).
          temporal_ids: int [I] (4.5 only) time id per slice, -1 = image.
        Returns: [G, Q, D] in the compute dtype.
        """
        c = self.cfg
        i, p, _ = x.shape
        n, h, d, dt = c.num_heads, c.head_dim, c.embed_dim, c.dtype
        x = x.astype(dt)
        kv = self.ln_kv(self.kv_proj(x) if self.kv_proj is not None else x)  # [I, P, D]
        k_in = kv + sincos_2d(tgt_sizes, p, d).astype(dt)  # the table is cast to x's dtype
        if c.temporal and temporal_ids is not None:
            k_in = k_in + sincos_temporal(temporal_ids, d).astype(dt)[:, None, :]
        q = self.attn.q_proj(self.ln_q(self.query[...].astype(dt)))  # [Q, D]
        # torch MHA (non-fused path) scales q by 1/sqrt(head_dim) before the product.
        q = (q * (1.0 / np.sqrt(h)).astype(np.float32)).reshape(-1, n, h)  # [Q, N, H]
        k = self.attn.k_proj(k_in).reshape(i, p, n, h)  # [I, P, N, H]
        v = self.attn.v_proj(kv).reshape(i, p, n, h)  # value = kv (no position terms)

        s = jnp.einsum("qnh,ipnh->inqp", q, k).astype(jnp.float32)  # [I, N, Q, P]
        valid = key_valid[:, None, None, :]  # [I, 1, 1, P]
        m = jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1)  # [I, N, Q]
        m = jnp.where(jnp.isfinite(m), m, 0.0)  # padding slices: no valid key
        # exp of -inf, not where(valid, exp(.), 0): a masked score above the max would overflow
        # to inf in the discarded branch, and its zero cotangent times inf is NaN (training).
        e = jnp.exp(jnp.where(valid, s - m[..., None], -jnp.inf))  # [I, N, Q, P]
        l_i = jnp.sum(e, axis=-1)  # [I, N, Q]
        o_i = jnp.einsum("inqp,ipnh->inqh", e, v.astype(jnp.float32))  # [I, N, Q, H]

        g = num_groups
        gid = jnp.where(group_index >= 0, group_index, g).astype(jnp.int32)  # g = dropped
        m_g = jax.ops.segment_max(m, gid, num_segments=g)  # [G, N, Q]
        scale = jnp.where(
            (gid < g)[:, None, None], jnp.exp(m - m_g[jnp.minimum(gid, g - 1)]), 0.0
        )  # [I, N, Q]
        l_g = jax.ops.segment_sum(l_i * scale, gid, num_segments=g)  # [G, N, Q]
        o_g = jax.ops.segment_sum(o_i * scale[..., None], gid, num_segments=g)  # [G, N, Q, H]
        o = o_g / jnp.where(l_g > 0, l_g, 1.0)[..., None]
        o = o.transpose(0, 2, 1, 3).reshape(g, -1, d).astype(dt)  # [G, Q, N*H]
        o = self.ln_post(self.attn.out_proj(o))
        return jnp.matmul(o, self.proj[...].astype(dt))  # [G, Q, D]
