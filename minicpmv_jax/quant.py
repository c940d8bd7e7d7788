"""Int8 weight-only quantization with per-output-channel scales.

`quant="int8"` (in `MiniCPMV.from_pretrained`, `MiniCPMV.from_config` and the orbax converter)
replaces every dense layer of the LLM decoder by an `Int8Dense` and the `lm_head` (a torch-layout
`layers.OutInDense`) by an `Int8OutInDense`; `"int8+vision"` also quantizes the vision tower's
encoder layers. The token embedding table, the norms, the
resampler and the vision patch embedding stay in the model's dtype (they are small, or gathered
rather than multiplied).

    kernel [in, out] int8          = round(W / scale), clipped to [-127, 127]
    kernel_scale [out] float32     = max_in |W[:, j]| / 127          (symmetric absmax)
    y = (x @ kernel.astype(dtype)) * kernel_scale (+ bias)

and for a torch-layout `weight` [out, in] the same per output channel (row): `weight` int8
[out, in], `weight_scale` [out] = max_in |W[j, :]| / 127, y = (x W^T) * weight_scale.

The int8 kernel is converted to the compute dtype inside the jitted matmul and the scale is applied
to the [.., out] result after the dot (one multiply per output, not per weight), so the weights
cross HBM as int8: half the bytes of bfloat16, which is what bounds single-stream decoding.

Quantization happens on the host while loading (`quantize_kernel` on each tensor as it is read,
see weights.py), so the float model never exists on the device. Quantized modules keep the
checkpoint-key layout (`...q_proj.kernel` is the int8 `q_proj.weight` transposed, `lm_head.weight`
the int8 `lm_head.weight`) plus one `...q_proj.kernel_scale` (`lm_head.weight_scale`) leaf, so checkpoint.py saves and restores them group by group and
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
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minicpmv_jax.layers import OutInDense

SCALE = "kernel_scale"  # leaf name of the per-channel scale next to its int8 `kernel`
# The int8 weight leaves and the axis of their output channels: the `kernel` [(L,) in, out] of an
# nnx.Linear, the `weight` [(L,) out, in] of a layers.OutInDense (torch's layout). The scale of
# leaf `x` is the leaf `x_scale` [(L,) out] next to it.
OUT_AXIS = {"kernel": -1, "weight": -2}
SCALES = tuple(f"{leaf}_scale" for leaf in OUT_AXIS)
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


def _quantize_host(w: np.ndarray, out_axis: int) -> tuple[np.ndarray, np.ndarray]:
    if w.ndim > 2:  # a layer stack [L, in, out] / [L, out, in]: each layer on its own
        q = np.empty(w.shape, np.int8)
        scale = np.empty(scale_shape(w.shape, out_axis), np.float32)
        for i in range(w.shape[0]):
            q[i], scale[i] = _quantize_host(w[i], out_axis)
        return q, scale
    # Row blocks: peak memory is the input, the int8 result and one float32 block (a 4.5
    # lm_head is 2.5 GB in float32; whole-array temporaries would need four more of it).
    rows = max(1, HOST_BLOCK // max(w.shape[1], 1))
    starts = range(0, w.shape[0], rows)
    q = np.empty(w.shape, np.int8)
    if out_axis == -2:  # [out, in]: a block of rows holds whole output channels
        scale = np.empty(w.shape[0], np.float32)
        for i in range(0, w.shape[0], rows):
            block = w[i : i + rows].astype(np.float32)
            scale[i : i + rows], inv = _scales(np.abs(block).max(axis=1), np)
            q[i : i + rows] = np.clip(np.round(block * inv[:, None]), -QMAX, QMAX)
        return q, scale
    absmax = np.zeros(w.shape[1], np.float32)
    for i in starts:
        np.maximum(absmax, np.abs(w[i : i + rows].astype(np.float32)).max(axis=0), out=absmax)
    scale, inv = _scales(absmax, np)
    for i in starts:
        q[i : i + rows] = np.clip(np.round(w[i : i + rows].astype(np.float32) * inv), -QMAX, QMAX)
    return q, scale


@functools.partial(jax.jit, static_argnums=1)
def _quantize_device(w: jax.Array, out_axis: int) -> tuple[jax.Array, jax.Array]:
    # one fused program: no float32 copies of the whole kernel beyond what XLA needs
    w = w.astype(jnp.float32)
    in_axis = -3 - out_axis  # the other of the last two axes
    scale, inv = _scales(jnp.max(jnp.abs(w), axis=in_axis), jnp)  # [..., out]
    q = jnp.round(w * jnp.expand_dims(inv, in_axis))
    return jnp.clip(q, -QMAX, QMAX).astype(jnp.int8), scale


def scale_shape(shape: tuple, out_axis: int = -1) -> tuple:
    """Shape of the per-output-channel scale of a kernel / weight of `shape`: [(L,) out]."""
    shape = tuple(shape)
    return shape[:-2] + (shape[out_axis],)


def quantize_kernel(w, out_axis: int = -1):
    """Per-output-channel symmetric int8 quantization of a kernel (or torch-layout weight).

    Args:
      w: float [in, out] or a layer stack [L, in, out] (out_axis=-1, an nnx.Linear kernel);
        [(L,) out, in] with out_axis=-2 (an OutInDense weight): numpy (host, while loading)
        or jax (a loaded or abstract model).
      out_axis: the axis of the output channels, -1 or -2 (`OUT_AXIS` of the leaf).
    Returns:
      (int8 of w's shape, float32 scale [(L,) out]) with w ~= q * scale per output channel
      and layer; the same values on both paths. An all-zero channel gets scale 1.
    """
    if out_axis not in (-1, -2):
        raise ValueError(f"out_axis must be -1 ([in, out]) or -2 ([out, in]), got {out_axis}")
    if isinstance(w, np.ndarray):
        return _quantize_host(w, out_axis)
    return _quantize_device(w, out_axis)


def dequantize_kernel(q, scale, out_axis: int = -1):
    """float32 q * scale per output channel, in q's layout ([(L,) in, out], or [(L,) out, in]
    with out_axis=-2) (tests, export; the model never materialises it)."""
    return q.astype(np.float32) * np.expand_dims(scale, -3 - out_axis)


class Int8Dense(nnx.Module):
    """Drop-in for `nnx.Linear` with an int8 kernel and a float32 per-output-channel scale.

    In a layer stack the parameters carry a leading L axis (kernel [L, in, out], scale [L, out])
    and the layer scan hands each step its own [in, out] / [out] slice.
    """

    def __init__(self, kernel: nnx.Param, kernel_scale: nnx.Param, bias: nnx.Param | None, dtype):
        self.kernel = kernel  # int8 [(L,) in, out], the Linear's logical axis names
        self.kernel_scale = kernel_scale  # float32 [(L,) out], ("layers",) + the output axis name
        self.bias = bias
        self.dtype = dtype  # compute dtype (None: the input's)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out] in the compute dtype."""
        dtype = self.dtype or x.dtype
        kernel = self.kernel[...]
        y = _int8_dot(x.astype(dtype), kernel, -1) * self.kernel_scale[...]
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class Int8OutInDense(nnx.Module):
    """Drop-in for `layers.OutInDense` (torch layout) with an int8 weight [(L,) out, in] and a
    float32 per-output-channel (per-row) scale `weight_scale` [(L,) out]."""

    def __init__(self, weight: nnx.Param, weight_scale: nnx.Param, bias: nnx.Param | None, dtype):
        self.weight = weight  # int8 [(L,) out, in], the OutInDense's logical axis names
        self.weight_scale = weight_scale  # float32 [(L,) out]
        self.bias = bias
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out] in the compute dtype."""
        dtype = self.dtype or x.dtype
        y = _int8_dot(x.astype(dtype), self.weight[...], -2) * self.weight_scale[...]
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


def _int8_dot(x: jax.Array, w: jax.Array, out_axis: int) -> jax.Array:
    """x [..., in] times an int8 kernel [in, out] (out_axis -1) or weight [out, in] (-2) ->
    float32 [..., out], before the scale."""
    if jax.default_backend() == "cpu":
        return _tiled_int8_dot(x, w, out_axis)
    # int8 -> compute dtype inside the jitted matmul: XLA on TPU / GPU fuses the convert into
    # the dot's operand, so HBM holds and streams int8; accumulate in float32.
    return _dot(x, w.astype(x.dtype), out_axis)


CPU_TILE = 1 << 20  # weights per dequantized tile on CPU (4 MiB as float32)


def _dot(x: jax.Array, w: jax.Array, out_axis: int = -1) -> jax.Array:
    """x [..., in] times w ([in, out] for out_axis -1, [out, in] for -2) -> float32 [..., out]."""
    contract = 0 if out_axis == -1 else 1
    return jax.lax.dot_general(
        x, w, (((x.ndim - 1,), (contract,)), ((), ())), preferred_element_type=jnp.float32
    )


def _tiled_int8_dot(x: jax.Array, w: jax.Array, out_axis: int = -1) -> jax.Array:
    """x [..., in] times int8 w ([in, out] / [out, in] as `_dot`) -> float32 [..., out],
    dequantizing tiles of whole output channels (columns of a kernel, rows of a weight).

    XLA:CPU has no fused convert + dot: it converts the whole int8 kernel to a float copy, and
    inside a decode `while_loop` it hoists that loop-invariant conversion out of the loop, so
    the compiled program holds a float copy of every quantized weight. Here the kernel is read
    in tiles of at most `CPU_TILE` weights by a `lax.map` whose index makes each slice (and its
    conversion) loop-variant: only one float tile exists at a time. The channels left over
    after the last whole tile (fewer than one tile) are converted directly.
    """
    axis = w.ndim + out_axis  # 1 for a kernel [in, out], 0 for a weight [out, in]
    k_out, k_in = w.shape[axis], w.shape[1 - axis]
    cols = max(1, min(k_out, CPU_TILE // k_in))
    n = k_out // cols
    if n <= 1:
        return _dot(x, w.astype(x.dtype), out_axis)

    def tile(i):
        t = jax.lax.dynamic_slice_in_dim(w, i * cols, cols, axis=axis)
        return _dot(x, t.astype(x.dtype), out_axis)  # [..., cols]

    tiles = jax.lax.map(tile, jnp.arange(n))  # [n, ..., cols]
    y = jnp.moveaxis(tiles, 0, -2).reshape(*x.shape[:-1], n * cols)
    if n * cols < k_out:
        rest = jax.lax.slice_in_dim(w, n * cols, k_out, axis=axis)
        y = jnp.concatenate([y, _dot(x, rest.astype(x.dtype), out_axis)], axis=-1)
    return y


def _scale_param(scale, weight: nnx.Param, out_axis: int) -> nnx.Param:
    """The scale Param: the weight's axis names without `in` ([(L,) out]), and its sharding
    when the weight is already placed."""

    def drop_in(axes):  # [(L,) in, out] / [(L,) out, in] -> [(L,) out]
        axes = tuple(axes)
        return axes[:-2] + (axes[out_axis],)

    names = weight.get_metadata().get("out_sharding")
    meta = {} if names is None else {"out_sharding": drop_in(names)}
    k = weight[...]
    sharding = getattr(k, "sharding", None)  # tracers have none: get_abstract_model places them
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (k.ndim - len(sharding.spec))
        scale = jax.device_put(scale, NamedSharding(sharding.mesh, P(*drop_in(spec))))
    # eager_sharding=False: placed above (or by get_abstract_model), no mesh context needed
    return nnx.Param(scale, eager_sharding=False, **meta)


def int8_dense(linear: nnx.Linear | OutInDense) -> Int8Dense | Int8OutInDense:
    """Quantize one nnx.Linear or layers.OutInDense (concrete or abstract, e.g. inside
    `nnx.get_abstract_model`)."""
    if isinstance(linear, OutInDense):
        q, scale = quantize_kernel(linear.weight[...], out_axis=-2)
        return Int8OutInDense(
            linear.weight.replace(q), _scale_param(scale, linear.weight, -2), linear.bias,
            linear.dtype,
        )  # fmt: skip
    q, scale = quantize_kernel(linear.kernel[...])
    return Int8Dense(
        linear.kernel.replace(q), _scale_param(scale, linear.kernel, -1), linear.bias, linear.dtype
    )


def _name(path) -> str:
    return ".".join(str(p) for p in path)


def quantize_module(module: nnx.Module, quant: str | QuantConfig | None) -> nnx.Module:
    """Replace the selected `nnx.Linear` (`OutInDense`) layers of `module` by `Int8Dense`
    (`Int8OutInDense`), in place.

    Works on a loaded model and, inside `nnx.get_abstract_model`, on an abstract one (the target
    of a quantized load or restore). Returns `module`.
    """
    cfg = parse(quant)
    if cfg is None:
        return module
    targets = [
        (path, node)
        for path, node in nnx.iter_graph(module)
        if isinstance(node, (nnx.Linear, OutInDense)) and path and cfg.selects(_name(path))
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


def _leaf(path) -> str:
    if isinstance(path, str):
        return path.rpartition(".")[2]
    last = path[-1] if path else None
    return str(getattr(last, "key", last))


def is_scale_path(path) -> bool:
    """True for a `...kernel_scale` / `...weight_scale` leaf (filled from its weight's float
    tensor); `path` is a state path or a dotted name."""
    return _leaf(path) in SCALES


def scale_path(kernel_path: tuple) -> tuple:
    """The state path of a quantized kernel's (weight's) scale."""
    return tuple(kernel_path[:-1]) + (f"{_leaf(kernel_path)}_scale",)


def out_axis(path) -> int:
    """Axis of the output channels of an int8 leaf (`OUT_AXIS`): -1 for a `kernel`, -2 for a
    torch-layout `weight`; `path` is a state path or a dotted name."""
    leaf = _leaf(path)
    if leaf not in OUT_AXIS:
        raise ValueError(f"{path}: not a dense weight leaf (expected one of {sorted(OUT_AXIS)})")
    return OUT_AXIS[leaf]


def is_int8(dtype: Any) -> bool:
    return np.dtype(dtype) == np.int8


def _from_names(names) -> QuantConfig | None:
    """The QuantConfig implied by the dotted parameter names that end in `kernel_scale`."""
    scales = [n for n in names if is_scale_path(n)]
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
      read: read(path, dtype, layer) -> numpy array of the parameter in model layout (float);
        layer=None reads the whole parameter, an int the one layer of a stacked parameter.
    Returns: [(path, numpy array)] in `items` order; each `kernel_scale` comes from its kernel.
    """
    scales, out = {}, []
    for path, var in items:
        if is_scale_path(path):
            continue
        dtype, shape = var.get_value().dtype, tuple(var.get_value().shape)
        if not is_int8(dtype):
            out.append((path, read(path, dtype, None)))
        elif len(shape) == 2:  # one kernel [in, out] (weight [out, in])
            axis = out_axis(path)
            q, scales[scale_path(path)] = quantize_kernel(read(path, np.float32, None), axis)
            out.append((path, q))
        else:  # a layer stack [L, ...], layer by layer: one float32 layer in memory
            axis = out_axis(path)
            q = np.empty(shape, np.int8)
            scale = np.empty(scale_shape(shape, axis), np.float32)
            for i in range(shape[0]):
                q[i], scale[i] = quantize_kernel(read(path, np.float32, i), axis)
            out.append((path, q))
            scales[scale_path(path)] = scale
    order = {tuple(p): i for i, (p, _) in enumerate(items)}
    out += [(p, s) for p, s in scales.items()]
    return sorted(out, key=lambda kv: order[tuple(kv[0])])
