"""Qwen3.5 hybrid text model (`Qwen3_5TextModel`) and its hybrid cache.

Layers follow `layer_types`: "linear_attention" (Gated DeltaNet, deltanet.py) or
"full_attention" (softmax attention with a sigmoid output gate split per head from q_proj,
zero-centred q/k norms and partial rotary). Norms are zero-centred RMSNorms, `(1 + w)`.
The LM head is the tied token embedding.

HybridCache: K/V for the full-attention layers (the KVCache convention: one shared write index,
per-slot validity, so left-padded rows are never attended), plus the conv and float32 recurrent
states of the DeltaNet layers. Prompts are left-padded: pads are zeroed before every DeltaNet layer
and leave its (zero) state unchanged, so the state after a padded prefill is the state of the
prompt alone.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.layers import attend, cpu_aware_dot, dense, embed, rope, unpack_bf16
from minicpmv_jax.llm import Mlp
from minicpmv_jax.sharding import ACT_AXES, constrain
from minicpmv_jax.v46.config import Qwen35Config
from minicpmv_jax.v46.deltanet import GatedDeltaNet


class ZeroCentredRMSNorm(nnx.Module):
    """`Qwen3_5RMSNorm`: rmsnorm(x) * (1 + w) in float32, cast back at the end."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs, name: str = "norm"):
        init = nnx.with_partitioning(nnx.initializers.zeros_init(), (name,))
        self.scale = nnx.Param(init(rngs.params(), (dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def partial_rope(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """Rotate-half RoPE on the first `rotary_dim` dims of x [B, T, N, H]; the rest pass through."""
    return jnp.concatenate(
        [rope(x[..., :rotary_dim], positions, theta), x[..., rotary_dim:]], axis=-1
    )


class GatedAttention(nnx.Module):
    """`self_attn` (`Qwen3_5Attention`): q_proj gives [query | gate] per head; the attention
    output is multiplied by sigmoid(gate) before o_proj."""

    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs, "bias": False}
        self.q_proj = dense(d, n * h * 2, ("embed", "q_heads"), **kw)
        self.k_proj = dense(d, k * h, ("embed", "kv_heads"), **kw)
        self.v_proj = dense(d, k * h, ("embed", "kv_heads"), **kw)
        self.o_proj = dense(n * h, d, ("q_heads", "embed"), **kw)
        nkw = {"param_dtype": cfg.param_dtype, "rngs": rngs, "name": "head_dim"}
        self.q_norm = ZeroCentredRMSNorm(h, cfg.rms_norm_eps, **nkw)
        self.k_norm = ZeroCentredRMSNorm(h, cfg.rms_norm_eps, **nkw)
        self.cfg = cfg

    def __call__(self, x, positions, mask, cache: KVCache | None, layer: int, start):
        """x [B, T, D]; positions int32 [B, T]; mask bool [B, 1, T, S] -> ([B, T, D], cache)."""
        c, (b, t, _) = self.cfg, x.shape
        qg = self.q_proj(x).reshape(b, t, c.num_heads, 2 * c.head_dim)
        q, gate = qg[..., : c.head_dim], qg[..., c.head_dim :]
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        q = partial_rope(q, positions, c.rotary_dim, c.rope_theta)
        k = partial_rope(k, positions, c.rotary_dim, c.rope_theta)
        if cache is not None:
            cache = cache.write(layer, start, k, v)
            k, v = cache.k[layer], cache.v[layer]
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)  # [B, T, N, H]
        out = out * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(out.dtype)
        return self.o_proj(out.reshape(b, t, -1)), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen35Config, kind: str, *, rngs: nnx.Rngs):
        nkw = {"param_dtype": cfg.param_dtype, "rngs": rngs, "name": "embed"}
        if kind == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, rngs=rngs)
        else:
            self.self_attn = GatedAttention(cfg, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.input_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **nkw)
        self.post_attention_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **nkw)
        self.kind = kind


