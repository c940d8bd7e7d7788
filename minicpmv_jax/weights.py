"""safetensors -> model: the name rule, the exception table and the tensor transforms.

Name rule: the attribute path of a parameter is its checkpoint key. `...kernel` is the
`...weight` of a torch Linear transposed ((out, in) -> (in, out)); a `...weight` (the torch-layout
linear layers, `layers.OutInDense`: the LLM's `lm_head`) is that tensor as stored, no transpose;
`bias` stays `bias`; norm `scale` and embedding tables are `weight`. `EXCEPTIONS` lists the
tensors that do not follow the rule.

Layer stacks: the decoder layers (`llm.model.layers`) and vision encoder layers
(`vpm.encoder.layers`) are stacked (llm.py, vision.py): the parameter
`llm.model.layers.mlp.up_proj.kernel` [L, D, F] holds the checkpoint's per-layer tensors
`llm.model.layers.{i}.mlp.up_proj.weight` (transposed) at index i of its leading axis. The name
rule and `EXCEPTIONS` apply to the per-layer name `llm.model.layers.{i}.mlp.up_proj.kernel`;
`unstack` lists them for a stacked parameter.

Tensors are read one at a time (safetensors `framework="numpy"`, which reads bfloat16 via
ml_dtypes), converted to the parameter dtype and placed with the parameter's sharding; every
parameter is filled (a stacked one layer by layer) into one 64-byte-aligned host buffer that
becomes the device array, so peak host memory stays near the size of the loaded model plus one
checkpoint tensor. On the CPU backend `jax.device_put` takes such a buffer without copying it
(the array aliases the buffer, which the loader then drops), so the weights are written once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import math
import os
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from minicpmv_jax import quant
from minicpmv_jax.errors import CheckpointError
from minicpmv_jax.sharding import path_name, place

log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], np.ndarray]


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _conv_to_dense(a: np.ndarray) -> np.ndarray:
    # Conv2d weight (O, C, kh, kw) -> Dense kernel (C*kh*kw, O) for patch vectors in (c, kh, kw).
    return a.reshape(a.shape[0], -1).T


def _in_proj(j: int, transpose: bool) -> Transform:
    # torch MHA in_proj_weight (3D, D) / in_proj_bias (3D): rows [jD, (j+1)D) = q, k, v.
    def f(a: np.ndarray) -> np.ndarray:
        d = a.shape[0] // 3
        block = a[j * d : (j + 1) * d]
        return block.T if transpose else block

    return f


# target path -> (source name, transform, source shape from target shape)
EXCEPTIONS: dict[str, tuple[str, Transform, Callable[[tuple], tuple]]] = {
    "vpm.embeddings.patch_embedding.kernel": (
        "vpm.embeddings.patch_embedding.weight",
        _conv_to_dense,
        lambda s: (s[1], 3, math.isqrt(s[0] // 3), math.isqrt(s[0] // 3)),
    ),
    "resampler.proj": ("resampler.proj", _identity, lambda s: s),  # used as x @ proj: no transpose
    **{
        f"resampler.attn.{p}_proj.kernel": (
            "resampler.attn.in_proj_weight",
            _in_proj(j, True),
            lambda s: (3 * s[1], s[0]),
        )
        for j, p in enumerate("qkv")
    },
    **{
        f"resampler.attn.{p}_proj.bias": (
            "resampler.attn.in_proj_bias",
            _in_proj(j, False),
            lambda s: (3 * s[0],),
        )
        for j, p in enumerate("qkv")
    },
}


STACKS = ("llm.model.layers", "vpm.encoder.layers")  # stacked layers: leading axis L


def stack_of(path: Iterable[Any] | str) -> str | None:
    """The layer stack ("llm.model.layers" / "vpm.encoder.layers") a stacked parameter is in."""
    name = path_name(path)
    for stack in STACKS:
        if name.startswith(stack + ".") and not name[len(stack) + 1 :].split(".")[0].isdigit():
            return stack
    return None


def unstack(path: Iterable[Any] | str, num_layers: int) -> list[tuple[int | None, str]]:
    """[(layer index, per-layer parameter name)] of a parameter; [(None, name)] if not stacked.

    'llm.model.layers.mlp.up_proj.kernel' -> [(0, 'llm.model.layers.0.mlp.up_proj.kernel'), ...]
    """
    name = path_name(path)
    stack = stack_of(name)
    if stack is None:
        return [(None, name)]
    rest = name[len(stack) + 1 :]
    return [(i, f"{stack}.{i}.{rest}") for i in range(num_layers)]


def hf_source(path: Iterable[Any] | str) -> tuple[str, Transform, Callable[[tuple], tuple]]:
    """Checkpoint tensor name, transform and source shape of one per-layer parameter path.

    For a stacked parameter pass each per-layer name of `unstack` (and the shape without L).
    """
    name = path_name(path)
    if stack_of(name) is not None:
        raise ValueError(f"{name} is a stacked parameter: map each name of unstack() instead")
    if name in EXCEPTIONS:
        return EXCEPTIONS[name]
    prefix, _, leaf = name.rpartition(".")
    if leaf == "kernel":
        return f"{prefix}.weight", _transpose, lambda s: tuple(reversed(s))
    if leaf in ("scale", "embedding"):
        return f"{prefix}.weight", _identity, lambda s: s
    # bias, a torch-layout `weight` [out, in] (layers.OutInDense), raw params (resampler.query)
    return name, _identity, lambda s: s


def hf_name_and_inverse(
    path: Iterable[Any] | str,
) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """For export/round trips: (source name, param -> source tensor) where it is invertible."""
    name = path_name(path)
    src, _, _ = hf_source(path)
    if name == "vpm.embeddings.patch_embedding.kernel":
        return src, lambda a: a.T.reshape(a.shape[1], 3, math.isqrt(a.shape[0] // 3), -1)
    if name.startswith("resampler.attn.") and src.startswith("resampler.attn.in_proj"):
        return src, None  # fused: handled by to_hf_state_dict
    if name.endswith(".kernel"):
        return src, lambda a: a.T
    return src, lambda a: a


def per_layer_arrays(state: nnx.State | nnx.Module):
    """Yield (per-layer parameter name, array) of every parameter, unstacking the layer stacks.

    Works for parameter states and for gradient (or optimizer-moment) trees of the same layout;
    leaves may be jax or numpy arrays.
    """
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        a = var.get_value() if hasattr(var, "get_value") else var
        if stack_of(path):  # split on the host: a device slice per layer compiles per shape
            a = np.asarray(a)
        for i, name in unstack(path, a.shape[0] if stack_of(path) else 0):
            yield name, (a if i is None else a[i])


def to_hf_state_dict(state: nnx.State | nnx.Module) -> dict[str, np.ndarray]:
    """Parameters (or gradients) -> {official checkpoint tensor name: numpy array}.

    The inverse of the loader: layer stacks are split into the official per-layer tensors
    (`llm.model.layers.3.self_attn.q_proj.weight`), kernels transposed back, the resampler's
    q/k/v fused again. Takes a model, an `nnx.State` of parameters, or any tree of the same
    layout, e.g. the gradients `jax.grad` returns for a parameter state, to compare per-tensor
    values under the official names.
    """
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[int, np.ndarray]] = {}
    for name, arr in per_layer_arrays(state):
        a = np.asarray(arr)
        src, inv = hf_name_and_inverse(name)
        if inv is None:
            j = "qkv".index(name.split(".")[2][0])
            fused.setdefault(src, {})[j] = a.T if name.endswith("kernel") else a
        else:
            out[src] = inv(a)
    for src, parts in fused.items():
        out[src] = np.concatenate([parts[0], parts[1], parts[2]], axis=0)
    return out


def checkpoint_files(folder: str | os.PathLike) -> tuple[list[pathlib.Path], dict[str, str] | None]:
    """safetensors files of a checkpoint folder (index.json if present) and the index weight_map."""
    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable safetensors index ({e})") from e
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(
                f"{folder}: shard files named in {index.name} are missing: {missing}"
            )
        return files, weight_map
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    return files, None


def _safe_open(f: pathlib.Path):
    # pread(2) reads each tensor into a fresh buffer; with the default mmap backend the pages of
    # every tensor read stay mapped (and count as resident) until the file is closed.
    try:
        return safe_open(str(f), framework="numpy", backend="pread")
    except TypeError:  # safetensors without the backend option
        return safe_open(str(f), framework="numpy")


@contextlib.contextmanager
def open_checkpoint(files: list[pathlib.Path]):
    """Open every file; yield {tensor name: reader}. Corrupt/truncated files raise CheckpointError."""
    with contextlib.ExitStack() as stack:
        src: dict[str, Any] = {}
        for f in files:
            try:
                reader = stack.enter_context(_safe_open(f))
                names = list(reader.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(
                    f"{f}: corrupt or truncated safetensors file ({type(e).__name__}: {e})"
                ) from e
            for n in names:
                src[n] = (reader, f)
        yield src


SHOWN = 8  # names listed per kind of problem; the rest are counted


def _first(names: list[str], sep: str) -> str:
    more = f"{sep}... and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return sep.join(names[:SHOWN]) + more


def validate(flat_abstract, src: dict[str, Any]) -> None:
    """Raise ONE CheckpointError counting every missing, unexpected and mis-shaped tensor (the
    first `SHOWN` of each kind named: a config with fewer layers than the checkpoint would
    otherwise print hundreds of names)."""
    needed: dict[str, tuple] = {}
    problems: list[str] = []
    for path, var in flat_abstract:
        if quant.is_scale_path(path):  # int8 scale: computed from its kernel's tensor
            continue
        shape = tuple(var.get_value().shape)
        for i, layer_name in unstack(path, shape[0] if stack_of(path) else 0):
            name, _, src_shape = hf_source(layer_name)
            needed.setdefault(name, tuple(src_shape(shape if i is None else shape[1:])))
    missing = sorted(n for n in needed if n not in src)
    unexpected = sorted(n for n in src if n not in needed)
    mismatched = []
    for n, want in sorted(needed.items()):
        if n in src:
            got = tuple(src[n][0].get_slice(n).get_shape())
            if got != want:
                mismatched.append(f"{n}: checkpoint {got} != model {want}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_first(missing, ', ')}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_first(unexpected, ', ')}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_first(mismatched, '; ')}")
    if problems:
        raise CheckpointError(
            "checkpoint does not match the model config:\n  " + "\n  ".join(problems)
        )


def _read(src: dict[str, Any], param_name: str) -> np.ndarray:
    """One (per-layer) parameter in model layout, read from its checkpoint tensor."""
    name, transform, _ = hf_source(param_name)
    reader, f = src[name]
    try:
        raw = reader.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{f}: corrupt or truncated safetensors file, cannot read {name} ({e})"
        ) from e
    return transform(raw)


ALIGN = 64  # bytes: XLA:CPU aliases a host buffer this aligned instead of copying it
BLOCK = 1024  # source rows per block of a transposed copy


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """`np.empty` whose data starts on an `ALIGN`-byte boundary.

    numpy's own large buffers are 16-byte aligned; XLA:CPU copies those in `jax.device_put`
    and aliases 64-byte-aligned ones, so an aligned staging buffer saves a copy of every weight
    (time and peak memory) when loading on the CPU backend.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


