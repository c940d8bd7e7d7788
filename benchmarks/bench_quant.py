"""Int8 weight-only quantization vs bfloat16: parameter memory and decode speed.

    python -m benchmarks.bench_quant --preset 4.5 --layers 4 --vision-layers 1 \
        --out benchmarks/results/quant-4.5-cpu.json

Two measurements:

1. Parameter memory of the full-size released configuration (every layer), bfloat16 vs int8,
   computed exactly from the abstract model (`MiniCPMV.abstract_module`, no memory used).
2. On a random-weight model of the preset's real widths, truncated to `--layers` decoder layers
   (and `--vision-layers`) so it fits a small machine: the measured parameter bytes, greedy decode
   speed (tokens/s of the on-device decode loop, `min_new_tokens` forces every step) and the
   top-1 agreement of the int8 prompt logits with the bfloat16 ones on a random text prompt.

The bfloat16 model is quantized in place (`quant.quantize_module`), so both runs share weights.
Weight-only int8 halves the bytes a decode step reads; whether that turns into speed depends on
the backend fusing the int8 -> bf16 convert into the matmul (TPU / GPU do; CPU may not).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks import measure, models
from minicpmv_jax import quant
from minicpmv_jax.config import PRESETS
from minicpmv_jax.model import MiniCPMV
from minicpmv_jax.sharding import make_mesh

log = logging.getLogger(__name__)
GiB = 1024**3


def abstract_bytes(config, q) -> dict[str, int]:
    """Exact parameter bytes of a configuration, by component, from its abstract model."""
    _, abstract = MiniCPMV.abstract_module(config, make_mesh(), q)
    out = {"total": 0, "llm": 0, "vision": 0, "resampler": 0}
    for path, var in nnx.to_flat_state(abstract):
        v = var.get_value()
        n = int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
        part = {"llm": "llm", "vpm": "vision", "resampler": "resampler"}[str(path[0])]
        out[part] += n
        out["total"] += n
    return out


def decode_speed(model: MiniCPMV, prompt: dict, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Greedy decoding of exactly `new_tokens` tokens: median tokens/s over `repeats` runs."""
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    t0 = time.perf_counter()
    model.generate(prompt, **kw)  # compiles prefill + decode
    first = time.perf_counter() - t0
    rates, prefill = [], []
    for _ in range(repeats):
        model.generate(prompt, **kw)
        s = model.last_stats
        rates.append(s.new_tokens / s.decode_s)
        prefill.append(s.prefill_s)
    return {
        "tokens_per_s": float(np.median(rates)),
        "tokens_per_s_min_max": [float(min(rates)), float(max(rates))],
        "ms_per_token": 1000.0 / float(np.median(rates)),
        "prefill_s": float(np.median(prefill)),
        "first_call_s": first,
        "new_tokens": new_tokens,
        "prompt_tokens": len(prompt["input_ids"]),
    }


