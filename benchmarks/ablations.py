"""Measured optimisation candidates (the section `ablations` of benchmarks.run).

* fused projections: one [D, (N + 2K) H] q/k/v matmul instead of three, one [D, 2F] gate/up
  matmul instead of two, at decode (B = 1, 8) and prefill (B x 256 tokens) shapes of the model;
* host sync in decode: `Sampler.run` (on-device `lax.while_loop`, one host transfer at the
  end) against `Sampler.stream` (one jitted step and one host read per token);
* attention implementations available on this backend at the model's prefill shape.

Every comparison runs the same arithmetic on the same arrays; only the program shape changes.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import models
from benchmarks.measure import Timing, time_repeats
from minicpmv_jax import kernels


def _speedup(separate: Timing, fused: Timing) -> dict[str, Any]:
    return {
        "separate_s": separate.as_dict(),
        "fused_s": fused.as_dict(),
        "speedup": separate.median / fused.median,
    }


def fused_projections(cfg, repeats: int, rows=(1, 8, 256)) -> dict[str, Any]:
    """Separate vs concatenated q/k/v and gate/up matmuls of one decoder layer."""
    c = cfg.llm
    d, f = c.hidden_size, c.intermediate_size
    qd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    keys = jax.random.split(jax.random.key(0), 6)
    w = {
        "q": jax.random.normal(keys[0], (d, qd), c.dtype),
        "k": jax.random.normal(keys[1], (d, kd), c.dtype),
        "v": jax.random.normal(keys[2], (d, kd), c.dtype),
        "gate": jax.random.normal(keys[3], (d, f), c.dtype),
        "up": jax.random.normal(keys[4], (d, f), c.dtype),
    }
    w_qkv = jnp.concatenate([w["q"], w["k"], w["v"]], axis=1)  # [D, (N + 2K) H]
    w_gu = jnp.concatenate([w["gate"], w["up"]], axis=1)  # [D, 2F]
    qkv_sep = jax.jit(lambda x, a, b, c_: (x @ a, x @ b, x @ c_))
    qkv_fused = jax.jit(lambda x, wf: jnp.split(x @ wf, [qd, qd + kd], axis=-1))
    mlp_sep = jax.jit(lambda x, g, u: jax.nn.silu(x @ g) * (x @ u))

    @jax.jit
    def mlp_fused(x, wf):
        gu = x @ wf  # [R, 2F]
        return jax.nn.silu(gu[..., :f]) * gu[..., f:]

    out = {}
    for r in rows:
        x = jax.random.normal(keys[5], (r, d), c.dtype)
        s1, _ = time_repeats(lambda x=x: qkv_sep(x, w["q"], w["k"], w["v"]), repeats)
        f1, _ = time_repeats(lambda x=x: qkv_fused(x, w_qkv), repeats)
        s2, _ = time_repeats(lambda x=x: mlp_sep(x, w["gate"], w["up"]), repeats)
        f2, _ = time_repeats(lambda x=x: mlp_fused(x, w_gu), repeats)
        out[str(r)] = {"qkv": _speedup(s1, f1), "gate_up": _speedup(s2, f2)}
    return out


def host_sync(bench: models.Bench, steps: int, repeats: int) -> dict[str, Any]:
    """Decode tokens/s at batch 1: on-device loop (run) vs one host round trip per token."""
    from minicpmv_jax.settings import GenerationSettings

    gen = bench.model.sampler
    conv = models.text_prompt(32, bench.config.llm.vocab_size)
    settings = GenerationSettings(max_new_tokens=steps, min_new_tokens=steps)

    def loop():
        return gen.run([conv], settings).timings["decode"]

    def streamed():
        it = gen.stream([conv], settings)
        next(it)  # prefill + first token (run's "decode" timing starts after the prefill too)
        t0 = time.perf_counter()
        for _ in it:
            pass
        return time.perf_counter() - t0

    loop(), streamed()  # compile both
    t_loop = Timing.of([loop() for _ in range(repeats)])
    t_stream = Timing.of([streamed() for _ in range(repeats)])
    return {
        "steps": steps,
        "device_loop_tokens_per_s": t_loop.rate(steps - 1),
        "stream_tokens_per_s": t_stream.rate(steps - 1),
        "device_loop_speedup": t_stream.median / t_loop.median,
    }


def attention_impls(cfg, tokens: int, repeats: int) -> dict[str, Any]:
    """Prefill attention alone (B = 1, T = S = tokens, causal) per available implementation."""
    c = cfg.llm
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (1, tokens, c.num_heads, c.head_dim), c.dtype)
    k = jax.random.normal(keys[1], (1, tokens, c.num_kv_heads, c.head_dim), c.dtype)
    v = jax.random.normal(keys[2], (1, tokens, c.num_kv_heads, c.head_dim), c.dtype)
    mask = jnp.tril(jnp.ones((tokens, tokens), bool))[None, None]
    impls = ["reference", "xla"]
    backend = jax.default_backend()
    if backend == "gpu":
        impls.append("cudnn")
    if backend == "tpu":
        impls.append("splash")  # off TPU it would run interpreted: not a speed number
    out = {}
    for impl in impls:
        fn = jax.jit(lambda q, k, v, m, impl=impl: kernels.attention(q, k, v, m, impl=impl))
        try:
            t, _ = time_repeats(lambda fn=fn: fn(q, k, v, mask), repeats)
            out[impl] = {"seconds": t.as_dict()}
        except Exception as e:  # noqa: BLE001 - an unsupported kernel is a result, not a crash
            out[impl] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return {"tokens": tokens, "impls": out}


def run(bench: models.Bench, *, repeats: int, steps: int, prefill_tokens: int) -> dict[str, Any]:
    return {
        "fused_projections": fused_projections(bench.config, repeats),
        "host_sync": host_sync(bench, steps, repeats),
        "attention": attention_impls(bench.config, prefill_tokens, repeats),
    }
