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

Tensors are read one at a time through a memory mapping of their file (`MappedFile`: numpy
views of the page cache, bfloat16 via ml_dtypes; dtypes it does not know are read by safetensors),
converted to the parameter dtype and placed with the parameter's sharding; every parameter is
filled (a stacked one layer by layer) into one 64-byte-aligned host buffer that becomes the
device array, and each tensor's mapped pages are released once copied, so peak host memory stays
near the size of the loaded model plus one checkpoint tensor. On the CPU backend
`jax.device_put` takes such a buffer without copying it (the array aliases the buffer, which the
loader then drops), so the weights are written once, by all cores (`copy_into`), into 4 KiB pages
(`HUGE_PAGES`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import math
import mmap
import os
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
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


# safetensors dtype names -> numpy dtypes the mapped reader understands (others are read by
# safetensors itself)
_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I8": np.int8,
    "U8": np.uint8,
    "I16": np.int16,
    "U16": np.uint16,
    "I32": np.int32,
    "U32": np.uint32,
    "I64": np.int64,
    "U64": np.uint64,
    "BOOL": np.bool_,
}


def _corrupt(f: pathlib.Path, why: str) -> CheckpointError:
    return CheckpointError(f"{f}: corrupt or truncated safetensors file ({why})")


class MappedFile:
    """One safetensors file, memory-mapped: `tensor(name)` is a numpy view of the file's bytes.

    The mapping is private (copy-on-write): nothing written through a view reaches the file.
    The loader reads each tensor through its view (the kernel's page cache, no read buffer and
    no copy into one) and then `release`s the view's pages, so the file's pages do not pile up
    in the process's resident set while the model is filled.
    """

    def __init__(self, path: pathlib.Path):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise _corrupt(path, f"header length {n} does not fit in {size} bytes")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise _corrupt(path, f"header is not JSON: {e}") from e
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.start, self.size = 8 + n, size
        self.entries: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
        if not isinstance(header, dict):
            raise _corrupt(path, "header is not a JSON object")
        for name, e in header.items():
            if name == "__metadata__" or not isinstance(e, dict) or e.get("dtype") not in _DTYPES:
                continue  # read by safetensors itself (open_checkpoint) when asked for
            dtype = np.dtype(_DTYPES[e["dtype"]])
            shape = tuple(int(d) for d in e["shape"])
            begin, end = (int(o) for o in e["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or self.start + end > size:
                raise _corrupt(path, f"{name}: bytes [{begin}, {end}) past the data or wrong size")
            self.entries[name] = (dtype, shape, self.start + begin, self.start + end)

    def tensor(self, name: str) -> np.ndarray | None:
        """A read-only view of tensor `name` (None when its dtype is not in `_DTYPES`)."""
        if name not in self.entries:
            return None
        dtype, shape, begin, _ = self.entries[name]
        a = np.frombuffer(self.map, dtype, math.prod(shape), begin).reshape(shape)
        a.flags.writeable = False
        return a

    def release(self, name: str) -> None:
        """Drop the pages of tensor `name` from this process's mapping (they stay in the page
        cache; a later read maps them again)."""
        _, _, begin, end = self.entries[name]
        first = begin // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(-(-end // mmap.PAGESIZE) * mmap.PAGESIZE, len(self.map))
        if end > first and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED, first, end - first)


def _source(src: dict[str, Any], maps: dict[pathlib.Path, MappedFile], name: str):
    """(raw checkpoint tensor `name`, its mapped file or None when read by safetensors)."""
    reader, f = src[name]
    mapped = maps.get(f)
    raw = mapped.tensor(name) if mapped is not None else None
    if raw is not None:
        return raw, mapped
    try:
        return reader.get_tensor(name), None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{f}: corrupt or truncated safetensors file, cannot read {name} ({e})"
        ) from e


def _read(src: dict[str, Any], param_name: str, maps=None) -> np.ndarray:
    """One (per-layer) parameter in model layout, read from its checkpoint tensor."""
    name, transform, _ = hf_source(param_name)
    return transform(_source(src, maps or {}, name)[0])


