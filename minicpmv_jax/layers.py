"""Shared building blocks: dense(), RMSNorm, LayerNorm, RoPE and the attention switch attend()."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def dense(
    din: int,
    dout: int,
    names: tuple[str | None, str | None],
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    bias: bool = True,
) -> nnx.Linear:
    """nnx.Linear whose kernel [din, dout] and bias [dout] carry logical axis names."""
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        rngs=rngs,
    )


def param(shape, names, *, param_dtype, rngs: nnx.Rngs, init=None) -> nnx.Param:
    """A raw parameter with logical axis names (used for `resampler.query` / `resampler.proj`)."""
    init = init or nnx.initializers.normal(0.02)
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, param_dtype))


def embed(num: int, dim: int, names, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """nnx.Embed with table [num, dim] (checkpoint layout, no transpose)."""
    return nnx.Embed(
        num,
        dim,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), names),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """HF Llama/Qwen RMSNorm: normalise in float32, cast back to the input dtype, then * weight."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs, name: str = "norm"):
        self.scale = nnx.Param(
            nnx.with_partitioning(nnx.initializers.ones_init(), (name,))(
                rngs.params(), (dim,), param_dtype
            )
        )
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> [..., dim] in x.dtype."""
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # HF: `weight * hidden_states.to(input_dtype)`: the cast happens before the scale.
        return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias; statistics in float32 (as torch's LayerNorm kernel)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs, name: str = "norm"):
        init = nnx.with_partitioning
        self.scale = nnx.Param(
            init(nnx.initializers.ones_init(), (name,))(rngs.params(), (dim,), param_dtype)
        )
        self.bias = nnx.Param(
            init(nnx.initializers.zeros_init(), (name,))(rngs.params(), (dim,), param_dtype)
        )
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> [..., dim] in x.dtype."""
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE (HF `apply_rotary_pos_emb`), computed in float32.

    Args:
      x: [B, T, N, H].
      positions: int32 [B, T].
    Returns: [B, T, N, H] in x.dtype.
    """
    h = x.shape[-1]
    # HF: inv_freq = 1 / theta ** (arange(0, H, 2).float() / H), float32.
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : h // 2], xf[..., h // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, impl: str = "xla", scale=None
) -> jax.Array:
    """Grouped-query attention, softmax in float32.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] (N a multiple of K).
      mask: bool, broadcastable to [B, N, T, S]; True = attend.
      impl: "xla" (jax.nn.dot_product_attention, any backend), "cudnn" (GPU, bf16/fp16),
        "splash" (TPU Pallas splash attention for prefill) or "reference" (plain jnp); see
        kernels.py.
    Returns: [B, T, N, H].
    """
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    from minicpmv_jax import kernels  # Pallas imports only when a kernel is asked for

    return kernels.attention(q, k, v, mask, impl=impl, scale=scale)
