"""A mixed 100-request workload that counts XLA compilations after warm-up.

Requests mix batch sizes (1-4 conversations), text-only and image conversations (random sizes
from 224 to 1400 pixels a side, 1-10 slices), question lengths, max_new_tokens and decoding modes
(greedy, top-p sampling with random temperature / top_p / top_k / repetition penalty, 2-beam
search). Every request's static signature (batch, token bucket, slice bucket, patch bucket, new-
token bucket, decoding mode) is computed on the host first; warm-up is `Sampler.warmup` on the
requests' declared shapes (`RequestShape`: sizes only, no images); then all requests run and
every compilation is counted. The target is zero:
values (image sizes inside a bucket, prompt lengths, max_new_tokens, sampling parameters) must
never recompile.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks import models
from benchmarks.measure import CompileCounter
from minicpmv_jax.generate import TRACE_COUNTS, RequestShape
from minicpmv_jax.settings import GenerationSettings

QUESTIONS = (
    "What is this?",
    "Describe the image in detail, listing every object you can see and its colour.",
    "Count the objects.",
    "Write a short poem about what you see here, then explain the poem line by line please.",
)
SIDES = (224, 448, 640, 800, 1024, 1344, 1400)


def make_requests(n: int, seed: int, max_new: int = 24) -> list[dict[str, Any]]:
    """n request specs (pure data; images are drawn when the request is built)."""
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(n):
        b = int(rng.choice([1, 1, 2, 4]))
        convs = []
        for _ in range(b):
            image = None
            if rng.random() < 0.6:
                image = (int(rng.choice(SIDES)), int(rng.choice(SIDES)), int(rng.integers(1 << 30)))
            convs.append({"image": image, "question": str(rng.choice(QUESTIONS))})
        mode = str(rng.choice(["greedy", "sample", "sample", "beam"]))
        settings = {"max_new_tokens": int(rng.integers(2, max_new + 1))}
        if mode == "sample":
            settings.update(
                do_sample=True,
                temperature=float(rng.uniform(0.5, 1.2)),
                top_p=float(rng.uniform(0.7, 1.0)),
                top_k=int(rng.choice([0, 20, 100])),
                repetition_penalty=float(rng.choice([1.0, 1.05])),
                seed=int(rng.integers(1 << 30)),
            )
        elif mode == "beam":
            settings.update(num_beams=2, repetition_penalty=float(rng.choice([1.0, 1.2])))
        reqs.append({"convs": convs, "settings": settings, "mode": mode})
    return reqs


def _conversations(bench: models.Bench, spec: dict[str, Any]) -> list:
    outs = []
    for conv in spec["convs"]:
        content = [conv["question"]]
        if conv["image"] is not None:
            w, h, seed = conv["image"]
            content.insert(0, models.synthetic_image(w, h, seed=seed % 1000))
        outs.append(bench.process([{"role": "user", "content": content}]))
    return outs


def signature(gen, outputs, settings: GenerationSettings) -> tuple:
    """Static shape key of a request: what decides which compiled programs it runs."""
    prepared = gen.prepare(outputs)
    _, m, s_len = gen.cache_len(max(prepared.lengths), settings.max_new_tokens)
    return (prepared.shape_key, m, s_len, settings.mode)


def run(bench: models.Bench, requests: int = 100, seed: int = 0) -> dict[str, Any]:
    """Warm up from the requests' shapes, then run every request; count compilations."""
    CompileCounter.install()
    gen = bench.model.sampler
    specs = make_requests(requests, seed)
    built = []
    for spec in specs:
        outs = _conversations(bench, spec)
        settings = GenerationSettings(**spec["settings"])
        built.append((outs, settings, signature(gen, outs, settings)))
    first_of: dict[tuple, int] = {}
    for i, (_, _, sig) in enumerate(built):
        first_of.setdefault(sig, i)

    c0, tr0 = CompileCounter.count(), sum(TRACE_COUNTS.values())
    t0 = time.perf_counter()
    # warm-up from declared shapes only (what a server knows at start-up), not the requests
    # (Sampler.warmup, like the gen.run calls below; model.warmup wraps it in the precision
    # context model.generate / chat use)
    warm = gen.warmup([RequestShape.of(outs, st) for outs, st, _ in built])
    warm_s = time.perf_counter() - t0
    c1, tr1 = CompileCounter.count(), sum(TRACE_COUNTS.values())

    t0 = time.perf_counter()
    new_tokens = 0
    per_request_compiles = []
    for outs, settings, _ in built:
        before = CompileCounter.count()
        res = gen.run(outs, settings)
        per_request_compiles.append(CompileCounter.count() - before)
        new_tokens += sum(len(s) for s in res.sequences)
    run_s = time.perf_counter() - t0
    c2, tr2 = CompileCounter.count(), sum(TRACE_COUNTS.values())
    modes = [s["mode"] for s in specs]
    slices = [sum(len(o["tgt_sizes"]) for o in outs) for outs, _, _ in built]
    return {
        "model": bench.source,
        "requests": requests,
        "conversations": sum(len(s["convs"]) for s in specs),
        "modes": {m: modes.count(m) for m in sorted(set(modes))},
        "slices_per_request": {"min": min(slices), "max": max(slices)},
        "distinct_signatures": len(first_of),
        "warmup_signatures": warm["signatures"],
        "warmup_s": warm_s,
        "warmup_compiles": c1 - c0,
        "warmup_traces": tr1 - tr0,
        "run_s": run_s,
        "new_tokens": new_tokens,
        "compiles_after_warmup": c2 - c1,
        "traces_after_warmup": tr2 - tr1,
        "requests_that_compiled": int(sum(1 for c in per_request_compiles if c)),
    }
