"""Decode row buckets of the serving engine: the time of one decode step per bucket and of one
slot move, on the same engine, interleaved.

    python -m benchmarks.serve_buckets --preset 2.6 --layers 1 --vision-layers 1 --dtype float32

What it answers: how much a lone request gains from stepping a smaller bucket (the step time per
row count), and whether moving a busy row down to shrink the bucket pays (a move costs one
program call that copies one row of cache and state; it saves the difference between two bucket
step times on every following step). The engine compiles its programs in ``start()``; the timed
calls run the compiled programs on the engine's own cache (idle rows: the same programs and
shapes as serving).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time

import numpy as np

from benchmarks import models
from benchmarks.serve import BUCKETS, ClampedProcessor
from minicpmv_jax.generate import RequestShape
from minicpmv_jax.serve.engine import Engine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="2.6")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vision-layers", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=4, help="calls per program per round")
    p.add_argument("--out", default=None, help="JSON report path")
    args = p.parse_args(argv)

    bench = models.build(args.preset, dtype=args.dtype, layers=args.layers,
                         vision_layers=args.vision_layers)  # fmt: skip
    model = bench.model
    if bench.clamp_ids is not None:
        model.processor = ClampedProcessor(model.processor, bench.clamp_ids)
    model.configure_generation(buckets=BUCKETS)
    engine = Engine(model, slots=args.slots, max_len=args.max_len,
                    warmup=[RequestShape(prompt_tokens=BUCKETS.tokens[0])])  # fmt: skip
    t0 = time.perf_counter()
    engine.start()
    compile_s = time.perf_counter() - t0
    s = model.sampler

    def decode(rows):
        with s.context():
            tok, engine._cache, engine._state = engine._decode(
                s.graphdef, s.state, engine._cache, engine._state,
                terminators=engine.terminators, active=rows)  # fmt: skip
            np.asarray(tok)

    def move():
        engine._move_call(args.slots - 1, 0)
        np.asarray(engine._cache.end)

    programs = {f"decode {b} rows": (lambda b=b: decode(b)) for b in engine.decode_buckets}
    programs["move one row"] = move
    times: dict[str, list[float]] = {k: [] for k in programs}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, fn in programs.items():
            for _ in range(args.calls):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    engine.shutdown(drain=False)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.serve_buckets "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "model": {"source": bench.source, "truncated": bench.truncated, "dtype": args.dtype},
        "config": vars(args),
        "compile_s": compile_s,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "median_s": {k: float(np.median(v)) for k, v in times.items()},
        "min_s": {k: float(np.min(v)) for k, v in times.items()},
        "compilations_after_start": engine.stats().compilations_after_start,
    }
    one = report["median_s"][f"decode {engine.decode_buckets[0]} rows"]
    print("| program | median (s) | min (s) | / 1-row step |\n|---|---|---|---|")
    for k in programs:
        med = report["median_s"][k]
        print(f"| {k} | {med:.4f} | {report['min_s'][k]:.4f} | {med / one:.2f}x |")
    print(f"load {load_before} -> {report['load_after']}; compiled in {compile_s:.1f} s; "
          f"compilations after start: {report['compilations_after_start']}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
