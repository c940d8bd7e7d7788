"""KV cache pytree: fixed-size key/value buffers plus a per-slot validity mask.

Convention (STYLE §6): one write index `end` shared by the batch; every row has its own RoPE
positions; padded slots stay invalid and are never attended.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from minicpmv_jax.config import LlmConfig


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    end: jax.Array  # int32[]: first free slot, shared by the batch
    valid: jax.Array  # bool[B, S]: slot holds a real token (pads stay False)

    @classmethod
    def init(cls, cfg: LlmConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        """Empty cache of `max_len` slots for `batch` rows (dtype defaults to cfg.dtype)."""
        dtype = dtype if dtype is not None else cfg.dtype
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            end=jnp.zeros((), jnp.int32),
            valid=jnp.zeros((batch, max_len), bool),
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def append(self, token_valid: jax.Array) -> tuple[KVCache, jax.Array]:
        """Reserve T slots for token_valid bool[B, T]; returns (cache, start) with start = old end."""
        valid = jax.lax.dynamic_update_slice(self.valid, token_valid.astype(bool), (0, self.end))
        return self.replace(end=self.end + token_valid.shape[1], valid=valid), self.end

    def mask(self, start: jax.Array, t: int) -> jax.Array:
        """bool[B, 1, T, S]: query i (slot start + i) attends valid slots <= start + i."""
        causal = jnp.arange(self.max_len)[None, :] <= start + jnp.arange(t)[:, None]  # [T, S]
        return (self.valid[:, None, :] & causal[None])[:, None]

    def write(self, layer: int, start: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """Store k, v [B, T, K, H] of one layer at slots [start, start + T)."""

        def put(buf, x):
            return jax.lax.dynamic_update_slice(
                buf, x[None].astype(buf.dtype), (layer, 0, start, 0, 0)
            )

        return self.replace(k=put(self.k, k), v=put(self.v, v))