ALIGN = 64  # bytes: XLA:CPU aliases a host buffer this aligned instead of copying it
BLOCK = 256  # source rows per block of a transposed copy
MAPPED_BYTES = 1 << 20  # host buffers from this size on are anonymous mappings (no huge pages)
# Transparent huge pages on the parameter buffers: off. On the 2-core KVM guest where loading was
# measured (BENCHMARKS.md, "One chat turn"), memory the host has not backed yet (e.g. just freed
# by another process) is first touched at 0.4-0.75 GB/s in 2 MiB pages and at 1.6-2.0 GB/s in
# 4 KiB pages written by two threads; numpy asks for huge pages on every large array.
HUGE_PAGES = False


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """`np.empty` whose data starts on an `ALIGN`-byte boundary.

    numpy's own large buffers are 16-byte aligned; XLA:CPU copies those in `jax.device_put`
    and aliases 64-byte-aligned ones, so an aligned staging buffer saves a copy of every weight
    (time and peak memory) when loading on the CPU backend. Buffers of `MAPPED_BYTES` or more
    are anonymous memory mappings (page-aligned), with huge pages as `HUGE_PAGES` says; the
    mapping is unmapped when the last array viewing it (the device array) is freed.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= MAPPED_BYTES:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advice = getattr(mmap, "MADV_HUGEPAGE" if HUGE_PAGES else "MADV_NOHUGEPAGE", None)
        if advice is not None:  # Linux
            buf.madvise(advice)
        return np.frombuffer(buf, dtype).reshape(shape)
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


PARALLEL_BYTES = 1 << 22  # tensors from this size on are copied by several threads
# Destination bytes per piece of a parallel untransposed copy (the embedding table, lm_head).
# Each piece costs its thread a GIL acquisition, and the loader copies while the processor loads
# in Python on a side thread: with 1 MiB pieces the 1.1 GB float32 embedding + lm_head copy took
# 0.94-1.35 s, with 32 MiB pieces 0.50-0.68 s (BENCHMARKS.md, "Float32 load: untransposed
# copies in 32 MiB pieces").
PIECE_BYTES = 1 << 25
COPY_THREADS = min(8, os.cpu_count() or 1)


@functools.cache
def _copy_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(COPY_THREADS)


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst[...] = src` (with dtype conversion); a transposed matrix is copied in blocks.

    numpy copies a transposed view (`a.T` of a C-ordered checkpoint tensor) element by element
    with a large stride, about 10x slower than copying `BLOCK` source rows at a time. Large
    tensors are split into pieces copied by a thread pool (numpy releases the GIL while it
    copies and converts, ml_dtypes' bfloat16 casts included; the first writes to fresh memory,
    page faults included, then run on every core): transposed ones into their `BLOCK`s,
    untransposed ones into pieces of up to `PIECE_BYTES`.
    """
    if src.ndim == 2 and not src.flags.c_contiguous and src.T.flags.c_contiguous:
        pieces = [np.s_[:, j : j + BLOCK] for j in range(0, src.shape[1], BLOCK)]  # source rows
    elif src.ndim >= 1 and len(src) > 1:  # row pieces, at least one per thread
        piece = min(PIECE_BYTES, -(-dst.nbytes // COPY_THREADS))
        rows = max(1, piece // max(1, dst[0].nbytes))
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
        maps = {f: MappedFile(f) for f in files}
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
                name, transform, _ = hf_source(layer_name)
                raw, mapped = _source(src, maps, name)
                w = transform(raw)
                at = ... if i is None else i
                if int8:
                    w, scale[at] = quant.quantize_kernel(w, axis)
                copy_into(arr[at], w)
                del w, raw
                if mapped is not None:
                    mapped.release(name)
            if int8:
                spath = quant.scale_path(path)
                svar = scale_vars[spath]
                leaves.append((spath, svar.replace(place(scale, svar.get_value().sharding))))
            # place(): each process fills only its own devices' shards (multi-host loading)
            leaves.append((path, var.replace(place(arr, sds.sharding))))
            del arr
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
