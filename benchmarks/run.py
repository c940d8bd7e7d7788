"""MiniCPM-V benchmark suite: one command, one JSON report (plus a Markdown summary).

    python -m benchmarks.run --preset 2.6                       # GPU / TPU: real size, random bf16
    python -m benchmarks.run --preset 2.6 --layers 2 --vision-layers 2      # CPU: truncated depth
    python -m benchmarks.run --checkpoint ./MiniCPM-V-2_6                   # real weights
    python -m benchmarks.run --preset tiny --quick                          # smoke run (seconds)

Sections (each after warm-up, compile time reported apart, median and min-max of repeats):
machine probes (device read / copy bandwidth, bf16 matmul rate), processor time per image, vision
+ resampler time per slice, time to first token for a 448x448 and a 1344x1344 image with a
32-token question, prefill tokens/s, decode tokens/s at batch 1 / 8 / 32 against the weight-read
roofline, the PyTorch transformers peer on the same weights (when torch is installed), a
100-request mixed workload counting recompilations, peak memory and compile counts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import pathlib
import shlex
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import measure, models
from benchmarks.measure import CompileCounter, Timing, time_repeats
from minicpmv_jax import generate
from minicpmv_jax.batching import Buckets
from minicpmv_jax.generate import encode_vision
from minicpmv_jax.settings import GenerationSettings

log = logging.getLogger("benchmarks")

ALL_SECTIONS = (
    "probes", "processor", "vision", "ttft", "prefill", "decode", "peer", "ablations", "workload",
)  # fmt: skip
IMAGE_SIZES = (448, 1344)


# ------------------------------------------------------------------------------------------------
# FLOP accounting (useful work only: causal attention counts the lower triangle)
# ------------------------------------------------------------------------------------------------


def llm_prefill_flops(cfg, stats: dict, tokens: int, batch: int = 1) -> float:
    """Matmul + causal attention FLOPs of a prefill of `tokens` per row, last-token logits."""
    c = cfg.llm
    lm_head = c.hidden_size * c.vocab_size
    dense = 2.0 * batch * tokens * (stats["llm_matmul_params"] - lm_head)
    attn = 4.0 * batch * c.num_layers * c.num_heads * c.head_dim * tokens * (tokens + 1) / 2
    return dense + attn + 2.0 * batch * lm_head


def vision_flops(cfg, patches: list[int]) -> float:
    """Vision tower + resampler FLOPs for slices of `patches` valid patches each."""
    v, r = cfg.vision, cfg.resampler
    d, q = r.embed_dim, r.num_queries
    total = 0.0
    for p in patches:
        layer = 2.0 * p * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
        layer += 4.0 * p * p * v.hidden_size  # QK^T and PV over all heads
        total += v.num_layers * layer + 2.0 * p * v.patch_dim * v.hidden_size
        # resampler: kv_proj, k/v in-projections over P keys, q/out/proj over Q, attention
        total += 2.0 * p * v.hidden_size * d + 4.0 * p * d * d + 6.0 * q * d * d + 4.0 * q * p * d
    return total


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


class Harness:
    def __init__(self, args: argparse.Namespace, bench: models.Bench):
        self.args = args
        self.bench = bench
        self.model = bench.model
        self.cfg = bench.model.config
        self.stats = models.param_stats(self.model)
        self.gen = self.model.configure_generation(
            Buckets(slices=tuple(args.slice_buckets), tokens=tuple(args.token_buckets)),
            cache_dtype=self.cfg.llm.dtype,
        )
        self.proc = self.model.processor
        self.q_text = models.question(self.proc.tokenizer, args.question_tokens)
        self.images = {s: models.synthetic_image(s, s, seed=s) for s in IMAGE_SIZES}
        self.probes: dict[str, Any] = {}

    def msgs(self, image):
        return [{"role": "user", "content": [image, self.q_text]}]

    def _settings(self, n: int) -> GenerationSettings:
        # min_new_tokens = max_new_tokens: random weights must not stop early on a terminator
        return GenerationSettings(max_new_tokens=n, min_new_tokens=n)

    # -- probes --------------------------------------------------------------------------------
    def probes_section(self) -> dict[str, Any]:
        a = self.args
        # the probes are cheap: more repeats make their best rate (the roofline) steadier
        bw = measure.measure_bandwidth(a.bandwidth_bytes, max(a.repeats, 10))
        mm = measure.measure_matmul(a.matmul_n, self.cfg.llm.dtype, max(a.repeats, 10))
        self.probes = {"bandwidth": bw, "matmul": mm}
        return self.probes

    @property
    def bandwidth(self) -> float:
        return measure.roofline_rates(self.probes)[0]

    @property
    def flops_rate(self) -> float:
        return measure.roofline_rates(self.probes)[1]

    # -- processor -----------------------------------------------------------------------------
    def processor_section(self) -> dict[str, Any]:
        out = {}
        for size, img in self.images.items():
            msgs = self.msgs(img)
            t, _ = time_repeats(lambda m=msgs: self.bench.process(m), self.args.repeats)
            po = self.bench.process(msgs)
            out[f"{size}x{size}"] = {
                "seconds": t.as_dict(),
                "slices": len(po["tgt_sizes"]),
                "prompt_tokens": len(po["input_ids"]),
                "patch_bucket": int(po["pixel_patches"].shape[1]),
            }
        return out

    # -- vision + resampler ------------------------------------------------------------------
    def vision_section(self) -> dict[str, Any]:
        from flax import nnx

        gd, state = self.gen.graphdef, self.gen.state

        def encode(state, v):
            return encode_vision(nnx.merge(gd, state), v)

        fn = jax.jit(encode)
        out = {}
        for size, img in self.images.items():
            prepared = self.gen.prepare([self.bench.process(self.msgs(img))])
            vision = prepared.vision
            real = int((vision.group_index >= 0).sum())
            bucket = int(vision.group_index.shape[0])
            c0 = CompileCounter.count()
            t, first = time_repeats(lambda v=vision: fn(state, v), self.args.repeats)
            c1 = CompileCounter.count()
            fn(state, vision).block_until_ready()
            patches = [int(h * w) for h, w in vision.tgt_sizes[:real, :2]]
            flops = vision_flops(self.cfg, patches)
            out[f"{size}x{size}"] = {
                "slices": real,
                "slice_bucket": bucket,
                "patch_bucket": int(vision.pixel_patches.shape[1]),
                "seconds": t.as_dict(),
                "seconds_per_slice": t.scaled(1 / real).as_dict(),
                "seconds_per_padded_slice": t.scaled(1 / bucket).as_dict(),
                "first_call_s": first,
                "compiles_in_repeats": CompileCounter.count() - c1,
                "compiles_warmup": c1 - c0,
                "useful_flops": flops,
                "compute_floor_s": flops / self.flops_rate if self.probes else None,
            }
        return out

    # -- time to first token -------------------------------------------------------------------
    def ttft_section(self) -> dict[str, Any]:
        out = {}
        settings = self._settings(1)
        for size, img in self.images.items():
            msgs = self.msgs(img)
            parts: dict[str, list[float]] = {"processor": [], "prefill": [], "first_token": []}

            def once(record: bool, msgs=msgs, parts=parts):
                t0 = time.perf_counter()
                po = self.bench.process(msgs)
                t1 = time.perf_counter()
                res = self.gen.run([po], settings)
                if record:
                    parts["processor"].append(t1 - t0)
                    parts["prefill"].append(res.timings["prefill"])
                    parts["first_token"].append(res.timings["decode"])
                return res.sequences[0]

            c0 = CompileCounter.count()
            t0 = time.perf_counter()
            once(False)
            first = time.perf_counter() - t0
            c1 = CompileCounter.count()
            total = []
            for _ in range(self.args.repeats):
                t0 = time.perf_counter()
                once(True)
                total.append(time.perf_counter() - t0)
            c2 = CompileCounter.count()
            po = self.bench.process(msgs)
            prepared = self.gen.prepare([po])
            tokens = len(po["input_ids"])
            real = int((prepared.vision.group_index >= 0).sum())
            patches = [int(h * w) for h, w in prepared.vision.tgt_sizes[:real, :2]]
            flops = vision_flops(self.cfg, patches) + llm_prefill_flops(
                self.cfg, self.stats, tokens
            )
            tt = Timing.of(total)
            device = Timing.of([a + b for a, b in zip(parts["prefill"], parts["first_token"])])
            entry = {
                "prompt_tokens": tokens,
                "token_bucket": int(prepared.input_ids.shape[1]),
                "slices": real,
                "slice_bucket": int(prepared.vision.group_index.shape[0]),
                "seconds": tt.as_dict(),
                "breakdown": {k: Timing.of(v).as_dict() for k, v in parts.items()},
                "first_call_s": first,
                "compile_s_estimate": max(first - tt.median, 0.0),
                "compiles_warmup": c1 - c0,
                "compiles_in_repeats": c2 - c1,
                "useful_flops": flops,
            }
            if self.probes:
                floor = flops / self.flops_rate
                entry["compute_floor_s"] = floor
                entry["device_over_floor"] = device.median / floor
                entry["total_over_floor"] = tt.median / floor
            out[f"{size}x{size}"] = entry
        return out

    # -- prefill ---------------------------------------------------------------------------------
    def prefill_section(self) -> dict[str, Any]:
        n = self.args.prefill_tokens
        conv = models.text_prompt(n, self.cfg.llm.vocab_size)
        settings = self._settings(1)
        times: list[float] = []
        c0 = CompileCounter.count()
        self.gen.run([conv], settings)
        c1 = CompileCounter.count()
        for _ in range(self.args.repeats):
            times.append(self.gen.run([conv], settings).timings["prefill"])
        t = Timing.of(times)
        flops = llm_prefill_flops(self.cfg, self.stats, n)
        out = {
            "tokens": n,
            "batch": 1,
            "seconds": t.as_dict(),
            "tokens_per_s": t.rate(n),
            "compiles_warmup": c1 - c0,
            "compiles_in_repeats": CompileCounter.count() - c1,
            "useful_flops": flops,
        }
        if self.probes:
            out["achieved_flops_per_s"] = flops / t.median
            out["fraction_of_matmul_rate"] = flops / t.median / self.flops_rate
        return out

    # -- decode ----------------------------------------------------------------------------------
    def decode_section(self) -> dict[str, Any]:
        a, c = self.args, self.cfg.llm
        steps = a.decode_steps
        settings = self._settings(steps)
        out = {"steps": steps, "prompt_tokens": a.decode_prompt_tokens, "batches": {}}
        for b in a.batch_sizes:
            convs = [
                models.text_prompt(a.decode_prompt_tokens, c.vocab_size, seed=r) for r in range(b)
            ]
            c0 = CompileCounter.count()
            res = self.gen.run(convs, settings)
            c1 = CompileCounter.count()
            times, forwards = [], None
            for _ in range(a.repeats):
                res = self.gen.run(convs, settings)
                times.append(res.timings["decode"])
                forwards = res.num_steps - 1  # the first token comes from the prefill logits
            t = Timing.of(times)
            _, _, s_len = self.gen.cache_len(a.decode_prompt_tokens, steps)
            kv_bytes = 2 * c.num_layers * b * s_len * c.num_kv_heads * c.head_dim
            kv_bytes *= jnp.dtype(self.gen.cache_dtype).itemsize
            entry = {
                "seconds": t.as_dict(),
                "forward_steps": forwards,
                "tokens_per_s": t.rate(b * forwards),
                "step_s": t.scaled(1 / forwards).as_dict(),
                "cache_len": s_len,
                "weight_bytes_per_step": self.stats["llm_decode_read_bytes"],
                "kv_bytes_per_step": int(kv_bytes),
                "compiles_warmup": c1 - c0,
                "compiles_in_repeats": CompileCounter.count() - c1,
            }
            if self.probes:
                step_w = self.stats["llm_decode_read_bytes"] / self.bandwidth
                step_wkv = (self.stats["llm_decode_read_bytes"] + kv_bytes) / self.bandwidth
                compute = 2.0 * b * self.stats["llm_matmul_params"] / self.flops_rate
                measured_step = t.median / forwards
                entry.update(
                    roofline_step_s_weights=step_w,
                    roofline_step_s_weights_kv=step_wkv,
                    roofline_step_s_compute=compute,
                    roofline_tokens_per_s=b / max(step_w, compute),
                    fraction_of_weight_roofline=step_w / measured_step,
                    fraction_of_weight_kv_roofline=max(step_wkv, compute) / measured_step,
                )
            out["batches"][str(b)] = entry
        return out

    # -- torch peer ------------------------------------------------------------------------------
    def peer_section(self, ours: dict[str, Any]) -> dict[str, Any]:
        from benchmarks import torch_peer

        a = self.args
        return torch_peer.run(
            self.model,
            prefill_tokens=a.prefill_tokens,
            decode_prompt_tokens=a.decode_prompt_tokens,
            steps=a.decode_steps,
            batch_sizes=a.batch_sizes,
            repeats=a.repeats,
            ours=ours,
            compile_mode=a.torch_compile,
        )

    # -- ablations -------------------------------------------------------------------------------
    def ablations_section(self) -> dict[str, Any]:
        from benchmarks import ablations

        a = self.args
        return ablations.run(
            self.bench, repeats=a.repeats, steps=a.decode_steps, prefill_tokens=a.prefill_tokens
        )

    # -- workload --------------------------------------------------------------------------------
    def workload_section(self) -> dict[str, Any]:
        from benchmarks import workload

        a = self.args
        if a.workload_model == "same":
            bench = self.bench
        else:
            bench = models.build("tiny", dtype="float32")
        return workload.run(bench, requests=a.workload_requests, seed=0)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="2.6", choices=models.BENCH_PRESETS)
    src.add_argument("--checkpoint", default=None, help="checkpoint folder: real weights")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--layers", type=int, default=None, help="truncate the LLM to N layers")
    p.add_argument("--vision-layers", type=int, default=None, help="truncate the vision tower")
    p.add_argument("--sections", default=",".join(ALL_SECTIONS), help="comma list to run")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; CPU 3)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32])
    p.add_argument("--decode-steps", type=int, default=None, help="tokens per decode run")
    p.add_argument("--decode-prompt-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=None)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--slice-buckets", type=_ints, default=list(Buckets().slices))
    p.add_argument(
        "--token-buckets", type=_ints, default=list(Buckets().tokens),
        help="prompt-length buckets (default: generate.Buckets.tokens)",
    )  # fmt: skip
    p.add_argument("--bandwidth-bytes", type=int, default=None)
    p.add_argument("--matmul-n", type=int, default=None)
    p.add_argument("--workload-requests", type=int, default=100)
    p.add_argument(
        "--workload-model", default="tiny", choices=("tiny", "same"),
        help="model of the mixed workload: the tiny test checkpoint or the benchmarked one",
    )  # fmt: skip
    p.add_argument(
        "--torch-compile", default=None, metavar="MODE",
        help="peer: torch.compile the transformers forward (e.g. reduce-overhead on GPU)",
    )  # fmt: skip
    p.add_argument(
        "--stacked-layers", action="store_true",
        help="CPU: keep the decoder stacked and scanned (generate.SPLIT_LAYERS = False; A/B)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smallest sizes (smoke test)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON report path")
    return p


def _defaults(args: argparse.Namespace) -> None:
    """Fill size defaults by backend: accelerators get production sizes, the CPU bounded ones."""
    cpu = jax.default_backend() == "cpu"
    quick = args.quick
    pick = lambda accel, host, tiny: tiny if quick else (host if cpu else accel)
    if args.repeats is None:
        args.repeats = pick(5, 3, 1)
    if args.decode_steps is None:
        args.decode_steps = pick(128, 8, 4)
    if args.prefill_tokens is None:
        args.prefill_tokens = pick(2048, 256, 64)
    if args.bandwidth_bytes is None:
        args.bandwidth_bytes = pick(4 << 30, 1 << 30, 16 << 20)
    if args.matmul_n is None:
        args.matmul_n = pick(8192, 2048, 256)
    if quick and args.workload_requests == 100:
        args.workload_requests = 6


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    CompileCounter.install()
    _defaults(args)
    generate.SPLIT_LAYERS = not args.stacked_layers
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(ALL_SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {ALL_SECTIONS}")
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + shlex.join(argv),
        "machine": measure.machine_info(),
        "device": measure.device_info(),
        "versions": measure.versions(),
        "settings": {
            k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
        },
    }
    c0 = CompileCounter.count()
    t0 = time.perf_counter()
    bench = models.build(
        None if args.checkpoint else args.preset,
        checkpoint=args.checkpoint,
        dtype=args.dtype,
        layers=args.layers,
        vision_layers=args.vision_layers,
    )
    h = Harness(args, bench)
    report["model"] = {
        "source": bench.source,
        "version": h.cfg.version,
        "dtype": args.dtype,
        "truncated": bench.truncated,
        "build_s": time.perf_counter() - t0,
        **h.stats,
    }
    log.info("model: %s", report["model"])
    results: dict[str, Any] = {}
    for name in sections:
        if name == "peer" and "decode" not in results:
            log.warning("peer: needs the decode section in the same run; skipped")
            continue
        log.info("section %s ...", name)
        t1 = time.perf_counter()
        if name == "peer":
            results[name] = h.peer_section(
                {"prefill": results.get("prefill"), "decode": results["decode"]}
            )
        else:
            results[name] = getattr(h, f"{name}_section")()
        results[name]["section_wall_s"] = time.perf_counter() - t1
        log.info("section %s done in %.1f s", name, results[name]["section_wall_s"])
        if args.out is not None:
            _write(args.out.with_suffix(".partial.json"), {**report, "results": results})
    report["results"] = results
    report["compiles_total"] = CompileCounter.count() - c0
    report["peak_memory"] = measure.peak_memory()
    report["load_average_end"] = measure.load_average()
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    if args.out is None:
        stem = "checkpoint" if args.checkpoint else f"preset-{args.preset}"
        args.out = pathlib.Path("benchmarks/results") / f"{stem}-{jax.default_backend()}.json"
    report = run(args, argv)
    from benchmarks import report as report_mod

    _write(args.out, report)
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(report_mod.markdown(report))
    print(f"\nreport written to {args.out}", file=sys.stderr)
    return 0


def _write(path: pathlib.Path, report: dict[str, Any]) -> None:
    """JSON report (also written after every section, as PATH.partial.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
