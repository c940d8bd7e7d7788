"""Attention kernels behind one switch, each checked against a plain jnp reference.

`attention(q, k, v, mask, impl=...)` takes the layout of `layers.attend` (q [B, T, N, H], k / v
[B, S, K, H], bool mask broadcastable to [B, N, T, S], True = attend) and dispatches to:

* "reference": einsum + float32 softmax in plain jnp (the yardstick of the tests);
* "xla": `jax.nn.dot_product_attention(implementation="xla")`, any backend;
* "cudnn": the same call with `implementation="cudnn"` (GPU, bf16 / fp16 only: cuDNN flash
  attention; raises on unsupported shapes or dtypes);
* "splash": TPU Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`),
  block-sparse causal flash attention; padded / masked keys become segment id 0. Under a device
  mesh it runs per device inside `jax.shard_map` (rows and heads split as the rule table says).
  Off TPU it runs in Pallas interpret mode (slow; for tests only).

Splash encodes the mask structurally (causal block sparsity + per-key validity), not as a dense
array. `attention(.., impl="splash")` therefore assumes the mask of a *prefill from slot 0*:
`mask[b, :, i, j] = valid[b, j] & (j <= i)`, which is what `KVCache.mask(start=0, T)` and the
cache-free prompt forward build; it reads `valid` from the mask's last query row. Calls with a
single query (decode, T = 1) go to "xla": decode attention is a memory-bound matrix-vector
product where a flash kernel buys nothing.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from minicpmv_jax import sharding

IMPLS = ("reference", "xla", "cudnn", "splash")
_SPLASH_BLOCK = 128  # TPU lane width: splash block sizes are multiples of it


def reference_attention(q, k, v, mask, *, scale: float | None = None) -> jax.Array:
    """Grouped-query attention in plain jnp, float32 softmax.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K.
      mask: bool, broadcastable to [B, N, T, S]; True = attend.
    Returns: [B, T, N, H] in q.dtype; a query row with no key attended returns zeros.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    qf = q.astype(jnp.float32).reshape(b, t, kh, g, h)  # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(jnp.float32)) * scale
    m = jnp.broadcast_to(mask, (b, n, t, s)).reshape(b, kh, g, t, s)  # [B, K, G, T, S]
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(m.any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(jnp.float32))  # [B, T, K, G, H]
    return out.reshape(b, t, n, h).astype(q.dtype)


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    size = x.shape[axis]
    extra = -size % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, t: int, s: int, causal: bool, interpret: bool):
    """A splash MHA kernel for [N, T, H] queries and [K, S, H] keys (N % K == 0), cached."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    one = sa.CausalMask((t, s)) if causal else sa.FullMask((t, s))
    mask = sa.MultiHeadMask([one] * num_heads)
    blk = lambda n: math.gcd(n, 512)  # a multiple of 128 dividing the (padded) length
    sizes = sa.BlockSizes(
        block_q=blk(t), block_kv=blk(s), block_kv_compute=blk(s),
        block_q_dkv=blk(t), block_kv_dkv=blk(s), block_kv_dkv_compute=blk(s),
        block_q_dq=blk(t), block_kv_dq=blk(s),
    )  # fmt: skip
    # concrete mask tables even when first built inside a trace (jit, shard_map): the kernel is
    # cached and reused by later traces
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(
            mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
        )


def splash_attention(
    q, k, v, kv_valid, *, causal: bool = True, scale: float | None = None, interpret=None
) -> jax.Array:
    """Splash attention of a prefill from slot 0 (TPU Pallas; interpret mode elsewhere).

    Under a device mesh (`jax.set_mesh` with the ("data", "fsdp", "tensor") axes, as the model's
    programs run) the kernel runs per device under `jax.shard_map`: a Pallas call is a custom
    call that the SPMD partitioner cannot split, so each device gets its own rows (batch over
    data x fsdp) and heads (q and kv heads over tensor, when both counts divide it; grouped
    heads stay together because both are split into the same number of contiguous blocks).

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] (N % K == 0).
      kv_valid: bool [B, S]: keys that may be attended (invalid keys get segment id 0).
      causal: key j is attended by query i only when j <= i (top-left aligned, offset 0).
      interpret: run the Pallas kernel in interpret mode (default: when not on TPU).
    Returns: [B, T, N, H] in q.dtype.
    """
    h = q.shape[-1]
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    local = functools.partial(_splash_local, causal=causal, scale=scale, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(sharding.MESH_AXES) <= set(mesh.axis_names):
        return local(q, k, v, kv_valid)
    q_spec = sharding.spec_for(("batch", None, "q_heads", None), q.shape, mesh)
    kv_spec = sharding.spec_for(("batch", None, "kv_heads", None), k.shape, mesh)
    if q_spec[2] != kv_spec[2]:  # one head count does not divide: keep all heads together
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)),
        out_specs=q_spec,
        check_vma=False,  # the Pallas call has no replication rule; every output is sharded
    )(q, k, v, kv_valid)


def _splash_local(q, k, v, kv_valid, *, causal: bool, scale: float, interpret: bool):
    """`splash_attention` on the arrays of one device (same layouts, local batch and heads)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, n, _ = q.shape
    # pad T and S to the 128-wide blocks; padded keys are invalid, padded queries are dropped
    qp = _pad_to((q * scale).astype(q.dtype), 1, _SPLASH_BLOCK).transpose(0, 2, 1, 3)
    kp = _pad_to(k, 1, _SPLASH_BLOCK).transpose(0, 2, 1, 3)  # [B, K, Sp, H]
    vp = _pad_to(v, 1, _SPLASH_BLOCK).transpose(0, 2, 1, 3)
    valid = _pad_to(kv_valid.astype(jnp.int32), 1, _SPLASH_BLOCK)  # [B, Sp]
    tp, sp = qp.shape[2], kp.shape[2]
    kernel = _splash_kernel(n, tp, sp, causal, bool(interpret))
    seg = sa.SegmentIds(q=jnp.ones((b, tp), jnp.int32), kv=valid)
    out = jax.vmap(kernel)(qp, kp.astype(q.dtype), vp.astype(q.dtype), segment_ids=seg)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)  # [B, T, N, H]


def attention(q, k, v, mask, *, impl: str = "xla", scale: float | None = None) -> jax.Array:
    """The attention switch (layout and mask as `layers.attend`); see the module docstring."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLS}")
    if impl == "reference":
        return reference_attention(q, k, v, mask, scale=scale)
    if impl == "splash":
        if q.shape[1] == 1:
            impl = "xla"  # decode step: memory bound, see the module docstring
        else:
            b, s = k.shape[0], k.shape[1]
            kv_valid = jnp.broadcast_to(mask, (b, 1, q.shape[1], s))[:, 0, -1, :]  # [B, S]
            return splash_attention(q, k, v, kv_valid, causal=True, scale=scale)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
