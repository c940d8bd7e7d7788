"""Official MiniCPM-V folder (or hub id) -> orbax checkpoint folder, streamed group by group.

    python -m convert.to_orbax openbmb/MiniCPM-V-2_6 ./minicpm-v-2_6-orbax --dtype bfloat16

The output loads with `MiniCPMV.from_pretrained(out, mesh=...)`, each array read straight into
its sharding. Host memory is bounded by one parameter group (one layer, or the embedding table)
and the buffers orbax uses to write it, not by the model size. Interrupting leaves only `.<out>.partial/`; running the same command again
resumes after the last finished group.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import pathlib
import resource
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from minicpmv_jax import checkpoint
from minicpmv_jax import quant as quantization
from minicpmv_jax.config import MiniCPMVConfig
from minicpmv_jax.errors import CheckpointError
from minicpmv_jax.weights import (
    EXCEPTIONS,
    checkpoint_files,
    hf_source,
    open_checkpoint,
    path_name,
    validate,
)

log = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float32", "float16")
TRANSPOSE_BLOCK_BYTES = 64 << 20


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _auto_dtype(table: dict[str, dict]) -> str:
    """The source's own float dtype (the most common one by element count)."""
    counts: dict[str, int] = {}
    for t in table.values():
        if t["dtype"] in ("bfloat16", "float16", "float32", "float64"):
            counts[t["dtype"]] = counts.get(t["dtype"], 0) + int(np.prod(t["shape"]))
    return max(counts, key=counts.get) if counts else "float32"


def _lossy(src_dtype: str, dst_dtype: str) -> bool:
    """True where src -> dst -> src does not return the same bits for every value."""
    if src_dtype == dst_dtype:
        return False
    exact = {("bfloat16", "float32"), ("float16", "float32"), ("bfloat16", "float64")}
    exact |= {("float16", "float64"), ("float32", "float64")}
    return (src_dtype, dst_dtype) not in exact


