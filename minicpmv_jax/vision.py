"""navit SigLIP vision tower (`vpm`) over static padded patches.

Input is the processor's patch layout: `pixel_patches` [I, P, 588] with inner order (c, kh, kw),
bucketed `position_ids` [I, P] and the key mask `vision_mask` [I, P]. The conv patch embedding
(kernel = stride = 14) is a Dense layer over patch vectors (weights.py reshapes the conv kernel).
The encoder layers are one stack (parameters with a leading L axis, `encoder.layers.fc1.kernel`
[L, Dv, Fv]) run under one `nnx.scan`, optionally rematerialised (`VisionConfig.remat`).
Slices go through the tower `VisionConfig.batch_size` at a time (the official `vision_batch_size`,
16) inside the compiled program, so activation memory is that of one chunk, not of every slice
or video frame of a request.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax.config import VisionConfig
from minicpmv_jax.layers import (
    LayerNorm,
    attend,
    dense,
    embed,
    map_chunks,
    scan_layers,
    stack_layers,
)

# CPU backend: the tower skips the chunks of a slice bucket that hold only padding slices
# (`VisionTower.__call__`). Read at trace time; False runs every chunk (A/B measurements).
CPU_SKIP_PADDING_SLICES = True


# CPU bf16 with CPU_HEADS_FIRST off: the tower's attention runs 256 queries at a time
# (`layers.attend(q_block=...)`).
ATTENTION_Q_BLOCK = 256
# CPU backend: the tower's attention runs heads-first, a few heads at a time
# (`_attend_heads_first`; 1.17x / 1.34x bf16 / float32 time to first token at 2.6's full size).
# Read at trace time; False selects `layers.attend` (A/B measurements).
CPU_HEADS_FIRST = True
# `_attend_heads_first`: the float32 scores of one loop step stay under this many bytes, so they
# stay in the last-level cache (this CPU's L3: 32 MB) between the two products and the softmax.
HEADS_STEP_BYTES = 12 << 20


def heads_first(platform: str | None = None) -> bool:
    """Whether the tower's key-masked attention takes `_attend_heads_first` on `platform`
    ("cpu", "gpu", "tpu"; default: the current backend, read at trace time)."""
    return CPU_HEADS_FIRST and (platform or jax.default_backend()) == "cpu"


def heads_per_step(rows: int, p: int) -> int:
    """`_attend_heads_first`'s heads per loop step: the most that divide `rows` (slices x heads)
    with their float32 [P, P] scores under HEADS_STEP_BYTES, at least one."""
    g = max(1, min(rows, HEADS_STEP_BYTES // (p * p * 4)))
    while rows % g:
        g -= 1
    return g


def attend_heads(q, k, v, mask) -> jax.Array:
    """Softmax attention of operands with heads ahead of positions: q [..., T, H], k / v
    [..., S, H], mask bool broadcastable to [..., T, S] -> [..., T, H].

    The arithmetic of jax's "xla" `dot_product_attention` (and of `layers._attend_cpu` for
    bf16): scores with a float32 result, scaled by H^-0.5, masked to -0.7 x float32 max, float32
    softmax, the probabilities in the operand dtype, the second product with a float32 result.
    Both products are plain batched matmuls over the leading axes (`_attend_heads_first`, the
    4.6 tower's unit attention).
    """
    scale = jnp.float32(q.shape[-1] ** -0.5)
    s = jnp.einsum("...qh,...ph->...qp", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    out = jnp.einsum("...qp,...ph->...qh", p, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _attend_heads_first(q, k, v, mask) -> jax.Array:
    """Softmax attention of every (slice, head) pair in turn, a few pairs per loop step.

    The arithmetic of jax's "xla" `dot_product_attention` (and of `layers._attend_cpu` for
    bf16): scores with a float32 result, scaled, masked to -0.7 x float32 max, float32 softmax,
    the probabilities in the operand dtype, the second product with a float32 result. Only the
    schedule differs: heads go ahead of positions once, and a `jax.lax.map` step takes the
    whole attention of g heads (g * P * P float32 scores, under HEADS_STEP_BYTES), so scores,
    softmax and probabilities stay in cache. Over all heads at once (or 256 queries of every
    head) each of them was a pass over memory: 2.6's tower, 5 slices of 1152 patches, one layer
    on this CPU: bf16 316 -> 138 ms, float32 562 -> 173 ms.

    Args:
      q, k, v: [I, P, N, H]; mask: bool [I, 1, 1, P] (key mask).
    Returns: [I, P, N, H].
    """
    i, p, n, h = q.shape
    g = heads_per_step(i * n, p)

    def heads(a):  # [I, P, N, H] -> [I * N / g, g, P, H]
        return a.transpose(0, 2, 1, 3).reshape(i * n // g, g, p, h)

    mask = jnp.broadcast_to(mask, (i, n, 1, p)).reshape(i * n // g, g, 1, p)
    # one step: g heads, [g, P, H] x 3 and mask [g, 1, P] -> [g, P, H]
    out = jax.lax.map(lambda a: attend_heads(*a), (heads(q), heads(k), heads(v), mask))
    return out.reshape(i, n, p, h).transpose(0, 2, 1, 3)


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        self.patch_embedding = dense(cfg.patch_dim, cfg.hidden_size, ("patch", "vis_embed"), **kw)
        self.position_embedding = embed(
            cfg.patches_per_side**2, cfg.hidden_size, ("positions", "vis_embed"), **kw
        )

    def __call__(self, patches, position_ids):
        """patches [I, P, 588], position_ids int [I, P] -> [I, P, Dv]."""
        x = self.patch_embedding(patches.astype(self.patch_embedding.dtype))
        return x + self.position_embedding(position_ids.astype(jnp.int32))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        self.q_proj = dense(d, d, ("vis_embed", "vis_heads"), **kw)
        self.k_proj = dense(d, d, ("vis_embed", "vis_heads"), **kw)
        self.v_proj = dense(d, d, ("vis_embed", "vis_heads"), **kw)
        self.out_proj = dense(d, d, ("vis_heads", "vis_embed"), **kw)
        self.cfg = cfg

    def __call__(self, x, mask):
        """x [I, P, Dv], mask bool [I, 1, 1, P] (key mask; or any mask `layers.attend` takes,
        e.g. 4.6's window merger's [1, 1, P, P]) -> [I, P, Dv]."""
        i, p, _ = x.shape
        n, h = self.cfg.num_heads, self.cfg.head_dim
        q = self.q_proj(x).reshape(i, p, n, h)  # [I, P, N, H]
        k = self.k_proj(x).reshape(i, p, n, h)
        v = self.v_proj(x).reshape(i, p, n, h)
        # Official eager path: scores * H^-0.5 + additive mask, softmax in float32.
        if heads_first() and mask.shape[-2] == 1:  # a key mask (4.6's merger passes [.., P, P])
            out = _attend_heads_first(q, k, v, mask)  # [I, P, N, H]
        else:
            out = attend(q, k, v, mask, q_block=ATTENTION_Q_BLOCK)  # [I, P, N, H]
        return self.out_proj(out.reshape(i, p, n * h))


class VisionMlp(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, ("vis_embed", "vis_mlp"), **kw)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, ("vis_mlp", "vis_embed"), **kw)

    def __call__(self, x):
        # hidden_act = gelu_pytorch_tanh (tanh-approximate GELU).
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class VisionLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        nkw = {"param_dtype": cfg.param_dtype, "rngs": rngs, "name": "vis_embed"}
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **nkw)
        self.self_attn = VisionAttention(cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **nkw)
        self.mlp = VisionMlp(cfg, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.layers = stack_layers(lambda r: VisionLayer(cfg, rngs=r), cfg.num_layers, rngs)


class VisionTower(nnx.Module):
    """`vpm`: embeddings -> encoder layers -> post_layernorm (= `last_hidden_state`)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.embeddings = VisionEmbeddings(cfg, rngs=rngs)
        self.encoder = VisionEncoder(cfg, rngs=rngs)
        self.post_layernorm = LayerNorm(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
            name="vis_embed",
        )
        self.cfg = cfg

    def __call__(
        self,
        patches: jax.Array,
        position_ids: jax.Array,
        key_mask: jax.Array,
        slice_valid: jax.Array | None = None,
    ):
        """Vision features of every patch slot.

        Args:
          patches: float [I, P, 588] patch vectors, inner order (c, kh, kw).
          position_ids: int [I, P] rows of the 70 x 70 position table.
          key_mask: bool [I, P] keys each query may attend (2.6/4.5: patch < h*w; 2.5 quirk:
            patch < maxL of the whole call). Each row needs at least one True.
          slice_valid: optional bool [I], False for a padding slice (a slice bucket's): on the
            CPU backend a chunk of padding slices only is skipped (`CPU_SKIP_PADDING_SLICES`),
            its rows zero (80 slices in bucket 128: 5 of 8 chunks run).
        Returns: [I, P, Dv] in the compute dtype (padded rows are computed, not meaningful).
        """
        xs, pads, size = (patches, position_ids, key_mask), (0, 0, True), self.cfg.batch_size
        if (
            slice_valid is not None
            and xs[0].shape[0] > size
            and CPU_SKIP_PADDING_SLICES
            and jax.default_backend() == "cpu"
        ):  # a compute-bound CPU skips the chunks that hold only padding slices
            return map_chunks(self._encode, xs, size, pads, slice_valid)
        # padding slices of the last chunk attend every key (finite), then are dropped
        return map_chunks(self._encode, xs, size, pads)

    def _encode(self, patches, position_ids, key_mask):
        """One chunk of slices: [R, P, 588], [R, P], [R, P] -> [R, P, Dv]."""
        x = self.embeddings(patches, position_ids).astype(self.cfg.dtype)
        mask = key_mask[:, None, None, :]  # [R, 1, 1, P]
        x = scan_layers(lambda x, layer: layer(x, mask), x, self.encoder.layers, self.cfg.remat)
        return self.post_layernorm(x)
