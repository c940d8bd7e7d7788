"""Int8 weight-only quantization with per-output-channel scales.

`quant="int8"` (in `MiniCPMV.from_pretrained`, `MiniCPMV.from_config` and the orbax converter)
replaces every dense layer of the LLM decoder and the `lm_head` by an `Int8Dense`; `"int8+vision"`
also quantizes the vision tower's encoder layers. The token embedding table, the norms, the
resampler and the vision patch embedding stay in the model's dtype (they are small, or gathered
rather than multiplied).

    kernel [in, out] int8          = round(W / scale), clipped to [-127, 127]
    kernel_scale [out] float32     = max_in |W[:, j]| / 127          (symmetric absmax)
    y = (x @ kernel.astype(dtype)) * kernel_scale (+ bias)

The int8 kernel is converted to the compute dtype inside the jitted matmul and the scale is applied
to the [.., out] result after the dot (one multiply per output, not per weight), so the weights
cross HBM as int8: half the bytes of bfloat16, which is what bounds single-stream decoding.

Quantization happens on the host while loading (`quantize_kernel` on each tensor as it is read,
see weights.py), so the float model never exists on the device. Quantized modules keep the
checkpoint-key layout (`...q_proj.kernel` is the int8 `q_proj.weight` transposed) plus one
`...q_proj.kernel_scale` leaf, so checkpoint.py saves and restores them group by group and
sharding applies the kernel's logical names (the scale takes the output axis name).

Why not a library: qwix 0.1.8 (Google's JAX quantization library; installs and runs with jax
0.10.2 + flax 0.12.8) was tried first. Its weight-only PTQ (`PtqProvider` with
`weight_qtype=int8`) dequantizes the whole kernel before the dot (`convert(q) * scale`, then
`dot_general`), rather than scaling the output; it restructures each kernel into a
`WithAux(QArray(qvalue, scale))` tree found by intercepting calls with sample inputs, which breaks
the one-to-one mapping of parameter paths to checkpoint keys that weights.py, checkpoint.py and
the orbax converter rely on; and quantizing while streaming weights from safetensors would need
its abstract-model plus `quantize_params` path on top. It is also an alpha release. The scheme
here is the standard one (AQT / MaxText "int8 weight-only", per-channel absmax), written out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

SCALE = "kernel_scale"  # leaf name of the per-channel scale next to its int8 `kernel`
QMAX = 127  # symmetric range [-127, 127]: -128 is never used, so -q is always representable


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Which dense layers are stored as int8.

    llm: the decoder layers' q/k/v/o and gate/up/down projections.
    lm_head: the output projection (the largest single matmul of a decode step).
    vision: the vision tower's encoder layers (attention and MLP projections).
    """

    llm: bool = True
    lm_head: bool = True
    vision: bool = False

    @property
    def name(self) -> str:
        return "int8+vision" if self.vision else "int8"

    def selects(self, name: str) -> bool:
        """Whether the dense layer at dotted path `name` is quantized."""
        if name.startswith("llm.model.layers."):
            return self.llm
        if name == "llm.lm_head":
            return self.lm_head
        if name.startswith("vpm.encoder.layers."):
            return self.vision
        return False


MODES = {"int8": QuantConfig(), "int8+vision": QuantConfig(vision=True)}


def parse(quant: str | QuantConfig | None) -> QuantConfig | None:
    """`None` / "int8" / "int8+vision" / a QuantConfig -> QuantConfig or None (float)."""
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    if quant in ("none", "float", ""):
        return None
    if quant not in MODES:
        raise ValueError(f"unknown quantization {quant!r}; expected one of {sorted(MODES)}")
    return MODES[quant]


# ------------------------------------------------------------------------------------------------
# The arithmetic
# ------------------------------------------------------------------------------------------------


HOST_BLOCK = 1 << 24  # elements per block of host quantization (64 MiB of float32)


def _scales(absmax, xp):
    """(scale, 1 / scale) float32 [out] from the per-channel absmax; all-zero channels get 1."""
    # Multiplications by reciprocals, not divisions by constants: XLA rewrites such divisions
    # that way, so writing it out keeps host (numpy) and device (jnp) quantization bit-identical.
    scale = xp.where(absmax > 0, absmax * np.float32(1 / QMAX), 1.0).astype(np.float32)
    return scale, (1.0 / scale).astype(np.float32)


