"""The 4.6 projector (`model.merger`, `MiniCPMV4_6Merger`): 2x2 neighbouring vision tokens
concatenated (dy, dx, channel order) -> LayerNorm -> Linear -> exact GELU -> Linear to the LLM
width. Each unit's tokens shrink 4x."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax.layers import LayerNorm, dense
from minicpmv_jax.v46.config import MiniCPMV46Config


class DownsampleMlp(nnx.Module):
    def __init__(self, cfg: MiniCPMV46Config, *, rngs: nnx.Rngs):
        d4, dl = 4 * cfg.vision.hidden_size, cfg.llm.hidden_size
        v = cfg.vision
        kw = {"dtype": v.dtype, "param_dtype": v.param_dtype, "rngs": rngs}
        self.pre_norm = LayerNorm(d4, 1e-6, param_dtype=v.param_dtype, rngs=rngs, name="vis_embed")
        self.linear_1 = dense(d4, d4, ("vis_embed", "vis_mlp"), **kw)
        self.linear_2 = dense(d4, dl, ("vis_mlp", "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(self.pre_norm(x)), approximate=False))


class Projector(nnx.Module):
    """`model.merger`: `mlp.0` is the single (merger_times = 1) downsample stage."""

    def __init__(self, cfg: MiniCPMV46Config, *, rngs: nnx.Rngs):
        self.mlp = nnx.List([DownsampleMlp(cfg, rngs=rngs)])

    def __call__(self, x: jax.Array, merge_index: jax.Array) -> jax.Array:
        """x [U, M, Dv]; merge_index int [U, M]: rows of each 2x2 group, (dy, dx) inner order,
        groups in raster order of the unit's grid. Returns [U, M/4, D]."""
        u, m, d = x.shape
        g = jnp.take_along_axis(x, merge_index[..., None], axis=1).reshape(u, m // 4, 4 * d)
        return self.mlp[0](g)
