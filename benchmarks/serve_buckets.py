"""Decode row buckets of the serving engine: the time of one decode step per bucket and of one
slot move, on the same engine, interleaved.

    python -m benchmarks.serve_buckets --preset 2.6 --layers 1 --vision-layers 1 --dtype float32

What it answers: how much a lone request gains from stepping a smaller bucket (the step time per
row count), and whether moving a busy row down to shrink the bucket pays (a move costs one
program call that copies one row of cache and state; it saves the difference between two bucket
step times on every following step). The engine compiles its programs in ``start()``; the timed
calls run the compiled programs on the engine's own cache (the same programs and shapes as
serving, every row passed as busy). ``decode N rows, one sampling`` is the largest bucket with
one row sampling, ``all sampling`` with every row sampling (top-k / top-p: the sort over the
vocabulary, whatever the rows' top-k / top-p values), ``decode 1 rows, sampling`` one sampling
row alone.

``--move-layers L`` also times the row move alone on a slot cache of the preset's LLM widths with
``L`` decoder layers (no weights: ``L`` = 28 is the full 2.6 depth), ``--move-slots`` rows of
``--move-max-len`` slots in ``--move-dtype``: the engine's two programs (``take_row``, then
``put_row`` in place) against the same move as one program, interleaved, with the compiled
memory of each (a temp as large as the cache means the program copies the cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import models
from benchmarks.serve import BUCKETS, ClampedProcessor
from minicpmv_jax.config import LlmConfig
from minicpmv_jax.generate import RequestShape
from minicpmv_jax.serve import slots as slot_programs
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
    p.add_argument(
        "--move-layers",
        type=int,
        default=0,
        help="also time the row move on a cache of this many decoder layers (0: no)",
    )
    p.add_argument("--move-slots", type=int, default=4)
    p.add_argument("--move-dtype", default="bfloat16")
    p.add_argument("--move-max-len", type=int, default=None, help="default: --max-len")
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

    busy = np.ones(args.slots, bool)
    greedy = np.zeros(args.slots, bool)
    one_sampling = greedy.copy()
    one_sampling[0] = True
    all_sampling = np.ones(args.slots, bool)

    def flags(do_sample):  # untimed: each row's greedy / sampled flag
        old = engine._state.do_sample  # the same placement: no new program
        engine._state = engine._state.replace(do_sample=jax.device_put(do_sample, old.sharding))

    def decode(rows):
        with s.context():
            tok, engine._cache, engine._state = engine._decode(
                s.graphdef, s.state, engine._cache, engine._state, busy,
                terminators=engine.terminators, active=rows)  # fmt: skip
            np.asarray(tok)

    def move():
        engine._move_call(args.slots - 1, 0)
        np.asarray(engine._cache.end)

    # name -> (untimed set-up, timed call)
    programs = {f"decode {b} rows": (lambda: flags(greedy), lambda b=b: decode(b))
                for b in engine.decode_buckets}  # fmt: skip
    top = engine.decode_buckets[-1]
    programs[f"decode {top} rows, one sampling"] = (lambda: flags(one_sampling),
                                                    lambda: decode(top))  # fmt: skip
    programs[f"decode {top} rows, all sampling"] = (lambda: flags(all_sampling),
                                                    lambda: decode(top))  # fmt: skip
    programs["decode 1 rows, sampling"] = (lambda: flags(one_sampling), lambda: decode(1))
    programs["move one row"] = (lambda: None, move)
    times: dict[str, list[float]] = {k: [] for k in programs}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, (prep, fn) in programs.items():
            for _ in range(args.calls):
                prep()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    engine.shutdown(drain=False)
    full_move = time_full_move(bench.config.llm, args) if args.move_layers else None
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
        "full_move": full_move,
    }
    one = report["median_s"][f"decode {engine.decode_buckets[0]} rows"]
    print("| program | median (s) | min (s) | / 1-row step |\n|---|---|---|---|")
    for k in programs:
        med = report["median_s"][k]
        print(f"| {k} | {med:.4f} | {report['min_s'][k]:.4f} | {med / one:.2f}x |")
    print(f"load {load_before} -> {report['load_after']}; compiled in {compile_s:.1f} s; "
          f"compilations after start: {report['compilations_after_start']}")  # fmt: skip
    if full_move:
        print(f"move one row at {args.move_layers} layers: {json.dumps(full_move)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def time_full_move(llm: LlmConfig, args) -> dict:
    """Median times of a row move on a weightless slot cache of ``--move-layers`` layers of
    ``llm``'s widths: as the engine runs it (``take_row`` then ``put_row``, two programs) and as
    one program (``slots.move``), interleaved; with each compiled program's memory."""
    cfg = dataclasses.replace(llm, num_layers=args.move_layers)
    dtype = jnp.dtype(args.move_dtype)
    n, max_len = args.move_slots, args.move_max_len or args.max_len
    cache = slot_programs.SlotCache.init(cfg, n, max_len, dtype)
    state = slot_programs.SlotState.init(n, cfg.vocab_size)
    src, dst = np.int32(n - 1), np.int32(0)
    take = jax.jit(slot_programs.take_row).lower(cache, state, src).compile()
    row, row_state = take(cache, state, src)
    put = jax.jit(slot_programs.put_row, donate_argnums=(0, 1))
    put = put.lower(cache, state, row, row_state, dst).compile()
    one = jax.jit(slot_programs.move, donate_argnums=(0, 1))
    one = one.lower(cache, state, src, dst).compile()
    del row, row_state

    def two_programs(cache, state):
        row, row_state = take(cache, state, src)
        return put(cache, state, row, row_state, dst)

    variants = {"take_row + put_row": two_programs, "move (one program)": one}
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            for _ in range(args.calls):
                t0 = time.perf_counter()
                cache, state = (
                    fn(cache, state) if fn is two_programs else fn(cache, state, src, dst)
                )
                cache.k.block_until_ready()
                cache.v.block_until_ready()
                times[name].append(time.perf_counter() - t0)

    def memory(c):
        m = c.memory_analysis()
        return {"alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes)}

    row_bytes = (cache.k.nbytes + cache.v.nbytes) // n
    return {
        "layers": args.move_layers, "slots": n, "max_len": max_len, "dtype": str(dtype),
        "row_bytes": int(row_bytes), "cache_bytes": int(cache.k.nbytes + cache.v.nbytes),
        "median_s": {k: float(np.median(v)) for k, v in times.items()},
        "min_s": {k: float(np.min(v)) for k, v in times.items()},
        "memory": {"take_row": memory(take), "put_row": memory(put), "move": memory(one)},
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
