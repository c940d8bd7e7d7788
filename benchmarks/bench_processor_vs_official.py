"""Time our MiniCPM-V processor against the official MiniCPM-V image processor on one large photo.

Both run in this process on the same synthetic photo (``bench_processor.synthetic_photo``,
default 4032x3024) with the MiniCPM-V 2.6 preprocessor settings of a checkpoint folder
(default: the 2.6 golden-fixture checkpoint; scale_resolution 448, patch 14, max_slice_nums 9).

Rows:
  - ours, full ``processor(msgs)`` call (chat template, slicing, normalise, strips, patches,
    tokenisation, position ids);
  - ours, image part only (``slice_image`` + ``strip_layout`` of every piece): the work the
    official image processor does;
  - official ``MiniCPMVImageProcessor`` called as ``chat()`` calls it
    (``image_processor([[img]], do_pad=True, max_slice_nums=N, return_tensors="pt")``), and
    ``preprocess(img, max_slice_nums=N)`` returning numpy.

The official code is NOT part of this project: pass the folder holding its
``image_processing_minicpmv.py`` with ``--official-dir``; it is imported from there.

    python benchmarks/bench_processor_vs_official.py --official-dir /tmp/official \
        [--model FOLDER] [--size 4032x3024] [--repeats 10] [--warmup 2] [--max-slice-nums 9]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_processor import synthetic_photo, timeit

from minicpmv_jax.image import slice_image, strip_layout
from minicpmv_jax.processor import MiniCPMVProcessor

DEFAULT_MODEL = ROOT / "tests" / "fixtures" / "minicpm-v-2_6" / "checkpoint"


def time_rounds(fns, repeats: int, warmup: int) -> list[list[float]]:
    """Milliseconds per call, interleaved: each round calls every fn once, in order, so that
    load changes on a shared machine hit all rows alike. ``warmup`` untimed rounds first."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(1000 * (time.perf_counter() - t0))
    return times


def timeit_ms(fn, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of ``repeats`` calls after ``warmup`` untimed calls."""
    return [1000 * t for t in timeit(fn, repeats, warmup)]


def load_official(official_dir: pathlib.Path, preprocessor_config: dict):
    """Import the official image processor module from ``official_dir`` and build it from the
    checkpoint's preprocessor_config.json values (as AutoImageProcessor would)."""
    if not (official_dir / "image_processing_minicpmv.py").is_file():
        raise SystemExit(f"{official_dir}: no image_processing_minicpmv.py")
    sys.path.insert(0, str(official_dir))
    module = importlib.import_module("image_processing_minicpmv")
    kwargs = {k: v for k, v in preprocessor_config.items() if k not in ("auto_map",)}
    return module, module.MiniCPMVImageProcessor(**kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-dir", type=pathlib.Path, required=True)
    parser.add_argument("--model", type=pathlib.Path, default=DEFAULT_MODEL)
    parser.add_argument("--size", default="4032x3024")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-slice-nums", type=int, default=9)
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="time each row's calls back to back instead of interleaving rows round by round",
    )
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    msn = args.max_slice_nums

    import PIL
    import torch
    import transformers

    pre_cfg = json.loads((args.model / "preprocessor_config.json").read_text())
    module, official = load_official(args.official_dir.resolve(), pre_cfg)
    proc = MiniCPMVProcessor.from_pretrained(args.model)

    img = synthetic_photo(width, height)
    msgs = [{"role": "user", "content": [img, "What is in this photo? Describe it in detail."]}]

    # ---- agreement -----------------------------------------------------------------------
    ours = proc(msgs, max_slice_nums=msn)
    off_pt = official([[img]], do_pad=True, max_slice_nums=msn, return_tensors="pt")
    off_np = official.preprocess(img, max_slice_nums=msn)
    off_pix = [t.numpy() for t in off_pt["pixel_values"][0]]
    off_tgt = np.asarray(off_pt["tgt_sizes"][0])
    our_pix = list(ours.pixel_values)
    our_tgt = np.asarray(ours.tgt_sizes)
    same_shapes = len(our_pix) == len(off_pix) and all(
        a.shape == b.shape for a, b in zip(our_pix, off_pix)
    )
    max_diff = (
        max(float(np.abs(a - b).max()) for a, b in zip(our_pix, off_pix))
        if same_shapes
        else float("nan")
    )
    np_pt_same = all(np.array_equal(a, b) for a, b in zip(off_pix, off_np["pixel_values"][0]))
    tgt_same = our_tgt.shape == off_tgt.shape and bool(np.array_equal(our_tgt, off_tgt))
    grid = official.get_sliced_grid((width, height), msn)

    # ---- timing --------------------------------------------------------------------------
    def ours_image_only():
        sliced = slice_image(img, msn, proc.scale_resolution, proc.patch_size)
        return [strip_layout(p, proc.patch_size) for p in sliced.pieces]

    rows = [
        ("ours: full processor(msgs) call", lambda: proc(msgs, max_slice_nums=msn)),
        ("ours: image part only (slice + strips)", ours_image_only),
        (
            'official: image_processor([[img]], return_tensors="pt") (as chat())',
            lambda: official([[img]], do_pad=True, max_slice_nums=msn, return_tensors="pt"),
        ),
        (
            "official: preprocess(img) (numpy out)",
            lambda: official.preprocess(img, max_slice_nums=msn),
        ),
    ]
    if args.sequential:
        results = [(name, timeit_ms(fn, args.repeats, args.warmup)) for name, fn in rows]
    else:
        times = time_rounds([fn for _, fn in rows], args.repeats, args.warmup)
        results = [(name, t) for (name, _), t in zip(rows, times)]

    # ---- report --------------------------------------------------------------------------
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(
        f"machine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"
    )
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, pillow {PIL.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}"
    )
    print(f"official module: {module.__file__}")
    print(f"checkpoint: {args.model} (version {proc.version})")
    print(
        f"image: {width}x{height} synthetic photo, max_slice_nums {msn}, grid {grid}, "
        f"slices {len(off_pix)}, tgt_sizes {off_tgt.tolist()}"
    )
    scheme = (
        "each row's calls back to back"
        if args.sequential
        else "rows interleaved round by round (one call of each row per round)"
    )
    print(
        f"one process, {args.warmup} warm-up call(s) then {args.repeats} timed calls per row, "
        f"{scheme}; load average at end {os.getloadavg()[0]:.2f}"
    )
    print()
    print("| what | median ms | min ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, times in results:
        print(f"| {name} | {statistics.median(times):.1f} | {min(times):.1f} | {max(times):.1f} |")
    med = {name: statistics.median(t) for name, t in results}
    full, img_only, off_chat = (med[rows[i][0]] for i in range(3))
    print()
    print(
        f"speed-up vs official (as chat()): full call {off_chat / full:.2f}x, "
        f"image part {off_chat / img_only:.2f}x"
    )
    print()
    print("| agreement (ours full call vs official as chat()) | result |")
    print("|---|---|")
    print(f"| slice count | ours {len(our_pix)}, official {len(off_pix)} |")
    print(f"| pixel_values shapes equal | {same_shapes} |")
    print(f"| pixel_values max abs diff | {max_diff:g} |")
    print(f"| tgt_sizes equal | {tgt_same} |")
    print(f'| official return_tensors="pt" == numpy output | {np_pt_same} |')


if __name__ == "__main__":
    main()