def read_param(src_map: dict[str, Any], path: tuple, dtype: np.dtype) -> np.ndarray:
    """One parameter in model layout and `dtype`, read from its official tensor.

    Transposed Linear weights (`...kernel` = `...weight`.T, the name rule of weights.py) are
    filled in row blocks, so a 1 GiB embedding-sized matrix never exists twice in memory.
    """
    name, transform, _ = hf_source(path)
    reader, _ = src_map[name]
    if path_name(path).endswith(".kernel") and path_name(path) not in EXCEPTIONS:
        sl = reader.get_slice(name)
        rows, cols = sl.get_shape()
        out = np.empty((cols, rows), dtype)
        step = max(1, TRANSPOSE_BLOCK_BYTES // (4 * cols))
        for i in range(0, rows, step):
            j = min(i + step, rows)  # safetensors slices do not clamp
            out[:, i:j] = sl[i:j].T
        return out
    raw = reader.get_tensor(name)
    return np.ascontiguousarray(transform(raw).astype(dtype, copy=False))


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise; RSS would only grow)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def convert(
    src: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    dtype: str = "auto",
    quant: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert one official checkpoint; returns a summary dict (also stored in the output).

    Args:
      src: official folder (config.json + safetensors + tokenizer files) or hub id "org/name".
      out: output folder; must not exist unless `overwrite`.
      dtype: parameter dtype of the orbax checkpoint; "auto" keeps the source dtype.
      quant: None, "int8" or "int8+vision": store int8 weight-only layers with per-channel
        scales (see quant.py), quantized on the host one tensor at a time.
    """
    from minicpmv_jax.model import MiniCPMV, resolve_checkpoint  # heavy imports only here
    from minicpmv_jax.sharding import make_mesh

    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} not in {DTYPES}")
    folder = resolve_checkpoint(src)
    out = checkpoint.absolute(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{folder}: config.json is missing")
    hf = json.loads(cfg_file.read_text())
    files, _ = checkpoint_files(folder)
    with open_checkpoint(files) as src_map:
        table = checkpoint.safetensors_table(src_map)
        dtype = _auto_dtype(table) if dtype == "auto" else dtype
        lossy = sorted({t["dtype"] for t in table.values() if _lossy(t["dtype"], dtype)})
        if lossy:
            log.warning(
                "storing %s tensors as %s loses precision: converting back will not be "
                "bit-identical",
                lossy,
                dtype,
            )
        config = MiniCPMVConfig.from_hf(hf, dtype=dtype)
        # Conversion runs on the host: one CPU device, no sharding.
        cpu = jax.local_devices(backend="cpu")[0]
        quant_cfg = quantization.parse(quant)
        mesh = make_mesh((1, 1, 1), [cpu])
        _, abstract = MiniCPMV.abstract_module(config, mesh, quant_cfg)
        flat = list(nnx.to_flat_state(abstract))
        validate(flat, src_map)  # one clear error for missing / extra / mis-shaped tensors
        signature = {
            "source": str(folder.resolve()),
            "dtype": dtype,
            "quant": quant,
            "files": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files],
        }
    writer = checkpoint.CheckpointWriter(out, signature, overwrite=overwrite)
    groups = checkpoint.grouped(flat)
    todo = sum(len(v) for g, v in groups.items() if not writer.has(g))
    if writer.resumed:
        log.info("resuming: %d of %d groups already written", len(writer.done), len(groups))
    bar = tqdm(total=todo, desc="converting", unit="tensor", disable=not progress)
    for g, items in groups.items():
        if writer.has(g):
            continue
        bar.set_postfix_str(g)
        arrays = []
        # Files are reopened per group: safetensors memory-maps them, and the pages an earlier
        # group touched would otherwise stay in this process's resident set until the end.
        with writer.failing_names_partial(g), open_checkpoint(files) as src_map:
            # numpy leaves: orbax writes them as they are (no device copy); int8 layers are
            # quantized here and get their kernel_scale leaf
            arrays = quantization.read_quantized(
                items, lambda path, dt: read_param(src_map, path, np.dtype(dt))
            )
            bar.update(len(items))
            writer.write_group(g, arrays)
        del arrays
        release_free_memory()
    bar.close()
    copied = writer.copy_files(folder)
    n = sum(int(np.prod(v.get_value().shape)) for _, v in flat)
    nbytes = sum(
        int(np.prod(v.get_value().shape)) * np.dtype(v.get_value().dtype).itemsize for _, v in flat
    )
    summary = {
        "source": str(src),
        "version": config.version,
        "dtype": dtype,
        "source_dtypes": sorted({t["dtype"] for t in table.values()}),
        "num_tensors": len(table),
        "num_params": n,
        "bytes": nbytes,
        "quant": quant,
        "tensors": table,
        "side_files": copied,
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "resumed": writer.resumed,
    }
    writer.finish(summary)
    return summary


def format_summary(summary: dict[str, Any], out: str | pathlib.Path) -> str:
    gib = 1024**3
    return "\n".join(
        [
            f"wrote {out}",
            (
                f"  MiniCPM-V {summary['version']}: {summary['num_tensors']} tensors, "
                f"{summary['num_params'] / 1e9:.3f} B parameters, "
                f"{summary['bytes'] / gib:.2f} GiB as {summary['dtype']} "
                f"(source {', '.join(summary['source_dtypes'])})"
            ),
            f"  side files: {', '.join(summary['side_files']) or '-'}",
            f"  {summary['seconds']:.1f} s, peak RSS {summary['peak_rss_bytes'] / gib:.2f} GiB"
            + (" (resumed)" if summary["resumed"] else ""),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="minicpmv-to-orbax",
        description="Convert an official MiniCPM-V checkpoint (folder or hub id) to orbax.",
    )
    ap.add_argument("src", help="official checkpoint folder or Hugging Face hub id")
    ap.add_argument("out", help="output folder (written atomically)")
    ap.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="parameter dtype (default: source)"
    )
    ap.add_argument(
        "--quant",
        default=None,
        choices=("int8", "int8+vision"),
        help="int8 weight-only LLM layers (+ vision tower) with per-channel scales",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = convert(
            args.src, args.out, dtype=args.dtype, quant=args.quant, overwrite=args.overwrite,
            progress=not args.no_progress,
        )  # fmt: skip
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        partial = checkpoint.partial_dir(checkpoint.absolute(args.out))
        print(
            f"interrupted: what was written is in {partial}; run again to resume", file=sys.stderr
        )
        return 130
    print(format_summary(summary, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
