"""Per-device memory plan: parameters, KV cache and peak activations for a mesh and request.

`plan(config, mesh_shape, batch=..., cache_len=...)` needs no devices: parameter shapes come
from the model code under `nnx.eval_shape` (the layer stacks are single [L, ...] parameters) and
their logical names go through the same `sharding.rules_for` table (with its
fallbacks) that loading uses, so the parameter and KV-cache numbers are exact per-device shard
sizes. Activations are an analytic estimate of the largest set live at once in a prefill with
the XLA attention path (the one that materialises [N, T, S] scores); XLA fusion usually needs
less, collective buffers and the compiled program's code are not counted. On the CPU backend the vision tower's attention
holds the scores of a few heads at a time (`vision._attend_heads_first`). Vision activations
count every slice's inputs and tower output plus ONE chunk of `vision_batch_size` slices in the
tower and resampler (they run chunk by chunk); they agree with XLA's memory analysis of the
compiled vision program within 25% (tests/test_vision_memory.py).

`markdown_table(...)` renders the README table (`python -m minicpmv_jax.memory`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from minicpmv_jax import quant as quant_lib
from minicpmv_jax import vision
from minicpmv_jax.config import MiniCPMVConfig
from minicpmv_jax.sharding import (
    ACT_AXES,
    CACHE_AXES,
    CACHE_VALID_AXES,
    MESH_AXES,
    RULES,
    Rules,
    logical_names,
    mesh_shape,
    rules_for,
    spec_for,
)

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device (the largest over devices; shardings here are even)."""

    mesh: dict[str, int]
    params: int
    kv_cache: int
    activations: int
    detail: dict[str, Any]

    @property
    def total(self) -> int:
        return self.params + self.kv_cache + self.activations

    def fits(self, hbm_bytes: int, headroom: float = 0.9) -> bool:
        """Whether the plan fits `headroom` of a device's memory (XLA needs some slack)."""
        return self.total <= headroom * hbm_bytes


