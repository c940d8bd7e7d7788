"""Orbax checkpoint folder -> official safetensors layout (for PyTorch / transformers).

    python -m convert.to_safetensors ./minicpm-v-2_6-orbax ./minicpm-v-2_6-finetuned

Writes the official tensor names, shapes and dtypes (recorded at conversion time in
`minicpmv_jax.json`), sharded into `model-0000i-of-0000N.safetensors` files plus
`model.safetensors.index.json` (one `model.safetensors` when everything fits one shard), and
copies config / tokenizer / processor files. official -> orbax -> official is bit-identical when
the orbax dtype holds the source values exactly (same dtype, or bfloat16 / float16 -> float32).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from minicpmv_jax import checkpoint
from minicpmv_jax import quant as quantization
from minicpmv_jax.errors import CheckpointError
from minicpmv_jax.weights import to_hf_state_dict

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def parse_size(s: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (GB = 10**9 as transformers' save_pretrained)."""
    if isinstance(s, int):
        s = str(s)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B?)\s*", s.upper())
    if not m:
        raise ValueError(f"cannot parse size {s!r} (examples: 5GB, 500MB)")
    num, unit = float(m.group(1)), m.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    size = int(num * base**power)
    if size <= 0:
        raise ValueError(f"max shard size must be at least 1 byte, got {s!r}")
    return size


def _group_tensors(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
    """One group's {parameter path: array} -> ({official name: array}, any int8 layer).

    int8 weight-only layers (quant.py) are dequantized (kernel * kernel_scale, float32): the
    official layout has no int8 tensors.
    """
    leaves, quantized = [], False
    for k, v in arrays.items():
        if quantization.is_scale_path(k):
            continue
        if quantization.is_int8(v.dtype):
            path = checkpoint.param_path(k)
            scale = arrays[".".join(map(str, quantization.scale_path(path)))]
            v = quantization.dequantize_kernel(v, scale, quantization.out_axis(path))
            quantized = True
        leaves.append((checkpoint.param_path(k), nnx.Param(v)))
    return to_hf_state_dict(nnx.from_flat_state(leaves)), quantized


class _ShardWriter:
    """Collects tensors and flushes a shard file whenever the next tensor would overflow it."""

    def __init__(self, folder: pathlib.Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, np.ndarray] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total = 0

    def add(self, name: str, arr: np.ndarray) -> None:
        if self.buffer and self.size + arr.nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = np.ascontiguousarray(arr)
        self.size += arr.nbytes
        self.total += arr.nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        tmp_name = f"part-{len(self.files) + 1:05d}.safetensors"
        # metadata format=pt: transformers' loader expects it in official checkpoints
        save_file(self.buffer, str(self.folder / tmp_name), metadata={"format": "pt"})
        self.files.append((tmp_name, sorted(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> list[str]:
        """Rename parts to their official names; write the index when there are several."""
        self.flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.folder / self.files[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp_name, tensors) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp_name, self.folder / final)
            names.append(final)
            weight_map.update(dict.fromkeys(tensors, final))
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names + [INDEX_FILE]


def convert(
    src: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    max_shard_size: str | int = "5GB",
    dtype: str = "original",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Export an orbax checkpoint folder to the official safetensors layout.

    Args:
      src: folder written by `convert.to_orbax` or `minicpmv_jax.checkpoint.save`.
      out: output folder (written into `.<out>.partial/`, renamed at the end).
      max_shard_size: largest shard file, e.g. "5GB" (transformers' default) or bytes.
      dtype: "original" (the source checkpoint's dtype of each tensor) or a dtype name.
    """
    t0 = time.perf_counter()
    src, out = checkpoint.absolute(src), checkpoint.absolute(out)
    meta = checkpoint.read_metadata(src)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
    tmp = checkpoint.partial_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)  # safetensors shards are cheap to redo: no resume here
    tmp.mkdir(parents=True)
    table: dict[str, dict] = meta.get("tensors") or {}
    max_bytes = parse_size(max_shard_size)
    writer = _ShardWriter(tmp, max_bytes)
    seen: set[str] = set()
    lossy, dequantized = set(), False
    for _, arrays in checkpoint.iter_group_arrays(src, progress=progress):
        tensors, quantized = _group_tensors(arrays)
        dequantized |= quantized
        for name, arr in tensors.items():
            want = table.get(name)
            if dtype != "original":
                target = jnp.dtype(dtype)
            elif want is not None and jnp.issubdtype(jnp.dtype(want["dtype"]), jnp.floating):
                target = jnp.dtype(want["dtype"])
            else:  # no record, or an int8 entry of a quantized save(): keep the array's dtype
                target = arr.dtype
            if want is not None and list(arr.shape) != list(want["shape"]):
                raise CheckpointError(
                    f"{src}: {name} has shape {arr.shape}, the source had {tuple(want['shape'])}"
                )
            if np.dtype(target).itemsize > arr.dtype.itemsize and dtype == "original":
                lossy.add(f"{arr.dtype}->{target}")
            writer.add(name, arr.astype(target, copy=False))
            seen.add(name)
        del arrays
    missing = sorted(n for n in set(table) - seen if not quantization.is_scale_path(n))
    if missing:
        raise CheckpointError(f"{src}: tensors of the source checkpoint not found: {missing}")
    if lossy:
        log.warning("stored values were rounded at conversion time (%s): not bit-identical", lossy)
    if dequantized:
        log.warning("int8 layers were dequantized (kernel * scale): values differ from the source")
    files = writer.finish()
    copied = checkpoint.copy_side_files(src, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {
        "source": str(src),
        "num_tensors": len(seen),
        "bytes": writer.total,
        "files": files,
        "max_shard_size": max_bytes,
        "side_files": copied,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="minicpmv-to-safetensors",
        description="Export an orbax MiniCPM-V checkpoint to the official safetensors layout.",
    )
    ap.add_argument("src", help="orbax checkpoint folder (from minicpmv-to-orbax or save())")
    ap.add_argument("out", help="output folder (written atomically)")
    ap.add_argument("--max-shard-size", default="5GB", help="largest shard file (default 5GB)")
    ap.add_argument(
        "--dtype", default="original", help="'original' (source dtypes) or bfloat16/float32/..."
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        s = convert(
            args.src, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
            overwrite=args.overwrite, progress=not args.no_progress,
        )  # fmt: skip
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        partial = checkpoint.partial_dir(checkpoint.absolute(args.out))
        print(f"interrupted: {partial} holds an unfinished export; run again", file=sys.stderr)
        return 130
    print(
        f"wrote {args.out}: {s['num_tensors']} tensors, {s['bytes'] / 1024**3:.2f} GiB in "
        f"{', '.join(s['files'])}; side files: {', '.join(s['side_files']) or '-'}; "
        f"{s['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
