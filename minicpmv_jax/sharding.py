"""Device mesh, the logical-axis rule table, and shardings for parameters, KV cache and batches.

Every array that is sharded carries *logical* axis names; one table, `RULES`, maps them onto the
("data", "fsdp", "tensor") mesh (MaxText's idea):

| logical name          | mesh axes     | used by                                           |
|-----------------------|---------------|---------------------------------------------------|
| batch                 | (data, fsdp)  | KV cache rows, prompt / token batches             |
| act_batch             | (data, fsdp)  | activations at block boundaries [B, T, D]         |
| act_seq, act_embed    | None          | activations: sequence and model dim replicated    |
| seq                   | None          | KV cache slots                                    |
| embed                 | fsdp          | LLM / resampler model dim D of every weight       |
| mlp, vocab            | tensor        | LLM MLP width F, vocabulary V                     |
| q_heads, kv_heads     | tensor        | attention heads (flattened N*H / K*H weight dims) |
| vis_mlp, vis_heads    | tensor        | vision tower MLP width and heads                  |
| vis_embed, layers, .. | None          | vision width, layer axis, norms, position tables  |

Parameters get their names through `nnx.with_partitioning`; the cache uses
`CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")` and activations
`ACT_AXES = ("act_batch", "act_seq", "act_embed")`.

**Fallback for sizes that do not divide** (documented layout, decided before compilation): a
logical axis whose size is not a multiple of its mesh axes is *replicated* instead of sharded
(`rules_for` logs each such change). Head axes are checked on the head *count*, not on the
flattened N*H width, so 4 KV heads on tensor=8 keep whole heads: the KV projections and the KV
cache are replicated over "tensor" (each device holds all KV heads) while the query heads may
still be sharded. A multi-axis rule such as batch -> (data, fsdp) first drops trailing axes
(batch 2 on data=2, fsdp=4 -> data only). `rules_for(..., strict=True)` raises `ShardingError`
instead of falling back. `check_divisible` is a last guard that names any parameter whose
shape still does not divide its sharding (a clear error instead of an XLA one).

Models are built under `with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for(cfg, mesh)):`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from minicpmv_jax.errors import MiniCPMVError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("layers", None),
    ("seq", None),
    ("norm", None),
    ("head_dim", None),
    # vision tower (1152 wide, 16 heads) and resampler
    ("vis_embed", None),
    ("vis_mlp", "tensor"),
    ("vis_heads", "tensor"),
    ("patch", None),
    ("positions", None),
    ("queries", None),
    # activations at block boundaries: batch-parallel, the residual stream is replicated over
    # "tensor" (Megatron layout: the row-parallel o_proj / down_proj all-reduce into it).
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
)

CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")  # KVCache.k / .v [L, B, S, K, H]
CACHE_VALID_AXES = ("batch", "seq")  # KVCache.valid [B, S]
ACT_AXES = ("act_batch", "act_seq", "act_embed")  # hidden states [B, T, D]

Rules = tuple[tuple[str, Any], ...]


class ShardingError(MiniCPMVError):
    """A mesh / model combination that cannot be laid out (raised before compilation)."""


# ------------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------------


def parse_mesh_shape(spec: str | Sequence[int] | None, n_devices: int | None = None):
    """User mesh shape -> (data, fsdp, tensor) ints.

    Accepts a 3-sequence, "2,2,2", "data=2,tensor=4" (unnamed axes = 1) or None (all devices on
    fsdp). One entry may be -1: it takes the remaining devices.
    """
    n = n_devices if n_devices is not None else jax.device_count()
    if spec is None:
        return (1, n, 1)
    if isinstance(spec, str):
        spec = spec.strip()
        if "=" in spec:
            named = dict.fromkeys(MESH_AXES, 1)
            for part in spec.split(","):
                k, _, v = part.partition("=")
                if k.strip() not in named:
                    raise ShardingError(f"unknown mesh axis {k.strip()!r}; axes are {MESH_AXES}")
                named[k.strip()] = int(v)
            shape = [named[a] for a in MESH_AXES]
        else:
            shape = [int(s) for s in spec.replace("x", ",").split(",")]
    else:
        shape = [int(s) for s in spec]
    if len(shape) != 3:
        raise ShardingError(f"mesh shape {spec!r} must have 3 entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ShardingError(f"mesh shape {spec!r}: at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise ShardingError(f"mesh shape {spec!r}: {n} devices do not divide by {known}")
        shape[shape.index(-1)] = n // known
    if any(s < 1 for s in shape):
        raise ShardingError(f"mesh shape {spec!r}: entries must be >= 1")
    return tuple(shape)


def make_mesh(shape=(1, 1, 1), devices=None) -> jax.sharding.Mesh:
    """Auto-axis ("data", "fsdp", "tensor") mesh.

    Args:
      shape: (data, fsdp, tensor), a string for `parse_mesh_shape`, or None for all devices on
        fsdp. Default (1, 1, 1): the first device only.
      devices: devices to use (default: the first prod(shape) of `jax.devices()`, i.e. global
        devices of every process under `jax.distributed`).
    """
    all_devices = list(devices) if devices is not None else jax.devices()
    shape = parse_mesh_shape(shape, len(all_devices))
    n = math.prod(shape)
    if n > len(all_devices):
        raise ShardingError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {n} devices, "
            f"only {len(all_devices)} available"
        )
    # Axis types must be Auto: jax's default Explicit axes make FSDP / TP matmuls fail.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=all_devices[:n])


def mesh_shape(mesh) -> dict[str, int]:
    """{axis name: size} of a Mesh / AbstractMesh, or of a plain (data, fsdp, tensor) tuple."""
    if isinstance(mesh, dict):
        return dict(mesh)
    if isinstance(mesh, (tuple, list)) and len(mesh) == len(MESH_AXES):
        return dict(zip(MESH_AXES, mesh, strict=True))
    if isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        return dict(mesh.shape)
    raise MiniCPMVError(
        f"mesh must be a Mesh, an AbstractMesh, a (data, fsdp, tensor) tuple such as (1, 2, 4) "
        f"or an {{axis: size}} dict, got {mesh!r}"
    )


# ------------------------------------------------------------------------------------------------
# Rules with the divisibility fallback
# ------------------------------------------------------------------------------------------------


def logical_sizes(config) -> dict[str, set[int]]:
    """Per logical axis, the numbers its mesh axes must divide for this model config.

    Head axes list the head *count* (whole heads per device), plus the resampler's flattened
    width for q_heads (its attention may split inside a head: only correctness of the matmul
    matters there, and it runs once per image).
    """
    llm, vis, res = config.llm, config.vision, config.resampler
    return {
        "embed": {llm.hidden_size, res.embed_dim},
        "mlp": {llm.intermediate_size},
        "vocab": {llm.vocab_size},
        "q_heads": {llm.num_heads, res.embed_dim},
        "kv_heads": {llm.num_kv_heads},
        "vis_embed": {vis.hidden_size},
        "vis_mlp": {vis.intermediate_size},
        "vis_heads": {vis.num_heads},
        "layers": {llm.num_layers, vis.num_layers},
        "head_dim": {llm.head_dim},
        "patch": {vis.patch_dim},
        "positions": {vis.patches_per_side**2},
        "queries": {res.num_queries},
    }


def _axes(target) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def _fit(target, sizes: Iterable[int], shape: dict[str, int]):
    """Longest prefix of the rule's mesh axes whose product divides every size (None if none)."""
    axes = _axes(target)
    for k in range(len(axes), 0, -1):
        div = math.prod(shape.get(a, 1) for a in axes[:k])
        if all(s % div == 0 for s in sizes):
            return axes[0] if k == 1 else axes[:k]
    return None