@flax.struct.dataclass
class HybridCache:
    kv: KVCache  # full-attention layers only: k, v [Lf, B, S, K, H]
    conv: jax.Array  # [Ll, B, conv_dim, K] last pre-conv q|k|v columns of each DeltaNet layer
    rec: jax.Array  # float32 [Ll, B, Hv, dk, dv] delta-rule state of each DeltaNet layer

    @classmethod
    def init(cls, cfg: Qwen35Config, batch: int, max_len: int, dtype=None) -> HybridCache:
        dtype = dtype if dtype is not None else cfg.dtype
        nf = cfg.layer_types.count("full_attention")
        nl = cfg.num_layers - nf
        kshape = (nf, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        kv = KVCache(
            k=jnp.zeros(kshape, dtype),
            v=jnp.zeros(kshape, dtype),
            end=jnp.zeros((), jnp.int32),
            valid=jnp.zeros((batch, max_len), bool),
        )
        hv, dk, dv = cfg.lin_num_value_heads, cfg.lin_key_head_dim, cfg.lin_value_head_dim
        return cls(
            kv=kv,
            conv=jnp.zeros((nl, batch, cfg.conv_dim, cfg.conv_kernel), dtype),
            rec=jnp.zeros((nl, batch, hv, dk, dv), jnp.float32),
        )

    @property
    def max_len(self) -> int:
        return self.kv.max_len

    def reorder(self, rows: jax.Array) -> HybridCache:
        """Cache of the rows `rows` int [B'] (beam search: K/V and recurrent states follow)."""
        kv = self.kv.replace(k=self.kv.k[:, rows], v=self.kv.v[:, rows], valid=self.kv.valid[rows])
        return self.replace(kv=kv, conv=self.conv[:, rows], rec=self.rec[:, rows])


class Qwen35TextModel(nnx.Module):
    """`model.language_model`: embed_tokens, hybrid layers, final norm; tied LM head."""

    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs):
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        self.embed_tokens = embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
        self.layers = nnx.List([DecoderLayer(cfg, kind, rngs=rngs) for kind in cfg.layer_types])
        self.norm = ZeroCentredRMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs, name="embed"
        )
        self.cfg = cfg

    def embed(self, ids: jax.Array, bits: jax.Array | None = None) -> jax.Array:
        """ids int [B, T] -> [B, T, D]. bits: the bf16 table's uint16 bit patterns (the CPU
        programs': XLA:CPU widens a bf16 table that a gather reads to float32 first, the
        whole table), gathered and reinterpreted; None: the table itself."""
        if bits is not None:
            rows = unpack_bf16(jnp.take(bits, ids.astype(jnp.int32), axis=0))
            return rows.astype(self.embed_tokens.dtype or rows.dtype)  # as nnx.Embed
        return self.embed_tokens(ids.astype(jnp.int32))

    def logits(self, h: jax.Array) -> jax.Array:
        """h [B, T, D] -> float32 [B, T, V] through the tied embedding.

        The [V, D] table is the dot's left operand as stored: written as `h @ table.T`
        (`Embed.attend`), XLA:CPU copies the whole transposed table (1 GB in float32 at the
        released size) on every call at batch 1, i.e. every decode step.

        A bf16 table is the right operand of `layers.cpu_aware_dot` instead (on CPU a float32
        result, a single row taken as two), which reads it in place: the plain bf16 einsum
        made XLA:CPU widen the table to float32 (twice, transposed) ahead of the decode
        loop."""
        table = self.embed_tokens.embedding[...]
        if table.dtype == jnp.bfloat16 and self.cfg.dtype == jnp.bfloat16:
            y = cpu_aware_dot(h.astype(jnp.bfloat16), table, (((h.ndim - 1,), (1,)), ((), ())))
            return y.astype(jnp.float32)
        e = table.astype(self.cfg.dtype)
        return jnp.einsum("vd,btd->btv", e, h.astype(self.cfg.dtype)).astype(jnp.float32)

    def hidden(self, x, positions, cache: HybridCache | None = None, token_valid=None):
        """Final-norm hidden states [B, T, D] and the updated cache.

        Args:
          x: [B, T, D] input embeddings; positions: int32 [B, T].
          cache: HybridCache or None (None: this call alone, from zero states).
          token_valid: bool [B, T] (False = left padding); default all True.
        """
        cfg, (b, t, _) = self.cfg, x.shape
        if token_valid is None:
            token_valid = jnp.ones((b, t), bool)
        if cache is None:
            work = HybridCache.init(cfg, b, t, x.dtype)
        else:
            work = cache
        kv, start = work.kv.append(token_valid)
        mask = kv.mask(start, t)  # [B, 1, T, S]
        convs, recs = [], []
        x = x.astype(cfg.dtype)
        fi = li = 0
        for layer in self.layers:
            h = layer.input_layernorm(x)
            if layer.kind == "linear_attention":
                h, conv, rec = layer.linear_attn(h, token_valid, work.conv[li], work.rec[li])
                convs.append(conv)
                recs.append(rec)
                li += 1
            else:
                h, kv = layer.self_attn(h, positions, mask, kv, fi, start)
                fi += 1
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            x = constrain(x, ACT_AXES)
        x = self.norm(x)
        if cache is None:
            return x, None
        conv = jnp.stack(convs) if convs else work.conv
        rec = jnp.stack(recs) if recs else work.rec
        return x, HybridCache(kv=kv, conv=conv, rec=rec)
