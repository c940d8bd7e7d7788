"""Our full fine-tuning step with the trainable decoder stack as per-layer arrays (A,
`train.loop.SPLIT_TRAINABLE_LAYERS`) against the stacked, scanned stack (B), built in turn in one
process, A B A ...:

    python -m benchmarks.train_split_ab --layers 2 --seq 512 --phases 3 --repeats 3

The same widths, weights and batch as `benchmarks.train_step` (preset 2.6, `--vocab` rows, one
row of `--seq` tokens, float32, remat "none"); each phase builds and compiles the step, warms it
up once and times `--repeats` steps. Alternating phases lets a load that changes during the run
hit both layouts, which sequential rows of train_step do not.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys
import time

from benchmarks import measure
from benchmarks import train_step as ts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_split_ab", description=__doc__)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--phases", type=int, default=3, help="A B A ... phases")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/train-full-split-aba-epyc.json")
    args = p.parse_args(argv)
    from minicpmv_jax.train import loop

    bench = ts.build("2.6", args.layers, args.vocab, "float32")
    batch = ts.make_batch(1, args.seq, args.vocab)
    report = {
        "command": "python -m benchmarks.train_split_ab " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": measure.machine_info(),
        "load_average_start": measure.load_average(),
        "phases": [],
    }
    for i in range(args.phases):
        layout = "split" if i % 2 == 0 else "stacked"
        loop.SPLIT_TRAINABLE_LAYERS = layout == "split"
        step = ts.jax_full(bench, batch, "none")
        loss = step()
        seconds = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - t)
        row = {
            "layout": layout,
            "first_loss": loss,
            "seconds": seconds,
            "temp_bytes": step.info.get("temp_bytes"),
            "load_average": measure.load_average(),
        }
        print(row, flush=True)
        report["phases"].append(row)
        del step
        gc.collect()
    report["load_average_end"] = measure.load_average()
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
