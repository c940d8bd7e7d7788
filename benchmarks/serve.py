"""Serving benchmark: continuous batching vs one request at a time vs static batches.

    python -m benchmarks.serve --preset 2.6 --layers 1 --vision-layers 1 --dtype float32

Same model, same requests, same run. The workload mixes text questions and single 448x448
images (one slice) with prompts of 70-120 tokens and 12-40 new tokens each (random weights:
answers end at ``max_tokens``, the model's end-of-turn tokens are never produced on purpose).

* **high load**: ``--clients`` closed-loop clients; each sends its next request after an
  exponential think time (mean ``--think-s``), i.e. Poisson arrivals from each client, until
  ``--requests`` requests are answered. Served by
  - ``continuous``: ``serve.Engine`` with ``--slots`` decode slots;
  - ``one-at-a-time``: FIFO, each request alone through ``Sampler.stream`` (chat()'s streaming
    path: the bucketed prefill, then one program call per token);
  - ``static``: FIFO batches of up to ``--slots`` requests (whatever waits when the previous
    batch ends, padded to ``--slots`` rows: one program), ``Sampler.stream`` over the batch until
    its longest request ends.
* **low load**: open-loop Poisson arrivals at ``--low-rate`` requests/s on the engine, against
  the same requests sent to the idle engine one after the other ("alone"), and the same arrivals
  with the engine's slot compaction off (``low/continuous-no-compact``: a request left alone in
  a high slot keeps the decode bucket of that slot).

``--dot-logits`` runs the engine's multi-row decode steps with the lm_head's dense dot instead of
``slots.step_logits`` (an A/B switch for that change).

The engine's decode steps by row bucket, its slot moves and its scheduler's wall time in
prefills (with their inserts), decode steps and moves (``engine_s``: how much of a run chunked
prefill could spread out) are reported per engine run (``--decode-buckets``: the engine's row
buckets, default its own).

Reported per run: requests/s and output tokens/s over the run's span (first arrival to last
answer), p50 / p99 time to first token (TTFT, from submission) and per-token latency
(time between tokens after the first, per request). Compilation happens before the timed runs;
the programs traced during them are counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import queue
import random
import shlex
import sys
import threading
import time
from typing import Any

import numpy as np

from benchmarks import models
from minicpmv_jax import generate
from minicpmv_jax.batching import Buckets
from minicpmv_jax.generate import RequestShape
from minicpmv_jax.serve import engine as engine_mod
from minicpmv_jax.serve import slots as slot_programs
from minicpmv_jax.serve.engine import Engine
from minicpmv_jax.serve.types import Delta, Request
from minicpmv_jax.settings import GenerationSettings

BUCKETS = Buckets(tokens=(128, 256), slices=(1, 4, 16), new_tokens=(64,))


@dataclasses.dataclass
class Item:
    request: Request
    output: dict  # processor output (the baselines' input)


@dataclasses.dataclass
class Record:
    submitted: float
    first: float | None = None
    done: float | None = None
    tokens: int = 0
    event: threading.Event = dataclasses.field(default_factory=threading.Event)


class ClampedProcessor:
    """The preset's processor with ids the model's vocabulary lacks clamped (random weights)."""

    def __init__(self, processor, vocab: int):
        self._p, self._vocab = processor, vocab

    def __getattr__(self, name):
        return getattr(self._p, name)

    def __call__(self, *args, **kwargs):
        out = self._p(*args, **kwargs)
        out["input_ids"] = np.minimum(out["input_ids"], self._vocab - 1)
        return out


def make_items(bench: models.Bench, n: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    tok = bench.model.processor.tokenizer
    items = []
    for i in range(n):
        image = rng.random() < 0.3
        words = rng.randint(20, 40) if image else rng.randint(55, 100)
        content = [models.question(tok, words)]
        if image:
            content.insert(0, models.synthetic_image(448, 448, seed=i))
        req = Request(
            messages=[{"role": "user", "content": content}],
            max_tokens=rng.randint(12, 40),
            temperature=0.0,
            max_slice_nums=1,
            request_id=f"r{i}",
        )
        out = bench.model.processor(req.messages, max_slice_nums=1)
        items.append(Item(req, out))
    return items


# -- servers: submit(item) -> Record, answered by a background thread ---------------------------


class EngineServer:
    def __init__(self, engine: Engine):
        self.engine = engine

    def submit(self, item: Item) -> Record:
        rec = Record(time.perf_counter())
        handle = self.engine.submit(item.request)

        def read():
            for ev in handle.events():
                if isinstance(ev, Delta):
                    rec.first = rec.first or time.perf_counter()
                    rec.tokens += len(ev.token_ids)
            rec.done = time.perf_counter()
            rec.event.set()

        threading.Thread(target=read, daemon=True).start()
        return rec


class SamplerServer:
    """FIFO over ``Sampler.stream``: batches of up to ``batch`` requests (1 = one at a time),
    padded to ``batch`` rows (a copy of the first request) so every batch runs one program."""

    def __init__(self, sampler, batch: int, terminators):
        self.sampler, self.batch, self.terminators = sampler, batch, set(terminators)
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, item: Item) -> Record:
        rec = Record(time.perf_counter())
        self.queue.put((item, rec))
        return rec

    def _loop(self):
        while True:
            work = [self.queue.get()]
            while len(work) < self.batch:
                try:
                    work.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            self.run(work)

    def run(self, work):
        outputs = [w[0].output for w in work]
        outputs += [outputs[0]] * (self.batch - len(work))
        limit = [w[0].request.max_tokens for w in work]
        settings = GenerationSettings(max_new_tokens=max(limit))
        alive = [True] * len(work)
        stream = self.sampler.stream(outputs, settings)
        for tokens in stream:
            now = time.perf_counter()
            for r, (_, rec) in enumerate(work):
                if not alive[r]:
                    continue
                rec.first = rec.first or now
                rec.tokens += 1
                if rec.tokens >= limit[r] or int(tokens[r]) in self.terminators:
                    alive[r] = False
                    rec.done = now
                    rec.event.set()
            if not any(alive):
                break
        stream.close()


# -- load generators --------------------------------------------------------------------------


def closed_loop(server, items: list[Item], clients: int, think_s: float, seed: int) -> list:
    """``clients`` threads, each: think (exponential), send, wait for the answer; until done."""
    pending = list(enumerate(items))
    lock = threading.Lock()
    records: list = [None] * len(items)

    def client(c):
        rng = random.Random(seed * 1000 + c)
        while True:
            time.sleep(rng.expovariate(1.0 / think_s) if think_s > 0 else 0.0)
            with lock:
                if not pending:
                    return
                i, item = pending.pop(0)
            rec = server.submit(item)
            rec.event.wait()
            records[i] = rec

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def open_loop(server, items: list[Item], rate: float, seed: int) -> list:
    rng = random.Random(seed)
    records = []
    for item in items:
        time.sleep(rng.expovariate(rate))
        records.append(server.submit(item))
    for rec in records:
        rec.event.wait()
    return records


def one_by_one(server, items: list[Item]) -> list:
    records = []
    for item in items:
        rec = server.submit(item)
        rec.event.wait()
        records.append(rec)
    return records


def summarise(records: list[Record]) -> dict[str, Any]:
    span = max(r.done for r in records) - min(r.submitted for r in records)
    ttft = np.array([r.first - r.submitted for r in records])
    tpot = np.array([(r.done - r.first) / (r.tokens - 1) for r in records if r.tokens > 1])
    tokens = sum(r.tokens for r in records)
    return {
        "requests": len(records),
        "output_tokens": tokens,
        "span_s": span,
        "requests_per_s": len(records) / span,
        "output_tokens_per_s": tokens / span,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tpot_p50_s": float(np.percentile(tpot, 50)),
        "tpot_p99_s": float(np.percentile(tpot, 99)),
    }


def traced() -> int:
    return sum(generate.TRACE_COUNTS.values()) + sum(engine_mod.TRACE_COUNTS.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="2.6")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vision-layers", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=32, help="high-load requests")
    p.add_argument("--think-s", type=float, default=0.2)
    p.add_argument("--low-requests", type=int, default=8)
    p.add_argument("--low-rate", type=float, default=0.25, help="low-load arrivals per second")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--decode-buckets", default=None, metavar="N,N,...",
                   help="the engine's decode row buckets (default: the engine's)")  # fmt: skip
    p.add_argument("--dot-logits", action="store_true",
                   help="multi-row decode steps take the lm_head's logits as the dense layer's "
                        "dot (the engine before slots.step_logits; an A/B switch)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON report path")
    args = p.parse_args(argv)
    slot_programs.ROW_REDUCE_LOGITS = not args.dot_logits

    t0 = time.perf_counter()
    bench = models.build(args.preset, dtype=args.dtype, layers=args.layers,
                         vision_layers=args.vision_layers, seed=args.seed)  # fmt: skip
    model = bench.model
    if bench.clamp_ids is not None:
        model.processor = ClampedProcessor(model.processor, bench.clamp_ids)
    model.configure_generation(buckets=BUCKETS)
    items = make_items(bench, args.requests, args.seed)
    low_items = make_items(bench, args.low_requests, args.seed + 1)
    print(f"model built in {time.perf_counter() - t0:.1f} s ({bench.source}, "
          f"{bench.truncated})", flush=True)  # fmt: skip

    # compile everything before timing: the engine in start(), the baselines on a dry batch
    t0 = time.perf_counter()
    settings = GenerationSettings(max_new_tokens=1)
    shapes = [RequestShape.of([it.output], settings) for it in items + low_items]
    buckets = None
    if args.decode_buckets:
        buckets = [int(b) for b in args.decode_buckets.split(",")]
    engine = Engine(model, slots=args.slots, max_len=args.max_len, max_queue=4 * args.requests,
                    decode_buckets=buckets, warmup=shapes)  # fmt: skip
    engine.start()
    sampler = model.sampler
    terminators = model.processor.terminators
    serial = SamplerServer(sampler, 1, terminators)
    static = SamplerServer(sampler, args.slots, terminators)
    kinds = {}
    for it in items + low_items:  # one request per prefill shape
        kinds.setdefault(RequestShape.of([it.output], settings).slices, it)

    def short(it):  # a warm-up request: the same programs, two tokens
        return Item(dataclasses.replace(it.request, max_tokens=2), it.output)

    for it in kinds.values():
        one_by_one(serial, [short(it)])
    # static batches: every slice bucket a batch can reach (0..slots images)
    image = next((it for it in items if RequestShape.of([it.output], settings).slices), None)
    text = next(it for it in items if not RequestShape.of([it.output], settings).slices)
    for n_images in sorted({0, 1, 4, min(16, args.slots)}):
        if image is None and n_images:
            continue
        batch = [image] * n_images + [text] * (args.slots - n_images)
        static.run([(short(it), Record(time.perf_counter())) for it in batch[: args.slots]])
    compile_s = time.perf_counter() - t0
    print(f"compiled in {compile_s:.1f} s", flush=True)

    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.serve "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "model": {"source": bench.source, "truncated": bench.truncated, "dtype": args.dtype},
        "config": vars(args),
        "compile_s": compile_s,
        "load_before": os.getloadavg(),
        "runs": {},
    }
    runs = report["runs"]
    report["decode_buckets"] = list(engine.decode_buckets)

    def engine_counts(before):  # decode steps by rows and slot moves since ``before``
        now = engine.stats()
        steps = {b: n - before.decode_steps.get(b, 0) for b, n in sorted(now.decode_steps.items())}
        return {"decode_steps_by_rows": {str(b): n for b, n in steps.items() if n},
                "slot_moves": now.rows_moved - before.rows_moved,
                "engine_s": {k: getattr(now, f"{k}_s") - getattr(before, f"{k}_s")
                             for k in ("prefill", "decode", "move")}}  # fmt: skip

    for name, server in (("continuous", EngineServer(engine)), ("static", static),
                         ("one-at-a-time", serial)):  # fmt: skip
        n0 = traced()
        s0 = engine.stats()
        t0 = time.perf_counter()
        recs = closed_loop(server, items, args.clients, args.think_s, args.seed)
        runs[f"high/{name}"] = {**summarise(recs), "traced": traced() - n0,
                                "load": os.getloadavg()}  # fmt: skip
        if name == "continuous":
            runs["high/continuous"].update(engine_counts(s0))
        print(f"high/{name}: {json.dumps(runs[f'high/{name}'])} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
    server = EngineServer(engine)
    n0 = traced()
    s0 = engine.stats()
    runs["low/alone"] = {**summarise(one_by_one(server, low_items)), "load": os.getloadavg(),
                         **engine_counts(s0)}  # fmt: skip
    print(f"low/alone: {json.dumps(runs['low/alone'])}", flush=True)
    for name, compact in (("continuous", True), ("continuous-no-compact", False)):
        engine.compact = compact
        s0 = engine.stats()
        recs = open_loop(server, low_items, args.low_rate, args.seed)
        runs[f"low/{name}"] = {**summarise(recs), "traced": traced() - n0,
                               "load": os.getloadavg(), **engine_counts(s0)}  # fmt: skip
        print(f"low/{name}: {json.dumps(runs[f'low/{name}'])}", flush=True)
    engine.compact = True
    engine.shutdown(drain=True)
    hi, one = runs["high/continuous"], runs["high/one-at-a-time"]
    report["speedup_vs_one_at_a_time"] = hi["output_tokens_per_s"] / one["output_tokens_per_s"]
    report["speedup_vs_static"] = hi["output_tokens_per_s"] / runs["high/static"][
        "output_tokens_per_s"]  # fmt: skip
    report["low_load_ttft_p99_ratio"] = (
        runs["low/continuous"]["ttft_p99_s"] / runs["low/alone"]["ttft_p99_s"]
    )
    report["load_after"] = os.getloadavg()
    print(markdown(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def markdown(report: dict) -> str:
    rows = [("| run | requests/s | output tokens/s | TTFT p50 / p99 (s) | per-token p50 / p99 (s) "
             "| load avg (1 min) |"), "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in report["runs"].items():
        rows.append(
            f"| {name} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
            f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
            f"{r['tpot_p50_s']:.3f} / {r['tpot_p99_s']:.3f} | {r['load'][0]:.1f} |"
        )
    rows.append("")
    rows.append(f"engine decode row buckets {report['decode_buckets']}; steps by rows, moves: " +
                "; ".join(f"{name} {r['decode_steps_by_rows']}, {r['slot_moves']}"
                          for name, r in report["runs"].items() if "slot_moves" in r))  # fmt: skip
    rows.append(f"continuous / one-at-a-time output tokens/s: "
                f"{report['speedup_vs_one_at_a_time']:.2f}x; continuous / static: "
                f"{report['speedup_vs_static']:.2f}x; low-load p99 TTFT / alone p99 TTFT: "
                f"{report['low_load_ttft_p99_ratio']:.2f}")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