@functools.lru_cache(maxsize=8)
def param_inventory(config: MiniCPMVConfig) -> tuple[tuple[str, tuple, Any, tuple], ...]:
    """((path, shape, dtype, logical names), ...) of every parameter of the model.

    Built under `nnx.eval_shape` (no memory). Layer stacks are single parameters with a leading
    L axis named "layers" (replicated by `RULES`), as the model holds them.
    """
    from minicpmv_jax.model import MiniCPMVModule
    from minicpmv_jax.weights import path_name

    mesh = AbstractMesh((1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    with jax.sharding.use_abstract_mesh(mesh), nnx.logical_axis_rules(RULES):
        module = nnx.eval_shape(lambda: MiniCPMVModule(config, rngs=nnx.Rngs(0)))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        v = var.get_value()
        names = logical_names(var) or (None,) * len(v.shape)
        out.append((path_name(path), tuple(v.shape), v.dtype, names))
    return tuple(out)


def _shard_elems(shape: Sequence[int], names, mesh: dict[str, int], rules: Rules) -> int:
    """Elements of one device's shard of an array laid out by `rules`."""
    spec = spec_for(names, shape, mesh, rules)
    n = 1
    for dim, entry in zip(shape, tuple(spec) + (None,) * len(shape), strict=False):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        n *= -(-dim // math.prod(mesh[a] for a in axes))
    return n


def _div(names, shape, mesh, rules) -> list[int]:
    spec = spec_for(names, shape, mesh, rules)
    out = []
    for entry in tuple(spec) + (None,) * (len(shape) - len(spec)):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        out.append(math.prod(mesh[a] for a in axes))
    return out


def plan(
    config: MiniCPMVConfig,
    mesh: Any = (1, 1, 1),
    *,
    batch: int = 1,
    cache_len: int = 4096,
    prompt_len: int | None = None,
    num_slices: int = 0,
    patch_bucket: int = 1024,
    param_dtype: Any = None,
    dtype: Any = None,
    cache_dtype: Any = None,
    full_logits: bool = False,
    quant: Any = None,
    strict: bool = False,
    platform: str | None = None,
) -> MemoryPlan:
    """Per-device bytes of parameters, KV cache and peak activations.

    Args:
      config: a preset (config.MINICPM_V_2_6, ...) or a loaded model's config.
      mesh: (data, fsdp, tensor), {axis: size}, a Mesh or an AbstractMesh.
      batch: B rows; cache_len: S KV slots per row (prompt bucket + new tokens).
      prompt_len: T tokens of the prefill (default cache_len - 256, at least 1).
      num_slices, patch_bucket: I image slices (the slice bucket) of P patches encoded in the
        prefill (0 = text); the config's vision batch size sets the chunk.
      param_dtype, dtype, cache_dtype: override the config's parameter / compute dtypes and
        the cache dtype (default: compute dtype).
      full_logits: count [B, T, V] float32 logits (prompt_logits) instead of the last row only.
      quant: None, "int8", "int8+vision" or a quant.QuantConfig: the dense kernels it selects
        count as int8 plus a float32 per-output-channel scale (quant.py).
      platform: the backend the programs run on ("cpu", "gpu", "tpu"): the CPU's vision
        attention holds fewer scores (`vision.heads_first`). Default: the devices of a `Mesh`,
        otherwise the current backend.
    """
    shape = mesh_shape(mesh)
    if platform is None:
        platform = (
            mesh.devices.flat[0].platform
            if isinstance(mesh, jax.sharding.Mesh)
            else jax.default_backend()
        )
    rules = rules_for(config, shape, strict=strict)
    llm, vis = config.llm, config.vision
    pdt = jnp.dtype(param_dtype) if param_dtype is not None else None
    cdt = jnp.dtype(dtype if dtype is not None else llm.dtype)
    kdt = jnp.dtype(cache_dtype if cache_dtype is not None else cdt)
    t = prompt_len if prompt_len is not None else max(cache_len - 256, 1)

    qcfg = quant_lib.parse(quant)
    params = 0
    for name, pshape, pdtype, names in param_inventory(config):
        itemsize = (pdt or jnp.dtype(pdtype)).itemsize
        module, _, leaf = name.rpartition(".")
        if qcfg is not None and leaf in quant_lib.OUT_AXIS and qcfg.selects(module):
            # int8 kernel [(L,) in, out] (torch-layout weight [(L,) out, in]) + float32 scale
            axis = quant_lib.OUT_AXIS[leaf]
            itemsize = 1
            scale_shape = quant_lib.scale_shape(pshape, axis)
            scale_names = tuple(names)[:-2] + (tuple(names)[axis],)
            params += _shard_elems(scale_shape, scale_names, shape, rules) * 4
        params += _shard_elems(pshape, names, shape, rules) * itemsize

    kv_shape = (llm.num_layers, batch, cache_len, llm.num_kv_heads, llm.head_dim)
    kv = 2 * _shard_elems(kv_shape, CACHE_AXES, shape, rules) * kdt.itemsize
    kv += _shard_elems((batch, cache_len), CACHE_VALID_AXES, shape, rules)  # valid: bool

    # Per-device sizes of the activation dims: batch follows act_batch, heads / widths the
    # tensor-parallel split their weights get.
    b = -(-batch // _div(ACT_AXES, (batch, t, llm.hidden_size), shape, rules)[0])
    table = dict(rules)

    def split(name: str, size: int) -> int:
        target = table.get(name)
        axes = () if target is None else ((target,) if isinstance(target, str) else target)
        return -(-size // math.prod(shape[a] for a in axes))

    d, h, f32 = llm.hidden_size, llm.head_dim, 4
    n, k, f = (
        split("q_heads", llm.num_heads),
        split("kv_heads", llm.num_kv_heads),
        split("mlp", llm.intermediate_size),
    )
    resid = 2 * b * t * d * cdt.itemsize  # residual stream + block output
    qkv = b * t * (n + 2 * k) * h * cdt.itemsize
    scores = 2 * b * n * t * cache_len * f32  # float32 logits + probabilities [B, N, T, S]
    attn_out = b * t * n * h * cdt.itemsize
    mlp = 3 * b * t * f * cdt.itemsize  # gate, up, product [B, T, F]
    v = split("vocab", llm.vocab_size)
    logits = b * (t if full_logits else 1) * v * f32
    llm_peak = resid + max(qkv + scores + attn_out, mlp) + logits

    vision_peak = 0
    if num_slices:
        i, p, dv, cb = num_slices, patch_bucket, vis.hidden_size, cdt.itemsize
        # tower and resampler run c slices at a time (lax.map over chunks, vision_batch_size)
        c = min(vis.batch_size, i)
        nv, fv = split("vis_heads", vis.num_heads), split("vis_mlp", vis.intermediate_size)
        # every slice: patches float32, position ids int32, two bool masks (a padded copy when
        # the chunk size does not divide I); the tower output that feeds the resampler
        inputs = i * p * (vis.patch_dim * f32 + 4 + 2) * (2 if i % c else 1)
        feats = i * p * dv * cb
        # one chunk of the tower: residual + block output, q / k / v, and three float32
        # [N, P, P] buffers per slice in XLA's attention (scores, masked scores, probabilities)
        x = 2 * c * p * dv * cb
        v_attn = 3 * c * p * nv * vis.head_dim * cb + 3 * c * nv * p * p * f32
        # CPU: heads-first copies of q / k / v and of the output, the float32 scores of a few
        # heads at a time (`vision._attend_heads_first`)
        if vision.heads_first(platform):
            g = vision.heads_per_step(c * nv, p)
            v_attn = 7 * c * p * nv * vis.head_dim * cb + 3 * g * p * p * f32
        v_mlp = 2 * c * p * fv * cb
        # one chunk of the resampler: kv, keys (+ position terms), values [c, P, D], float32
        # [N, Q, P] scores and exponentials; per-slice softmax partials of every slice
        res = config.resampler
        nr = split("q_heads", res.num_heads)
        r = 4 * c * p * d * cb + 2 * c * nr * res.num_queries * p * f32
        partials = i * nr * res.num_queries * (res.head_dim + 2) * f32
        vision_peak = inputs + feats + partials + max(x + max(v_attn, v_mlp), r)
    activations = max(llm_peak, vision_peak)
    detail = {
        "rules": rules,
        "prompt_len": t,
        "llm_activations": llm_peak,
        "vision_activations": vision_peak,
        "attention_scores": scores,
    }
    return MemoryPlan(shape, params, kv, activations, detail)


# ------------------------------------------------------------------------------------------------
# README table
# ------------------------------------------------------------------------------------------------

# (name, devices, HBM bytes per device, mesh (data, fsdp, tensor))
SLICES = (
    ("v5e-1", 1, 16 * GiB, (1, 1, 1)),
    ("v5e-4", 4, 16 * GiB, (1, 1, 4)),
    ("v5e-8", 8, 16 * GiB, (1, 2, 4)),
    ("v6e-1", 1, 32 * GiB, (1, 1, 1)),
    ("v6e-4", 4, 32 * GiB, (1, 1, 4)),
    ("1x H100", 1, 80 * GiB, (1, 1, 1)),
    ("2x H100", 2, 80 * GiB, (1, 1, 2)),
    ("4x H100", 4, 80 * GiB, (1, 1, 4)),
    ("8x H100", 8, 80 * GiB, (1, 2, 4)),
)


def markdown_table(
    presets: dict[str, MiniCPMVConfig],
    slices=SLICES,
    requests: Sequence[dict] = (
        # one image of 9 slices + its source image per conversation, 1024-patch bucket
        {"batch": 1, "cache_len": 4096, "prompt_len": 2048, "num_slices": 10},
        {"batch": 8, "cache_len": 4096, "prompt_len": 2048, "num_slices": 80},
    ),
    quant: Any = None,
) -> str:
    """Markdown table of `plan` for every preset x slice x request (bfloat16 weights and cache;
    `quant="int8"`: int8 dense kernels, see `plan`)."""
    head = (
        "| model | slice | mesh (data, fsdp, tensor) | batch x cache | params | KV cache "
        "| activations | total / device | HBM | fits (90%) | replicated axes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for pname, cfg in presets.items():
        for sname, _, hbm, mesh in slices:
            for req in requests:
                platform = "tpu" if sname.startswith("v") else "gpu"
                p = plan(cfg, mesh, quant=quant, platform=platform, **req)
                fb = [n for n, tgt in RULES if tgt and dict(p.detail["rules"])[n] != tgt]
                rows.append(
                    f"| {pname} | {sname} | {mesh} | {req['batch']} x {req['cache_len']} "
                    f"| {p.params / GiB:.2f} GiB | {p.kv_cache / GiB:.2f} GiB "
                    f"| {p.activations / GiB:.2f} GiB | {p.total / GiB:.2f} GiB "
                    f"| {hbm / GiB:.0f} GiB | {'yes' if p.fits(hbm) else 'no'} "
                    f"| {', '.join(fb) or '-'} |"
                )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from minicpmv_jax.config import MINICPM_V_2_6, MINICPM_V_4_5

    parser = argparse.ArgumentParser(
        prog="python -m minicpmv_jax.memory", description="per-device memory plan table"
    )
    parser.add_argument("--quant", choices=sorted(quant_lib.MODES), default=None)
    parser.add_argument("--single-device", action="store_true", help="1-device slices only")
    args = parser.parse_args(argv)
    slices = [s for s in SLICES if s[1] == 1] if args.single_device else SLICES
    presets = {"MiniCPM-V 2.6": MINICPM_V_2_6, "MiniCPM-V 4.5": MINICPM_V_4_5}
    print(markdown_table(presets, slices, quant=args.quant))


if __name__ == "__main__":
    main()