def rules_for(config, mesh, *, strict: bool = False, rules: Rules = RULES) -> Rules:
    """The rule table for one model on one mesh, with the documented fallback applied.

    Args:
      config: MiniCPMVConfig.
      mesh: Mesh, AbstractMesh, {axis: size} or a (data, fsdp, tensor) tuple.
      strict: raise ShardingError instead of replicating an axis that does not divide.
    Returns: a table for `nnx.logical_axis_rules` (same names as `RULES`).
    """
    shape = mesh_shape(mesh)
    sizes = logical_sizes(config)
    out, problems = [], []
    for name, target in rules:
        if name not in sizes or not _axes(target):
            out.append((name, target))  # runtime-sized (batch) or replicated
            continue
        fit = _fit(target, sizes[name], shape)
        if _axes(fit) != _axes(target):
            div = math.prod(shape.get(a, 1) for a in _axes(target))
            problems.append(
                f"{name} (size {sorted(sizes[name])}) over {target} ({div} devices) -> "
                f"{'replicated' if fit is None else fit}"
            )
        out.append((name, fit))
    if problems and strict:
        raise ShardingError(
            "mesh "
            + str(shape)
            + " does not divide these model axes:\n  "
            + "\n  ".join(problems)
            + "\nchoose a mesh whose axis sizes divide them (or call with strict=False to "
            "replicate these axes)"
        )
    for p in problems:
        log.info("sharding fallback: %s", p)
    return tuple(out)