PARALLEL_BYTES = 1 << 22  # tensors from this size on are copied by several threads


@functools.cache
def _copy_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1))


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst[...] = src` (with dtype conversion); a transposed matrix is copied in blocks.

    numpy copies a transposed view (`a.T` of a C-ordered checkpoint tensor) element by element
    with a large stride, about 10x slower than copying `BLOCK` source rows at a time. Large
    tensors are split into pieces copied by a thread pool (numpy releases the GIL while it
    copies; the first writes to fresh memory, page faults included, then run on every core).
    """
    if src.ndim == 2 and not src.flags.c_contiguous and src.T.flags.c_contiguous:
        pieces = [np.s_[:, j : j + BLOCK] for j in range(0, src.shape[1], BLOCK)]  # source rows
    elif src.ndim >= 1 and len(src) > 1:
        rows = max(1, PARALLEL_BYTES // 4 // max(1, dst[0].nbytes))
        pieces = [np.s_[i : i + rows] for i in range(0, len(src), rows)]
    else:
        pieces = [...]
    if dst.nbytes < PARALLEL_BYTES or len(pieces) == 1:
        for piece in pieces:
            dst[piece] = src[piece]
        return
    list(_copy_pool().map(lambda piece: dst.__setitem__(piece, src[piece]), pieces))


def load_safetensors(
    graphdef: nnx.GraphDef,
    abstract: nnx.State,
    files: list[pathlib.Path],
    *,
    progress: bool = True,
) -> nnx.Module:
    """Stream checkpoint tensors into a model.

    Args:
      graphdef, abstract: from `nnx.get_abstract_model` (ShapeDtypeStruct leaves with shardings).
      files: safetensors files (all shards).
      progress: show a tqdm bar.
    Returns: the merged nnx module.
    """
    flat = list(nnx.to_flat_state(abstract))
    scale_vars = {tuple(p): v for p, v in flat if quant.is_scale_path(p)}
    leaves = []
    with open_checkpoint(files) as src:
        validate(flat, src)
        for path, var in tqdm(flat, desc="loading weights", unit="tensor", disable=not progress):
            if quant.is_scale_path(path):  # int8 weight-only: placed with its kernel below
                continue
            sds = var.get_value()
            shape, int8 = tuple(sds.shape), quant.is_int8(sds.dtype)
            layers = unstack(path, shape[0] if stack_of(path) else 0)
            # one aligned host buffer, filled one checkpoint tensor at a time; int8 layers are
            # quantized on the host, so the float weight never moves
            arr = aligned_empty(shape, sds.dtype)
            axis = quant.out_axis(path) if int8 else None  # output channels: kernel or weight
            scale = np.empty(quant.scale_shape(shape, axis), np.float32) if int8 else None
            for i, layer_name in layers:
                w = _read(src, layer_name)
                at = ... if i is None else i
                if int8:
                    w, scale[at] = quant.quantize_kernel(w, axis)
                copy_into(arr[at], w)
                del w
            if int8:
                spath = quant.scale_path(path)
                svar = scale_vars[spath]
                leaves.append((spath, svar.replace(place(scale, svar.get_value().sharding))))
            # place(): each process fills only its own devices' shards (multi-host loading)
            leaves.append((path, var.replace(place(arr, sds.sharding))))
            del arr
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
