"""``minicpmv-jax layout``: show how a prompt with images is laid out for the model.

    minicpmv-jax layout --model FOLDER --image photo.jpg [--image b.png] "What is this?"

Prints the slice grid and tgt sizes of every image, the number of tokens, ``image_bound`` and
the expanded prompt with each run of ``<unk>`` feature placeholders collapsed as ``<unk>x64``.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np

from minicpmv_jax.errors import MiniCPMVError
from minicpmv_jax.image import get_sliced_grid, load_image
from minicpmv_jax.processor import MiniCPMVProcessor


def collapse_runs(text: str, token: str) -> str:
    """Replace every run of 2+ ``token`` by ``f"{token}x{n}"``."""
    pattern = re.compile(f"(?:{re.escape(token)}){{2,}}")
    return pattern.sub(lambda m: f"{token}x{len(m.group(0)) // len(token)}", text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minicpmv-jax layout", description="Show the prompt / token layout of a request."
    )
    parser.add_argument("--model", required=True, help="checkpoint (or processor-only) folder")
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    parser.add_argument("question", nargs="?", default="", help="user text after the images")
    parser.add_argument("--max-slice-nums", type=int, default=None)
    parser.add_argument("--no-image-id", action="store_true", help="use_image_id=False")
    parser.add_argument("--thinking", action="store_true", help="4.5: enable_thinking=True")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--ids", action="store_true", help="also print the input ids")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["layout"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        proc = MiniCPMVProcessor.from_pretrained(args.model)
        images = [
            load_image(path, max_pixels=proc.max_pixels, what=f"image {path!r}")
            for path in args.image
        ]
        content = [*images, args.question] if args.question or not images else images
        out = proc(
            [{"role": "user", "content": content}],
            max_slice_nums=args.max_slice_nums,
            use_image_id=False if args.no_image_id else None,
            enable_thinking=args.thinking,
            system_prompt=args.system,
        )
    except MiniCPMVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    msn = proc.max_slice_nums if args.max_slice_nums is None else args.max_slice_nums
    print(
        f"model: {args.model} (MiniCPM-V {proc.version}, query_num {proc.query_num}, "
        f"max_slice_nums {msn})"
    )
    first = 0
    for path, img in zip(args.image, images):
        grid = get_sliced_grid(img.size, msn, proc.scale_resolution)
        n = 1 + (grid[0] * grid[1] if grid else 0)
        tgt = out.tgt_sizes[first : first + n]
        grid_text = f"{grid[0]} cols x {grid[1]} rows" if grid else "not sliced"
        slices = f", slices {len(tgt) - 1} x (h, w) {tuple(tgt[1].tolist())}" if grid else ""
        print(
            f"image {path}: {img.size[0]}x{img.size[1]} -> {grid_text}; "
            f"source (h, w) {tuple(tgt[0].tolist())}{slices} [patches of {proc.patch_size}px]"
        )
        first += n
    lengths = out.tgt_sizes.prod(1) if len(out.tgt_sizes) else np.zeros(0, int)
    print(
        f"input_ids: {len(out.input_ids)} tokens "
        f"({int((out.input_ids == proc.unk_id).sum())} image-feature <unk> tokens)"
    )
    print(f"image_bound ({len(out.image_bound)} rows): {out.image_bound.tolist()}")
    print(f"tgt_sizes ({len(out.tgt_sizes)} slices): {out.tgt_sizes.tolist()}")
    if len(lengths):
        print(
            f"vision batch: {len(lengths)} slices x P={out.pixel_patches.shape[1]} "
            f"(largest slice {int(lengths.max())} patches)"
        )
    print("prompt:")
    print(collapse_runs(out.prompt, proc.tokens["unk"]))
    if args.ids:
        print("input_ids:", out.input_ids.tolist())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
