"""Decoder-only LLM: Llama-3 (2.5), Qwen2 with q/k/v bias (2.6), Qwen3 with q/k RMSNorm (4.5).

Attribute paths are the checkpoint keys below `llm.`: `model.embed_tokens`, `model.layers.
self_attn.q_proj`, ..., `model.norm`, `lm_head` (`lm_head.weight` [V, D] in the checkpoint's own
layout, see layers.OutInDense). The decoder layers are one stack: every layer
parameter has a leading L axis (`model.layers.self_attn.q_proj.kernel` [L, D, N*H]; slice i is the
checkpoint's `model.layers.i.self_attn.q_proj.weight` transposed, see weights.py; a projection
that `LlmConfig.out_in` names is an OutInDense instead, `...weight` [L, out, in], slice i the
checkpoint tensor as stored: a bf16 model's MLP on CPU, `model.decoder_layout`) and the layers
run under one `nnx.scan`, optionally rematerialised (`LlmConfig.remat`). The CPU samplers of a
float32 model pass the stack as per-layer views instead (`layers.LayerParts`,
`generate.split_layers`), and the same code then runs the layers as an unrolled loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax.config import LlmConfig
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.layers import (
    PACKED_BF16,
    LayerParts,
    OutInDense,
    RMSNorm,
    attend,
    cpu_aware_dot,
    dense,
    embed,
    rope,
    scan_layers,
    stack_layers,
    unpack_bf16,
)
from minicpmv_jax.sharding import ACT_AXES, constrain, constrain_cache


def projection(
    cfg: LlmConfig, name: str, din: int, dout: int, names: tuple[str, str], *, bias: bool, rngs
) -> nnx.Linear | OutInDense:
    """The decoder projection `name`: an nnx.Linear `kernel` [in, out], or an OutInDense
    `weight` [out, in] (torch's layout) when `cfg.out_in` names it; `names` in (in, out) order."""
    kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs, "bias": bias}
    # MiniCPM-V 4.6's decoder (v46.qwen35) builds this Mlp from a config without `out_in`
    if name in getattr(cfg, "out_in", ()):
        return OutInDense(din, dout, (names[1], names[0]), **kw)
    return dense(din, dout, names, **kw)


class Attention(nnx.Module):
    def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = {"rngs": rngs}
        b = cfg.qkv_bias
        self.q_proj = projection(cfg, "q_proj", d, n * h, ("embed", "q_heads"), bias=b, **kw)
        self.k_proj = projection(cfg, "k_proj", d, k * h, ("embed", "kv_heads"), bias=b, **kw)
        self.v_proj = projection(cfg, "v_proj", d, k * h, ("embed", "kv_heads"), bias=b, **kw)
        self.o_proj = projection(cfg, "o_proj", n * h, d, ("q_heads", "embed"), bias=False, **kw)
        if cfg.qk_norm:
            # Qwen3: per-head RMSNorm over head_dim on q and k, after reshape, BEFORE RoPE.
            nkw = {"param_dtype": cfg.param_dtype, "rngs": rngs, "name": "head_dim"}
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, **nkw)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, **nkw)
        self.cfg = cfg

    def __call__(self, x, positions, mask, cache: KVCache | None, layer, start):
        """x: [B, T, D]; positions: int32[B, T]; mask: bool[B, 1, T, S] -> ([B, T, D], cache).

        layer: int32[] index of this layer in the cache's L axis (the scan's counter).
        """
        c, (b, t, _) = self.cfg, x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)  # [B, T, N, H]
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)  # [B, T, K, H]
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)  # [B, T, K, H]
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        if cache is not None:
            cache = cache.write(layer, start, k, v)
            k, v = cache.k[layer], cache.v[layer]  # [B, S, K, H]
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=c.attn_impl)
        return self.o_proj(out.reshape(b, t, -1)), cache  # [B, T, N*H] -> [B, T, D]


