"""safetensors -> model: the name rule, the exception table and the tensor transforms.

Name rule: the attribute path of a parameter is its checkpoint key. `...kernel` is the
`...weight` of a torch Linear transposed ((out, in) -> (in, out)); `bias` stays `bias`; norm
`scale` and embedding tables are `weight`. `EXCEPTIONS` lists the tensors that do not follow the
rule. Tensors are read one at a time (safetensors `framework="numpy"`, which reads bfloat16 via
ml_dtypes), converted to the parameter dtype and placed with the parameter's sharding, so peak host
memory stays near the size of the loaded model plus one tensor.
"""

from __future__ import annotations

import contextlib
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


def hf_source(path: Iterable[Any]) -> tuple[str, Transform, Callable[[tuple], tuple]]:
    """Checkpoint tensor name, transform and expected source shape of one parameter path."""
    name = path_name(path)
    if name in EXCEPTIONS:
        return EXCEPTIONS[name]
    prefix, _, leaf = name.rpartition(".")
    if leaf == "kernel":
        return f"{prefix}.weight", _transpose, lambda s: tuple(reversed(s))
    if leaf in ("scale", "embedding"):
        return f"{prefix}.weight", _identity, lambda s: s
    return name, _identity, lambda s: s  # bias, raw params (resampler.query)


def hf_name_and_inverse(path: Iterable[Any]) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
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


def to_hf_state_dict(state: nnx.State) -> dict[str, np.ndarray]:
    """Model params -> checkpoint-layout numpy tensors (inverse of the loader)."""
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[int, np.ndarray]] = {}
    for path, var in nnx.to_flat_state(state):
        a = np.asarray(var.get_value())
        name = path_name(path)
        src, inv = hf_name_and_inverse(path)
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


def validate(flat_abstract, src: dict[str, Any]) -> None:
    """Raise ONE CheckpointError naming every missing, unexpected and mis-shaped tensor."""
    needed: dict[str, tuple] = {}
    problems: list[str] = []
    for path, var in flat_abstract:
        if quant.is_scale_path(path):  # int8 scale: computed from its kernel's tensor
            continue
        name, _, src_shape = hf_source(path)
        want = tuple(src_shape(tuple(var.get_value().shape)))
        needed.setdefault(name, want)
    missing = sorted(n for n in needed if n not in src)
    unexpected = sorted(n for n in src if n not in needed)
    mismatched = []
    for n, want in sorted(needed.items()):
        if n in src:
            got = tuple(src[n][0].get_slice(n).get_shape())
            if got != want:
                mismatched.append(f"{n}: checkpoint {got} != model {want}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError(
            "checkpoint does not match the model config:\n  " + "\n  ".join(problems)
        )


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
            name, transform, _ = hf_source(path)
            reader, f = src[name]
            sds = var.get_value()
            try:
                raw = reader.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(
                    f"{f}: corrupt or truncated safetensors file, cannot read {name} ({e})"
                ) from e
            arr = transform(raw)
            if quant.is_int8(sds.dtype):  # quantized on the host: the float weight never moves
                arr, scale = quant.quantize_kernel(arr)
                spath = quant.scale_path(path)
                svar = scale_vars[spath]
                leaves.append((spath, svar.replace(place(scale, svar.get_value().sharding))))
            arr = np.ascontiguousarray(arr.astype(sds.dtype, copy=False))
            del raw
            # place(): each process fills only its own devices' shards (multi-host loading)
            leaves.append((path, var.replace(place(arr, sds.sharding))))
            del arr
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
