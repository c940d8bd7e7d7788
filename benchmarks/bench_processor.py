"""Time the MiniCPM-V processor on a large synthetic photo (default 4032x3024, noise + gradients).

Measures the whole ``processor(msgs)`` call and its main pieces (resize/slice, normalise +
patchify, strip layout, chat template, tokenisation, position ids); prints the median and
spread of each over ``--repeats`` runs.

    python benchmarks/bench_processor.py [--model FOLDER] [--size 4032x3024] [--repeats 10]
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import sys
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
try:
    import minicpmv_jax  # noqa: F401  (installed with pip install -e .)
except ImportError:  # running from a plain checkout
    sys.path.insert(0, str(ROOT))

from minicpmv_jax.image import patchify, slice_image, strip_layout
from minicpmv_jax.processor import (
    MiniCPMVProcessor,
    patch_bucket_size,
    vision_mask,
    vision_position_ids,
)

DEFAULT_MODEL = ROOT / "tests" / "fixtures" / "minicpm-v-4_5-real-tokenizer" / "processor"


def synthetic_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """RGB photo-like image: smooth colour gradients plus per-pixel noise (defeats any shortcut)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    base = np.stack(
        [255 * x * np.ones_like(y), 255 * y * np.ones_like(x), 127 + 100 * np.sin(8 * x + 5 * y)],
        -1,
    )
    noise = rng.normal(0, 20, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def timeit(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=DEFAULT_MODEL)
    parser.add_argument("--size", default="4032x3024")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-slice-nums", type=int, default=None)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))

    proc = MiniCPMVProcessor.from_pretrained(args.model)
    img = synthetic_photo(width, height)
    msns = proc.max_slice_nums if args.max_slice_nums is None else args.max_slice_nums
    msgs = [{"role": "user", "content": [img, "What is in this photo? Describe it in detail."]}]

    # Pieces, each fed exactly what the full call feeds it.
    out = proc(msgs, max_slice_nums=msns)
    sliced = slice_image(img, msns, proc.scale_resolution, proc.patch_size)
    tgt = out.tgt_sizes
    num_patches = patch_bucket_size(int(tgt.prod(1).max()), proc.patch_buckets)
    buf = np.zeros((len(sliced.pieces), num_patches, 3 * proc.patch_size**2), np.float32)

    def run_patchify():
        for i, piece in enumerate(sliced.pieces):
            patchify(piece, proc.patch_size, out=buf[i])

    rows = [
        ("full processor call", lambda: proc(msgs, max_slice_nums=msns)),
        (
            "resize + slice (PIL bicubic)",
            lambda: slice_image(img, msns, proc.scale_resolution, proc.patch_size),
        ),
        ("normalise + patchify [I,P,588]", run_patchify),
        (
            "normalise + strips [3,14,L*14]",
            lambda: [strip_layout(p, proc.patch_size) for p in sliced.pieces],
        ),
        ("chat template (jinja2)", lambda: proc.apply_chat_template(msgs)),
        ("tokenise expanded prompt", lambda: proc.tokenizer.encode(out.prompt)),
        (
            "position ids + masks",
            lambda: (
                vision_position_ids(tgt, num_patches, proc.version),
                vision_mask(tgt, num_patches, proc.version),
            ),
        ),
    ]
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(f"model folder: {args.model} (version {proc.version}, query_num {proc.query_num})")
    print(
        f"image: {width}x{height}, max_slice_nums {msns}, grid {sliced.grid}, slices {len(tgt)} "
        f"(tgt {tgt[0].tolist()} + {tgt[1:2].tolist()}...), P {num_patches}, tokens {len(out.input_ids)}"
    )
    print(f"{'stage':34s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s}")
    for name, fn in rows:
        times = [1000 * t for t in timeit(fn, args.repeats)]
        print(f"{name:34s} {statistics.median(times):10.2f} {min(times):9.2f} {max(times):9.2f}")


if __name__ == "__main__":
    main()