class Mlp(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = {"bias": False, "rngs": rngs}
        self.gate_proj = projection(cfg, "gate_proj", d, f, ("embed", "mlp"), **kw)
        self.up_proj = projection(cfg, "up_proj", d, f, ("embed", "mlp"), **kw)
        self.down_proj = projection(cfg, "down_proj", f, d, ("mlp", "embed"), **kw)

    def __call__(self, x):
        """x: [B, T, D] -> [B, T, D]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs):
        nkw = {"param_dtype": cfg.param_dtype, "rngs": rngs, "name": "embed"}
        self.self_attn = Attention(cfg, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **nkw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **nkw)

    def __call__(self, x, positions, mask, cache, layer, start):
        """Pre-norm block: x [B, T, D] -> ([B, T, D], cache)."""
        h, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, layer, start)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlmModel(nnx.Module):
    """`llm.model`: token embedding, decoder layers, final RMSNorm."""

    def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs):
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        self.embed_tokens = embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs, name="embed"
        )


LOGITS_TILE = 1 << 20  # lm_head weights per tile of a packed (CPU bf16) lm_head
# lm_head weights per row tile of a split (CPU bf16) lm_head (`generate.split_head`): 4 M
# decoded 1-3% faster than 1 M in two interleaved A/B runs (BENCHMARKS.md)
SPLIT_TILE = 1 << 22


def tiled_logits(h: jax.Array, weight: jax.Array, dtype) -> jax.Array:
    """h [..., D] times the packed bf16 lm_head weight uint16 [V, D] -> [..., V], in tiles.

    The product of `OutInDense` (`cpu_aware_dot`) taken `LOGITS_TILE` weights (whole vocabulary
    rows) at a time by a `lax.map` whose index makes each slice loop-variant, so that inside
    the decode loop only one tile is reinterpreted (and widened by XLA:CPU) at a time; the rows
    after the last whole tile are taken directly.
    """
    v, d = weight.shape
    rows = max(1, min(v, LOGITS_TILE // d))
    n = v // rows
    dims = (((h.ndim - 1,), (1,)), ((), ()))

    def tile(j):  # [..., rows]
        w = unpack_bf16(jax.lax.dynamic_slice_in_dim(weight, j * rows, rows, axis=0))
        return cpu_aware_dot(h, w.astype(dtype), dims)

    y = jnp.moveaxis(jax.lax.map(tile, jnp.arange(n)), 0, -2)  # [..., n, rows]
    y = y.reshape(*h.shape[:-1], n * rows)
    if n * rows < v:
        rest = unpack_bf16(weight[n * rows :]).astype(dtype)
        y = jnp.concatenate([y, cpu_aware_dot(h, rest, dims)], axis=-1)
    return y


class Llm(nnx.Module):
    """`llm`: a *ForCausalLM (model + untied lm_head)."""

    def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs):
        self.model = LlmModel(cfg, rngs=rngs)
        # torch's layout [V, D] (`lm_head.weight` as stored): see layers.OutInDense
        self.lm_head = OutInDense(
            cfg.hidden_size,
            cfg.vocab_size,
            ("vocab", "embed"),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        self.cfg = cfg

    def embed(self, ids: jax.Array) -> jax.Array:
        """ids: int [B, T] -> [B, T, D] in the compute dtype (no scaling for Llama/Qwen)."""
        table = self.model.embed_tokens.embedding[...]
        if table.dtype == PACKED_BF16:  # gather the rows' bit patterns, then reinterpret them
            rows = unpack_bf16(jnp.take(table, ids.astype(jnp.int32), axis=0))
            return rows.astype(self.model.embed_tokens.dtype or rows.dtype)  # as nnx.Embed
        return self.model.embed_tokens(ids.astype(jnp.int32))

    def logits(self, h: jax.Array) -> jax.Array:
        """h: [B, T, D] final hidden (after norm) -> float32 [B, T, V] (HF casts logits to fp32)."""
        head = self.lm_head  # OutInDense, or its int8 / LoRA-wrapped stand-in
        if isinstance(head, OutInDense) and isinstance(head.weight.get_value(), LayerParts):
            # the CPU samplers' bf16 lm_head as row tiles (`generate.split_head`): each tile's
            # dot reads its own array in place
            dtype = head.dtype or jnp.bfloat16  # OutInDense's compute dtype
            h = h.astype(dtype)
            dims = (((h.ndim - 1,), (1,)), ((), ()))
            tiles = head.weight.get_value().parts
            y = [cpu_aware_dot(h, w.astype(dtype), dims) for w in tiles]
            return jnp.concatenate(y, axis=-1).astype(jnp.float32)
        if isinstance(head, OutInDense) and head.weight[...].dtype == PACKED_BF16:
            dtype = head.dtype or jnp.bfloat16  # OutInDense's compute dtype
            return tiled_logits(h.astype(dtype), head.weight[...], dtype).astype(jnp.float32)
        return head(h).astype(jnp.float32)

    def hidden(
        self,
        x_embeds: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        token_valid: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, D] and the updated cache.

        Args:
          x_embeds: [B, T, D] input embeddings (image rows already merged).
          positions: int32 [B, T] RoPE positions.
          cache: KVCache or None (None: attend within this call only).
          token_valid: bool [B, T]; False tokens are never attended as keys (default all True).
        """
        b, t, _ = x_embeds.shape
        if token_valid is None:
            token_valid = jnp.ones((b, t), bool)
        if cache is None:
            start = None
            causal = jnp.tril(jnp.ones((t, t), bool))  # [T, S=T]
            mask = (causal[None] & token_valid[:, None, :])[:, None]  # [B, 1, T, T]
        else:
            cache, start = cache.append(token_valid)
            mask = cache.mask(start, t)  # [B, 1, T, S]

        def step(carry, layer: DecoderLayer):
            # The whole cache is carried and each layer writes its own L slot in place
            # (dynamic_update_slice at the scan counter), so the scan never copies the cache.
            x, cache, i = carry
            x, cache = layer(x, positions, mask, cache, i, start)
            return constrain(x, ACT_AXES), cache, i + 1  # block boundary; no-op without a mesh

        carry = (x_embeds.astype(self.cfg.dtype), cache, jnp.zeros((), jnp.int32))
        x, cache, _ = scan_layers(step, carry, self.model.layers, self.cfg.remat)
        return self.model.norm(x), constrain_cache(cache)

    def __call__(
        self,
        x_embeds: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        token_valid: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """x_embeds [B, T, D], positions int32 [B, T] -> (float32 logits [B, T, V], cache)."""
        h, cache = self.hidden(x_embeds, positions, cache, token_valid)
        return self.logits(h), cache