def fallbacks(config, mesh, rules: Rules = RULES) -> list[str]:
    """Logical axes that `rules_for` shards less than `rules` asks on this mesh (empty if none)."""
    resolved = dict(rules_for(config, mesh, rules=rules))
    return [n for n, t in rules if _axes(t) and _axes(resolved[n]) != _axes(t)]


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules = RULES) -> P:
    """PartitionSpec of one array from its logical names, replicating dims that do not divide.

    Runtime-sized axes (batch, sequence) are resolved here, per array.
    """
    table, mshape, used = dict(rules), mesh_shape(mesh), set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        target = table.get(name) if name is not None else None
        fit = _fit(target, (dim,), mshape) if target is not None else None
        # a mesh axis may appear once per spec
        if fit is not None and used & set(_axes(fit)):
            fit = None
        used |= set(_axes(fit))
        spec.append(fit)
    return P(*spec)


def named(mesh, names, shape, rules: Rules = RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(names, shape, mesh, rules))


def cache_shardings(mesh, cache, rules: Rules = RULES):
    """NamedShardings for a KVCache (same pytree type); `cache` may be abstract (eval_shape)."""
    return type(cache)(
        k=named(mesh, CACHE_AXES, cache.k.shape, rules),
        v=named(mesh, CACHE_AXES, cache.v.shape, rules),
        end=NamedSharding(mesh, P()),
        valid=named(mesh, CACHE_VALID_AXES, cache.valid.shape, rules),
    )


def batch_sharding(mesh, shape: Sequence[int], rules: Rules = RULES) -> NamedSharding:
    """Sharding of a host batch array whose leading dim is the batch (other dims replicated)."""
    names = ("batch",) + (None,) * (len(shape) - 1)
    return named(mesh, names, shape, rules)