def _quantize_host(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Row blocks: peak memory is the input, the int8 result and one float32 block (a 4.5
    # lm_head is 2.5 GB in float32; whole-array temporaries would need four more of it).
    rows = max(1, HOST_BLOCK // max(w.shape[1], 1))
    starts = range(0, w.shape[0], rows)
    absmax = np.zeros(w.shape[1], np.float32)
    for i in starts:
        np.maximum(absmax, np.abs(w[i : i + rows].astype(np.float32)).max(axis=0), out=absmax)
    scale, inv = _scales(absmax, np)
    q = np.empty(w.shape, np.int8)
    for i in starts:
        q[i : i + rows] = np.clip(np.round(w[i : i + rows].astype(np.float32) * inv), -QMAX, QMAX)
    return q, scale


@jax.jit
def _quantize_device(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    # one fused program: no float32 copies of the whole kernel beyond what XLA needs
    w = w.astype(jnp.float32)
    scale, inv = _scales(jnp.max(jnp.abs(w), axis=0), jnp)
    return jnp.clip(jnp.round(w * inv), -QMAX, QMAX).astype(jnp.int8), scale


def quantize_kernel(w):
    """Per-output-channel symmetric int8 quantization of a kernel.

    Args:
      w: float [in, out]: numpy (host, while loading) or jax (a loaded or abstract model).
    Returns:
      (int8 [in, out], float32 scale [out]) with w ~= q * scale; the same values on both paths.
      An all-zero channel gets scale 1.
    """
    if isinstance(w, np.ndarray):
        return _quantize_host(w)
    return _quantize_device(w)


def dequantize_kernel(q, scale):
    """float32 [in, out] = q * scale (tests, inspection; the model never materialises it)."""
    return q.astype(np.float32) * scale


class Int8Dense(nnx.Module):
    """Drop-in for `nnx.Linear` with an int8 kernel and a float32 per-output-channel scale."""

    def __init__(self, kernel: nnx.Param, kernel_scale: nnx.Param, bias: nnx.Param | None, dtype):
        self.kernel = kernel  # int8 [in, out], the Linear's logical axis names
        self.kernel_scale = kernel_scale  # float32 [out], the output axis name
        self.bias = bias
        self.dtype = dtype  # compute dtype (None: the input's)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out] in the compute dtype."""
        dtype = self.dtype or x.dtype
        kernel = self.kernel[...]
        if jax.default_backend() == "cpu":
            y = _tiled_int8_dot(x.astype(dtype), kernel)
        else:
            # int8 -> compute dtype inside the jitted matmul: XLA on TPU / GPU fuses the convert
            # into the dot's operand, so HBM holds and streams int8; accumulate in float32.
            y = _dot(x.astype(dtype), kernel.astype(dtype))  # [..., out]
        y = y * self.kernel_scale[...]  # per output channel, after the dot
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


CPU_TILE = 1 << 20  # weights per dequantized tile on CPU (4 MiB as float32)


def _dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out] -> float32 [..., out]."""
    return jax.lax.dot_general(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )


def _tiled_int8_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ int8 kernel [in, out] -> float32 [..., out], dequantizing column tiles.

    XLA:CPU has no fused convert + dot: it converts the whole int8 kernel to a float copy, and
    inside a decode `while_loop` it hoists that loop-invariant conversion out of the loop, so
    the compiled program holds a float copy of every quantized weight. Here the kernel is read
    in tiles of at most `CPU_TILE` weights by a `lax.map` whose index makes each slice (and its
    conversion) loop-variant: only one float tile exists at a time. The columns left over after
    the last whole tile (fewer than one tile) are converted directly.
    """
    k_in, k_out = kernel.shape
    cols = max(1, min(k_out, CPU_TILE // k_in))
    n = k_out // cols
    if n <= 1:
        return _dot(x, kernel.astype(x.dtype))

    def tile(i):
        w = jax.lax.dynamic_slice_in_dim(kernel, i * cols, cols, axis=1)
        return _dot(x, w.astype(x.dtype))  # [..., cols]

    tiles = jax.lax.map(tile, jnp.arange(n))  # [n, ..., cols]
    y = jnp.moveaxis(tiles, 0, -2).reshape(*x.shape[:-1], n * cols)
    if n * cols < k_out:
        y = jnp.concatenate([y, _dot(x, kernel[:, n * cols :].astype(x.dtype))], axis=-1)
    return y


def _scale_param(scale, kernel: nnx.Param) -> nnx.Param:
    """The scale Param: the kernel's output axis name, and its sharding when already placed."""
    names = kernel.get_metadata().get("out_sharding")
    meta = {} if names is None else {"out_sharding": (tuple(names)[-1],)}
    k = kernel[...]
    sharding = getattr(k, "sharding", None)  # tracers have none: get_abstract_model places them
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (k.ndim - len(sharding.spec))
        scale = jax.device_put(scale, NamedSharding(sharding.mesh, P(spec[-1])))
    # eager_sharding=False: placed above (or by get_abstract_model), no mesh context needed
    return nnx.Param(scale, eager_sharding=False, **meta)


def int8_dense(linear: nnx.Linear) -> Int8Dense:
    """Quantize one nnx.Linear (concrete or abstract, e.g. inside `nnx.get_abstract_model`)."""
    q, scale = quantize_kernel(linear.kernel[...])
    return Int8Dense(
        linear.kernel.replace(q), _scale_param(scale, linear.kernel), linear.bias, linear.dtype
    )


def _name(path) -> str:
    return ".".join(str(p) for p in path)


def quantize_module(module: nnx.Module, quant: str | QuantConfig | None) -> nnx.Module:
    """Replace the selected `nnx.Linear` layers of `module` by `Int8Dense`, in place.

    Works on a loaded model and, inside `nnx.get_abstract_model`, on an abstract one (the target
    of a quantized load or restore). Returns `module`.
    """
    cfg = parse(quant)
    if cfg is None:
        return module
    targets = [
        (path, node)
        for path, node in nnx.iter_graph(module)
        if isinstance(node, nnx.Linear) and path and cfg.selects(_name(path))
    ]
    for path, linear in targets:
        parent = module
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        new = int8_dense(linear)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return module


# ------------------------------------------------------------------------------------------------
# Loading / checkpoint helpers
# ------------------------------------------------------------------------------------------------


def is_scale_path(path) -> bool:
    """True for a `...kernel_scale` leaf (filled from its kernel's float tensor)."""
    last = path[-1] if path else None
    return str(getattr(last, "key", last)) == SCALE


def scale_path(kernel_path: tuple) -> tuple:
    """The state path of a quantized kernel's scale."""
    return tuple(kernel_path[:-1]) + (SCALE,)


def is_int8(dtype: Any) -> bool:
    return np.dtype(dtype) == np.int8


def _from_names(names) -> QuantConfig | None:
    """The QuantConfig implied by the dotted parameter names that end in `kernel_scale`."""
    scales = [n for n in names if n.endswith("." + SCALE)]
    if not scales:
        return None
    return QuantConfig(
        llm=any(n.startswith("llm.model.layers.") for n in scales),
        lm_head=any(n.startswith("llm.lm_head.") for n in scales),
        vision=any(n.startswith("vpm.") for n in scales),
    )


def describe(module_or_state: Any) -> QuantConfig | None:
    """The QuantConfig a model (module, state or MiniCPMV) was quantized with; None = float."""
    module = getattr(module_or_state, "module", module_or_state)
    state = module if isinstance(module, nnx.State) else nnx.state(module)
    return _from_names(
        _name(getattr(p, "key", p) for p in path) for path, _ in nnx.to_flat_state(state)
    )


def stored_quant(meta: dict) -> QuantConfig | None:
    """The quantization of an orbax checkpoint from its metadata (checkpoint.read_metadata).

    Reads the `quant` entry the converter writes; otherwise infers it from the tensor table
    (a quantized `checkpoint.save` lists the `kernel_scale` leaves).
    """
    if meta.get("quant"):
        return parse(meta["quant"])
    return _from_names(meta.get("tensors") or {})


def param_bytes(module_or_state: Any) -> int:
    """Bytes of every parameter (int8 kernels count one byte per weight)."""
    module = getattr(module_or_state, "module", module_or_state)
    state = module if isinstance(module, nnx.State) else nnx.state(module, nnx.Param)
    total = 0
    for _, var in nnx.to_flat_state(state):
        v = var.get_value() if hasattr(var, "get_value") else var
        total += int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
    return total


def read_quantized(items, read) -> list[tuple[tuple, np.ndarray]]:
    """Host arrays for one group of (path, abstract var) pairs, quantizing int8 kernels.

    Args:
      items: [(path, var)] from `nnx.to_flat_state` of an abstract (possibly quantized) model.
      read: read(path, dtype) -> numpy array of the parameter in model layout (float).
    Returns: [(path, numpy array)] in `items` order; each `kernel_scale` comes from its kernel.
    """
    scales, out = {}, []
    for path, var in items:
        if is_scale_path(path):
            continue
        dtype = var.get_value().dtype
        if is_int8(dtype):
            q, scales[scale_path(path)] = quantize_kernel(read(path, np.float32))
            out.append((path, q))
        else:
            out.append((path, read(path, dtype)))
    order = {tuple(p): i for i, (p, _) in enumerate(items)}
    out += [(p, s) for p, s in scales.items()]
    return sorted(out, key=lambda kv: order[tuple(kv[0])])