def matvec(d_in: int, d_out: int, repeats: int) -> dict[str, Any]:
    """One decode-shaped matmul [1, d_in] x [d_in, d_out], three ways (ms per call).

    "bf16": the float model's `nnx.Linear` (bf16 x bf16 -> bf16); "bf16_f32acc": the same
    weights with the int8 layer's dot (float32 result); "int8": the int8 layer. The first two
    differ only in the dot's output type, which on XLA:CPU changes the GEMM path; the last two
    differ only in the weight bytes, which is what int8 buys on a bandwidth-bound accelerator.
    """
    import jax.numpy as jnp

    w = jax.random.normal(jax.random.key(0), (d_in, d_out), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (1, d_in), jnp.bfloat16)
    q, scale = quant.quantize_kernel(w)
    dims = (((1,), (0,)), ((), ()))
    fns = {
        "bf16": (jax.jit(lambda x, w: x @ w), (x, w)),
        "bf16_f32acc": (
            jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)),
            (x, w),
        ),
        "int8": (
            jax.jit(
                lambda x, q, s: jax.lax.dot_general(
                    x, q.astype(jnp.bfloat16), dims, preferred_element_type=jnp.float32
                ) * s
            ),
            (x, q, scale),
        ),
    }  # fmt: skip
    out: dict[str, Any] = {"shape": [1, d_in, d_out]}
    for name, (fn, args) in fns.items():
        timing, _ = measure.time_repeats(lambda fn=fn, args=args: fn(*args), repeats, warmup=2)
        out[name + "_ms"] = timing.median * 1000
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    report: dict[str, Any] = {
        "benchmark": "int8 weight-only quantization vs bfloat16",
        "preset": args.preset,
        "device": measure.device_info(),
        "machine": measure.machine_info(),
        "versions": measure.versions(),
    }
    cfg = preset.llm
    report["matvec"] = matvec(cfg.hidden_size, cfg.intermediate_size, args.repeats * 5)
    full_bf16 = abstract_bytes(preset.with_dtype("bfloat16"), None)
    full_int8 = abstract_bytes(preset.with_dtype("bfloat16"), "int8")
    report["full_size_param_bytes"] = {"bfloat16": full_bf16, "int8": full_int8}

    bench = models.build(
        args.preset, dtype="bfloat16", layers=args.layers, vision_layers=args.vision_layers
    )
    report["truncated"] = bench.truncated
    model = bench.model
    vocab = model.config.llm.vocab_size
    prompt = models.text_prompt(args.prompt_tokens, vocab, seed=0)
    report["bfloat16"] = {
        "param_bytes": quant.param_bytes(model),
        **models.param_stats(model),
        "decode": decode_speed(model, prompt, args.new_tokens, args.repeats),
    }
    ref_logits = model.prompt_logits(prompt)

    t0 = time.perf_counter()
    module = quant.quantize_module(model.module, args.quant)
    qmodel = MiniCPMV(model.config, module, model.processor, mesh=model.mesh)
    jax.block_until_ready(qmodel.state)
    del model, bench
    report["quantize_s"] = time.perf_counter() - t0
    logits = qmodel.prompt_logits(prompt)
    report["int8"] = {
        "param_bytes": quant.param_bytes(qmodel),
        **models.param_stats(qmodel),
        "decode": decode_speed(qmodel, prompt, args.new_tokens, args.repeats),
        "top1_agreement": float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1))),
    }
    b, q = report["bfloat16"], report["int8"]
    report["summary"] = {
        "full_size_params_gib": [full_bf16["total"] / GiB, full_int8["total"] / GiB],
        "measured_params_gib": [b["param_bytes"] / GiB, q["param_bytes"] / GiB],
        "decode_read_gib": [b["llm_decode_read_bytes"] / GiB, q["llm_decode_read_bytes"] / GiB],
        "decode_tokens_per_s": [b["decode"]["tokens_per_s"], q["decode"]["tokens_per_s"]],
        "decode_speedup": q["decode"]["tokens_per_s"] / b["decode"]["tokens_per_s"],
        "top1_agreement": q["top1_agreement"],
    }
    return report


def markdown(rep: dict[str, Any]) -> str:
    s, t = rep["summary"], rep["truncated"]
    dev, mach = rep["device"], rep["machine"]
    depth = (
        f"{t['llm_layers'][0]}/{t['llm_layers'][1]} LLM layers, "
        f"{t['vision_layers'][0]}/{t['vision_layers'][1]} vision layers"
    )
    rows = [
        ("full-size parameters (all layers)", *(f"{x:.2f} GiB" for x in s["full_size_params_gib"])),
        (f"measured parameters ({depth})", *(f"{x:.2f} GiB" for x in s["measured_params_gib"])),
        ("bytes read per decode step (LLM, no embedding table)",
         *(f"{x:.2f} GiB" for x in s["decode_read_gib"])),
        ("greedy decode, batch 1", f"{s['decode_tokens_per_s'][0]:.2f} tokens/s",
         f"{s['decode_tokens_per_s'][1]:.2f} tokens/s ({s['decode_speedup']:.2f}x)"),
        ("top-1 agreement with bfloat16 (prompt logits)", "-", f"{s['top1_agreement']:.3f}"),
    ]  # fmt: skip
    title = (
        f"int8 weight-only vs bfloat16, MiniCPM-V {rep['preset']} ({dev['backend']}: "
        f"{dev['device_kind']}; {mach['cpu']}, {mach['cpu_count']} cores)"
    )
    m = rep.get("matvec")
    if m:
        shape = "x".join(map(str, m["shape"]))
        label = f"one matmul {shape} (bf16 with float32 result: {m['bf16_f32acc_ms']:.2f} ms)"
        rows.append((label, f"{m['bf16_ms']:.2f} ms", f"{m['int8_ms']:.2f} ms"))
    lines = [title, "", "| | bfloat16 | int8 |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="4.5", choices=("2.6", "4.5"))
    ap.add_argument("--layers", type=int, default=4, help="decoder layers kept (truncation)")
    ap.add_argument("--vision-layers", type=int, default=1, help="vision layers kept")
    ap.add_argument("--quant", default="int8", choices=sorted(quant.MODES))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=pathlib.Path, help="write the JSON report here")
    ap.add_argument(
        "--matvec-only", action="store_true", help="add the matmul ablation to an existing --out"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.matvec_only:
        rep = json.loads(args.out.read_text())
        cfg = PRESETS[args.preset].llm
        rep["matvec"] = matvec(cfg.hidden_size, cfg.intermediate_size, args.repeats * 5)
    else:
        rep = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rep, indent=1, default=str))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
