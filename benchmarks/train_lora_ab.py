"""Interleaved timing of one LoRA train step: ours on the input path (the frozen decoder layers
read in place on CPU), the same step with the decoder stack kept whole and scanned, ours as a
weight delta, and the PyTorch peer, in one process (the ratios hold under a changing load).

    python -m benchmarks.train_lora_ab --layers 2 --seq 512 --repeats 3
    python -m benchmarks.train_lora_ab --layers 2 --kinds input stacked delta torch

The steps are `benchmarks.train_step`'s `lora` / `lora_delta` kinds and their peer (2.6 widths,
truncated depth, random weights, float32, no remat, LoRA r 64 / alpha 64 on q/k/v); `stacked`
is `lora` built with `train.loop.SPLIT_FROZEN_LAYERS = False` (the scanned stack: XLA:CPU
copies each layer's weight slice before its dots). Each is built and run once (compile,
warm-up; first losses compared), then they alternate for `--repeats` rounds, the order
reversed every other round.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

from benchmarks import measure
from benchmarks import train_step as ts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_lora_ab", description=__doc__)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    kinds = ("input", "stacked", "delta", "torch")
    p.add_argument("--kinds", nargs="+", choices=kinds, default=["input", "stacked", "torch"])
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    bench = ts.build("2.6", args.layers, args.vocab, "float32")
    batch = ts.make_batch(1, args.seq, args.vocab)
    from minicpmv_jax.train import loop

    def stacked():
        loop.SPLIT_FROZEN_LAYERS = False  # read when the Trainer is built
        try:
            return ts.jax_lora(bench, batch, "none", "input")
        finally:
            loop.SPLIT_FROZEN_LAYERS = True

    makers = {
        "input": lambda: ts.jax_lora(bench, batch, "none", "input"),
        "stacked": stacked,
        "delta": lambda: ts.jax_lora(bench, batch, "none", "delta"),
        "torch": lambda: ts.torch_lora(bench, batch, "none"),
    }
    makers = {k: v for k, v in makers.items() if k in args.kinds}
    report = {
        "command": "python -m benchmarks.train_lora_ab " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average_start": measure.load_average(),
        "layers": args.layers,
        "seq": args.seq,
        "first_loss": {},
        "seconds": {k: [] for k in makers},
    }
    steps = {}
    for name, make in makers.items():
        steps[name] = make()
        report["first_loss"][name] = steps[name]()
    ours = [k for k in makers if k != "torch"]
    report["temp_bytes"] = {k: steps[k].info["temp_bytes"] for k in ours}
    order = list(makers)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            steps[name]()
            report["seconds"][name].append(time.perf_counter() - start)
    median = {k: float(np.median(v)) for k, v in report["seconds"].items()}
    report["median_s"] = median
    if "torch" in median:
        report["speed_vs_torch"] = {k: median["torch"] / median[k] for k in ours}
    if {"input", "stacked"} <= set(median):
        report["speed_layer_views_vs_stacked"] = median["stacked"] / median["input"]
    report["load_average_end"] = measure.load_average()
    out = pathlib.Path(
        args.out
        or pathlib.Path(__file__).parent
        / "results"
        / f"train-lora-ab-2.6-cpu-float32-{args.layers}layers.json"
    )
    out.write_text(json.dumps(report, indent=1) + "\n")
    keys = ("median_s", "speed_vs_torch", "speed_layer_views_vs_stacked", "first_loss")
    print(json.dumps({k: report[k] for k in keys if k in report}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
