"""SigLIP2 vision tower of MiniCPM-V 4.6 with the intra-ViT window-attention merger.

Layout (vision_inputs.layout): the patches of all visual units (source image, slices, video
frames, composites) stay packed, units back to back in raster order of their (h, w) patch grids,
padded only at the end to a bucket N, so every per-token stage (projections, MLPs, norms: nearly
all the FLOPs) runs on real patches only. The official block-diagonal attention (each unit
attends only to itself) gathers one padded row per unit, [U, P] with padded keys masked, and
scatters the result back. Host-side index arrays carry everything that depends on the grid sizes,
so the tower compiles once per (N, U, P) bucket.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax.layers import LayerNorm, dense, embed, param
from minicpmv_jax.v46.config import Siglip2Config
from minicpmv_jax.vision import VisionAttention, VisionLayer, attend_heads

ATTN_BLOCK_BYTES = 32 << 20  # float32 scores of one attention block [g, N, q, P]


def attention_blocks(units: int, p: int, heads: int) -> tuple[int, int]:
    """(units g, queries q) per attention block: the scores of one block, g * N * q * P float32,
    fit ATTN_BLOCK_BYTES. Small units are grouped (g a power of two dividing `units`, whole
    rows); a unit too large for the budget is split into query blocks (q the largest divisor of
    P that fits, at least 1)."""
    row = heads * p * 4  # bytes of one query's scores
    if p * row > ATTN_BLOCK_BYTES:
        return 1, max([d for d in range(1, p + 1) if p % d == 0 and d * row <= ATTN_BLOCK_BYTES])
    g = 1
    while 2 * g <= units and units % (2 * g) == 0 and 2 * g * p * row <= ATTN_BLOCK_BYTES:
        g *= 2
    return g, p


def unit_attention(attn: VisionAttention, x, rows, slots, valid, count) -> jax.Array:
    """Attention of packed tokens restricted to their unit.

    The official block-diagonal attention, block by block: one (unit group, query block) of
    `attention_blocks` per loop step, so the live float32 scores stay under ATTN_BLOCK_BYTES
    (all units at once: [U, N, P, P], 0.8 GB for 8 units of 1280 patches, three such buffers
    live), and blocks of padding units (past `count`) are skipped. Heads go ahead of positions
    once per layer (`vision.attend_heads`), not once per block: with [g, q, N, H] operands
    XLA:CPU transposed every block (release tower, 7 units x 1280 slots, 16 heads of 72, float32:
    959 vs 806 ms).

    Args:
      x: [N, Dv] packed tokens; rows: int [U, P] packed row of each slot of a unit's padded row;
      slots: int [N] slot of each packed row in the flattened [U * P]; valid: bool [U, P];
      count: int32 [] real units (the first `count` rows of `rows` / `valid`).
    Returns: [N, Dv] (`attn`'s output projection included).
    """
    c, (u, p), d = attn.cfg, rows.shape, x.shape[-1]
    n, h = c.num_heads, c.head_dim

    def heads(proj):  # per-token projection on the packed rows, then one gather per unit
        return proj(x)[rows].reshape(u, p, n, h).transpose(0, 2, 1, 3)  # [U, N, P, H]

    q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    g, qb = attention_blocks(u, p, n)
    nq = p // qb

    def block(i, buf):  # buf: queries, each block overwritten by its output once read
        u0, q0 = (i // nq) * g, (i % nq) * qb

        def run(buf):
            def take(a, axis, start, size):
                return jax.lax.dynamic_slice_in_dim(a, start, size, axis)

            qi = take(take(buf, 0, u0, g), 2, q0, qb)  # [g, N, qb, H]
            ki, vi = take(k, 0, u0, g), take(v, 0, u0, g)  # [g, N, P, H]
            mask = take(valid, 0, u0, g)[:, None, None, :]  # [g, 1, 1, P]
            out = attend_heads(qi, ki, vi, mask)
            return jax.lax.dynamic_update_slice(buf, out, (u0, 0, q0, 0))

        return jax.lax.cond(u0 < count, run, lambda buf: buf, buf)

    # padding units' blocks keep their queries: no real token's slot reads them
    out = jax.lax.fori_loop(0, (u // g) * nq, block, q)  # [U, N, P, H]
    out = out.transpose(0, 2, 1, 3).reshape(u * p, d)  # [U * P, Dv]
    return attn.out_proj(out[slots])  # [N, Dv]


def packed_layer(layer: VisionLayer, x, rows, slots, valid, count) -> jax.Array:
    """`VisionLayer` on packed tokens x [N, Dv] (the attention as in `unit_attention`)."""
    x = x + unit_attention(layer.self_attn, layer.layer_norm1(x), rows, slots, valid, count)
    return x + layer.mlp(layer.layer_norm2(x))


class PatchEmbedding(nnx.Module):
    """Conv2d(3 -> Dv, kernel = stride = patch) kept in the checkpoint layout [Dv, 3, p, p]."""

    def __init__(self, cfg: Siglip2Config, *, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.hidden_size

        def init(key, shape, dtype):  # lecun normal over the 3*p*p fan-in
            return nnx.initializers.lecun_normal()(key, (d, 3 * p * p), dtype).reshape(shape)

        kw = {"param_dtype": cfg.param_dtype, "rngs": rngs}
        self.weight = param((d, 3, p, p), ("vis_embed", None, None, None), init=init, **kw)
        self.bias = param((d,), ("vis_embed",), init=nnx.initializers.zeros_init(), **kw)
        self.dtype = cfg.dtype

    def __call__(self, patches: jax.Array) -> jax.Array:
        """patches [..., 3*p*p] with inner order (c, ky, kx) -> [..., Dv]."""
        w = self.weight[...]
        w = w.reshape(w.shape[0], -1).astype(self.dtype)  # [Dv, 588], same (c, ky, kx) order
        return patches.astype(self.dtype) @ w.T + self.bias[...].astype(self.dtype)


class Siglip2Embeddings(nnx.Module):
    def __init__(self, cfg: Siglip2Config, *, rngs: nnx.Rngs):
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        self.patch_embedding = PatchEmbedding(cfg, rngs=rngs)
        self.position_embedding = embed(
            cfg.patches_per_side**2, cfg.hidden_size, ("positions", "vis_embed"), **kw
        )

    def __call__(self, patches, position_ids):
        """patches [N, 588], position_ids int [N] -> [N, Dv]."""
        return self.patch_embedding(patches) + self.position_embedding(
            position_ids.astype(jnp.int32)
        )


class ViTWindowMerger(nnx.Module):
    """2x2 windows -> 1 token: window attention, then an MLP over the concatenated window plus
    the window mean (`MiniCPMV4_6ViTWindowAttentionMerger`)."""

    def __init__(self, cfg: Siglip2Config, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        nkw = {"param_dtype": cfg.param_dtype, "rngs": rngs, "name": "vis_embed"}
        self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps, **nkw)
        self.self_attn = VisionAttention(cfg, rngs=rngs)
        self.pre_norm = LayerNorm(4 * d, cfg.layer_norm_eps, **nkw)
        self.linear_1 = dense(4 * d, 4 * f, ("vis_embed", "vis_mlp"), **kw)
        self.linear_2 = dense(4 * f, d, ("vis_mlp", "vis_embed"), **kw)

    def __call__(self, x: jax.Array, window_index: jax.Array) -> jax.Array:
        """x [U, P, Dv]; window_index int [U, P]: source row of each slot, windows in raster order
        of the halved grid, (TL, TR, BL, BR) inside a window. Returns [U, P/4, Dv]."""
        u, p, d = x.shape
        xw = jnp.take_along_axis(x, window_index[..., None], axis=1)  # [U, P, Dv]
        y = self.layer_norm1(xw).reshape(u * p // 4, 4, d)  # LN is per token: reorder first
        mask = jnp.ones((1, 1, 4, 4), bool)  # each window is its own attention block
        z = xw + self.self_attn(y, mask).reshape(u, p, d)
        win = z.reshape(u, p // 4, 4, d)
        h = self.linear_1(self.pre_norm(win.reshape(u, p // 4, 4 * d)))
        return self.linear_2(jax.nn.gelu(h, approximate=True)) + jnp.mean(win, axis=2)


class Siglip2Encoder(nnx.Module):
    def __init__(self, cfg: Siglip2Config, *, rngs: nnx.Rngs):
        self.layers = nnx.List([VisionLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])


class Siglip2Tower(nnx.Module):
    """`model.vision_tower`: embeddings -> layers 0..insert -> [ViT merger] -> remaining layers
    -> post_layernorm."""

    def __init__(self, cfg: Siglip2Config, *, rngs: nnx.Rngs):
        self.embeddings = Siglip2Embeddings(cfg, rngs=rngs)
        self.encoder = Siglip2Encoder(cfg, rngs=rngs)
        self.vit_merger = ViTWindowMerger(cfg, rngs=rngs)
        self.post_layernorm = LayerNorm(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
            name="vis_embed",
        )
        self.cfg = cfg

    def __call__(self, v: dict[str, jax.Array], merge: bool, *, intermediates: bool = False):
        """Vision features of every unit, packed.

        Args:
          v: the arrays of `vision_inputs.layout`: patches float [N, 588], position_ids int [N],
            rows / slots / valid / unit_count (the attention layout); with merge also window_perm [N] and the
            merged tokens' rows2 / slots2 / valid2.
          merge: run the ViT merger after layer `insert_layer_id` (16x; 4x skips it).
          intermediates: also return {"embeddings", "layer_insert_output", "vit_merger_output"}.
        Returns: [N/4 (16x) or N, Dv] after post_layernorm, units back to back in raster order
          of their (halved in 16x) grids; rows past the real tokens are not meaningful.
        """
        x = self.embeddings(v["patches"], v["position_ids"]).astype(self.cfg.dtype)
        inter = {"embeddings": x}
        attn = (v["rows"], v["slots"], v["valid"], v["unit_count"])
        for i, layer in enumerate(self.encoder.layers):
            x = packed_layer(layer, x, *attn)
            if i == self.cfg.insert_layer_id:
                inter["layer_insert_output"] = x
                if merge:
                    # windows are 4 consecutive rows after window_perm and never straddle units
                    x = self.vit_merger(x[None], v["window_perm"][None])[0]  # [N/4, Dv]
                    inter["vit_merger_output"] = x
                    attn = (v["rows2"], v["slots2"], v["valid2"], v["unit_count"])
        out = self.post_layernorm(x)
        return (out, inter) if intermediates else out
