"""Trace + compile time of the generation programs at released sizes, without any weights.

The model is built abstractly (`MiniCPMV.abstract_module`: shapes and shardings only), so a
full-depth 2.6 / 4.5 compiles on any machine; nothing runs. For each LLM depth it lowers and
compiles the prefill of one image (10 slices, 768-token bucket) and the batch-1 greedy decode
loop, the two programs a first chat() request waits for. The decoder and vision layers run under
`nnx.scan` (one traced layer body per stack), so the time barely grows with the depth; the table
shows by how much. Exception: on CPU a float32 decoder runs unrolled over per-layer weight
arrays (`generate.split_layers`), whose compile time grows with the depth; `--stacked-layers`
compiles it scanned, for the A/B.

    python -m benchmarks.compile_time --preset 2.6 --layers 1,7,14,28
    python -m benchmarks.compile_time --preset 4.5 --out benchmarks/results/compile-4.5-cpu.json
    python -m benchmarks.compile_time --preset 2.6 --dtype float32 --stacked-layers
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import sys
import time
from typing import Any

from flax import nnx

from benchmarks import measure
from benchmarks.models import preset_processor
from minicpmv_jax import generate
from minicpmv_jax.batching import Buckets
from minicpmv_jax.config import PRESETS
from minicpmv_jax.model import MiniCPMV

VERSIONS = ("2.6", "4.5")  # the versions whose tokenizer benchmarks/models.py has


def compile_times(config, *, prompt_len: int, num_slices: int, max_new_tokens: int) -> dict:
    """Seconds to lower and to compile the prefill and the greedy decode of one request."""
    graphdef, abstract = MiniCPMV.abstract_module(config)
    processor = preset_processor(config.version, config.query_num)  # stop tokens
    model = MiniCPMV(config, nnx.merge(graphdef, abstract), processor)
    gen = model.configure_generation(Buckets())
    t0 = time.perf_counter()
    report = gen.memory_report(1, prompt_len, max_new_tokens, num_slices=num_slices)
    total = time.perf_counter() - t0
    return {"seconds": total, "token_bucket": report["token_bucket"], **report["timings"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_time", description=__doc__)
    p.add_argument("--preset", choices=VERSIONS, default="2.6")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", default=None, help="LLM depths to compile (default: full depth)")
    p.add_argument("--prompt-tokens", type=int, default=710)
    p.add_argument("--slices", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument(
        "--stacked-layers",
        action="store_true",
        help="keep the decoder stacked and scanned on CPU too (generate.SPLIT_LAYERS = False)",
    )
    args = p.parse_args(argv)
    generate.SPLIT_LAYERS = not args.stacked_layers
    load_start = os.getloadavg()

    base = PRESETS[args.preset].with_dtype(args.dtype)
    depths = [int(x) for x in args.layers.split(",")] if args.layers else [base.llm.num_layers]
    rows = []
    for n in depths:
        cfg = dataclasses.replace(base, llm=dataclasses.replace(base.llm, num_layers=n))
        r = compile_times(
            cfg,
            prompt_len=args.prompt_tokens,
            num_slices=args.slices,
            max_new_tokens=args.max_new_tokens,
        )
        rows.append({"llm_layers": n, **r})
        print(
            f"LLM {n}/{base.llm.num_layers} layers: prefill lower {r['prefill_lower_s']:.1f} s "
            f"+ compile {r['prefill_compile_s']:.1f} s, decode lower {r['decode_lower_s']:.1f} s "
            f"+ compile {r['decode_compile_s']:.1f} s",
            flush=True,
        )
    report: dict[str, Any] = {
        "command": "python -m benchmarks.compile_time " + " ".join(argv or sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": measure.machine_info(),
        "device": measure.device_info(),
        "versions": measure.versions(),
        "preset": args.preset,
        "dtype": args.dtype,
        "vision_layers": base.vision.num_layers,
        "prompt_tokens": args.prompt_tokens,
        "slices": args.slices,
        "decoder_layers": "stacked" if args.stacked_layers else "split on CPU float32",
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "rows": rows,
    }
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


def markdown(report: dict[str, Any]) -> str:
    title = (
        f"MiniCPM-V {report['preset']} ({report['dtype']}, vision {report['vision_layers']} "
        f"layers), one {report['slices']}-slice image + {report['prompt_tokens']} prompt tokens, "
        f"batch 1; {report['device']['device_kind']}, {report['date']}"
    )
    head = (
        "| LLM layers | prefill: trace + lower s | prefill: compile s | decode: trace + lower s "
        "| decode: compile s |"
    )
    lines = [
        title,
        "",
        head,
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['llm_layers']} | {r['prefill_lower_s']:.1f} | {r['prefill_compile_s']:.1f} "
            f"| {r['decode_lower_s']:.1f} | {r['decode_compile_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