def constrain(x: jax.Array, names: Sequence[str | None] = ACT_AXES, rules: Rules = RULES):
    """Sharding constraint on an activation at a block boundary.

    A no-op outside `jax.set_mesh(...)` (or on a one-device mesh), so model code can call it
    unconditionally. Dims that do not divide their mesh axes are left unconstrained-replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh, rules))


def constrain_cache(cache, rules: Rules = RULES):
    """Pin a KVCache to its rule layout (k, v: CACHE_AXES; valid: CACHE_VALID_AXES).

    Called where the LLM hands the cache back, so prefill / decode outputs keep the layout the
    cache was created with (no drift, no recompilation on the next donated call). No-op without
    a mesh context.
    """
    if cache is None:
        return None
    return cache.replace(
        k=constrain(cache.k, CACHE_AXES, rules),
        v=constrain(cache.v, CACHE_AXES, rules),
        valid=constrain(cache.valid, CACHE_VALID_AXES, rules),
    )


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------


def logical_names(var) -> tuple | None:
    """Logical axis names of an nnx Variable (flax 0.12 stores them as `out_sharding`)."""
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    names = meta.get("out_sharding", meta.get("sharding_names", meta.get("sharding")))
    return tuple(names) if names is not None else None


def check_divisible(abstract_state, where: str = "parameter") -> None:
    """Raise ShardingError naming every array whose sharding does not divide its shape.

    Call on an abstract state (ShapeDtypeStruct leaves with NamedShardings) before placing or
    compiling anything: XLA's own error comes later and names no parameter.
    """
    from flax import nnx

    bad = []
    for path, var in nnx.to_flat_state(abstract_state):
        v = var.get_value() if hasattr(var, "get_value") else var
        sh = getattr(v, "sharding", None)
        if not isinstance(sh, NamedSharding):
            continue
        mshape = mesh_shape(sh.mesh)
        for dim, entry in zip(v.shape, tuple(sh.spec) + (None,) * len(v.shape), strict=False):
            div = math.prod(mshape[a] for a in _axes(entry))
            if dim % div:
                bad.append(f"{path_name(path)} {tuple(v.shape)} spec {sh.spec}: {dim} % {div}")
                break
    if bad:
        raise ShardingError(
            f"{len(bad)} {where}(s) do not divide the mesh {mshape}:\n  " + "\n  ".join(bad)
        )


def path_name(path: Iterable[Any]) -> str:
    """nnx state path ('llm', 'model', 'layers', 3, ...) -> 'llm.model.layers.3....'."""
    return ".".join(str(getattr(p, "key", p)) for p in path)


def place(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """Host array -> global jax.Array, each process filling only its addressable shards.

    Works on one host and under `jax.distributed` (every process holds the same host array and
    transfers only the slices its own devices need: process-local loading).
    """
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def describe(state) -> dict[str, str]:
    """{parameter path: PartitionSpec string} of a (possibly abstract) state, for tests / logs."""
    from flax import nnx

    out = {}
    for path, var in nnx.to_flat_state(state):
        v = var.get_value() if hasattr(var, "get_value") else var
        sh = getattr(v, "sharding", None)
        out[path_name(path)] = str(sh.spec) if isinstance(sh, NamedSharding) else str(sh)
    return out


# ------------------------------------------------------------------------------------------------
# Multi-host
# ------------------------------------------------------------------------------------------------

_ENV = {
    "coordinator_address": ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"),
    "num_processes": ("JAX_NUM_PROCESSES", "NUM_PROCESSES"),
    "process_id": ("JAX_PROCESS_ID", "PROCESS_ID"),
    "local_device_ids": ("JAX_LOCAL_DEVICE_IDS",),
}


def initialize_distributed(**overrides) -> bool:
    """Start `jax.distributed` for multi-host runs; returns True when more than one process runs.

    Reads JAX_COORDINATOR_ADDRESS ("host:port"), JAX_NUM_PROCESSES, JAX_PROCESS_ID and optional
    JAX_LOCAL_DEVICE_IDS ("0,1"). Without them, jax's cluster auto-detection is tried where it
    applies (Cloud TPU pods, SLURM, Open MPI): on a TPU pod slice, call this with no variables
    set on every host. On a single machine with none of these, it does nothing. Keyword
    arguments override the environment. Call it before any other jax call.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    kw: dict[str, Any] = {}
    for key, names in _ENV.items():
        for n in names:
            if os.environ.get(n):
                kw[key] = os.environ[n]
                break
    kw.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("num_processes", "process_id"):
        if key in kw:
            kw[key] = int(kw[key])
    if isinstance(kw.get("local_device_ids"), str):
        kw["local_device_ids"] = [int(i) for i in kw["local_device_ids"].split(",")]
    explicit = "coordinator_address" in kw
    auto = any(
        os.environ.get(v)
        for v in (
            "SLURM_JOB_ID",
            "OMPI_COMM_WORLD_SIZE",
            "TPU_WORKER_HOSTNAMES",
            "MEGASCALE_COORDINATOR_ADDRESS",
        )
    )
    if not explicit and not auto:
        log.debug("initialize_distributed: no multi-process environment found; single process")
        return False
    jax.distributed.initialize(**kw)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count() > 1
