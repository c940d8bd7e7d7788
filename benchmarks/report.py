"""Markdown tables and the decode-vs-roofline plot from `benchmarks.run` JSON reports.

python -m benchmarks.report benchmarks/results/*.json --plot benchmarks/decode_roofline.png
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from benchmarks import measure


def _ms(t: dict[str, float] | None) -> str:
    if not t:
        return "-"
    return f"{1e3 * t['median']:.1f} ({1e3 * t['min']:.1f}-{1e3 * t['max']:.1f})"


def _rate(r: dict[str, float] | None, unit: float = 1.0, digits: int = 1) -> str:
    if not r:
        return "-"
    f = f"{{:.{digits}f}}"
    return (
        f"{f.format(r['median'] / unit)} ({f.format(r['min'] / unit)}-{f.format(r['max'] / unit)})"
    )


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def header(rep: dict[str, Any]) -> list[str]:
    m, d, v, st = rep["model"], rep["device"], rep["versions"], rep["settings"]
    llm, vis = m["truncated"]["llm_layers"], m["truncated"]["vision_layers"]
    trunc = ""
    if llm[0] != llm[1] or vis[0] != vis[1]:
        trunc = f"; **truncated: LLM {llm[0]}/{llm[1]} layers, vision {vis[0]}/{vis[1]} layers**"
    mem = rep.get("peak_memory", {})
    return [
        f"- date: {rep['date']}; command: `{rep['command']}`",
        (
            f"- machine: {rep['machine']['cpu']} ({rep['machine']['cpu_count']} cores); "
            f"device: {d['backend']} / {d['device_kind']}"
        ),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        (
            f"- model: MiniCPM-V {m['version']}, {m['source']}, {m['dtype']}{trunc}; "
            f"LLM {m['llm_params'] / 1e9:.2f} B params, decode reads {_gb(m['llm_decode_read_bytes'])} "
            f"GB of weights per step"
        ),
        (
            f"- peak memory: {_gb(mem.get('peak_bytes'))} GB ({mem.get('source', '-')}); "
            f"XLA compilations in the whole run: {rep.get('compiles_total', '-')}"
        ),
        (
            f"- shape buckets: prompt tokens {st.get('token_buckets', '(256, 512, ...)')}, "
            f"slices {st.get('slice_buckets')}"
        ),
        (
            f"- timings: median (min-max) of {rep['settings']['repeats']} repeats after warm-up; "
            f"load average (1/5/15 min) at start {rep['machine'].get('load_average')}, "
            f"at end {rep.get('load_average_end')}"
        ),
    ]


def markdown(rep: dict[str, Any]) -> str:
    r = rep["results"]
    lines = header(rep) + [""]
    if "probes" in r:
        bw, mm = r["probes"]["bandwidth"], r["probes"]["matmul"]
        lines += [
            "| probe | value |",
            "|---|---|",
            (
                f"| device read bandwidth, GB/s ({_gb(bw['array_bytes'])} GB array) | "
                f"{_rate(bw['read_bytes_per_s'], 1e9)} |"
            ),
            f"| device copy bandwidth x+1 (read+write), GB/s | {_rate(bw['copy_bytes_per_s'], 1e9)} |",
            f"| matmul {mm['n']}^3 {mm['dtype']}, TFLOP/s | {_rate(mm['flops_per_s'], 1e12, 3)} |",
        ]
        roof_bw, roof_mm = measure.roofline_rates(r["probes"])
        rule = "best of repeats" if bw.get("rule") == "best" else "medians"
        used = f"{roof_bw / 1e9:.1f} GB/s, {roof_mm / 1e12:.3f} TFLOP/s"
        lines += [f"| **roofline uses** ({rule}) | {used} |", ""]
    if "processor" in r or "vision" in r or "ttft" in r:
        lines += [
            (
                "| image | processor ms | slices (bucket) | vision+resampler ms / slice | "
                "prompt tokens (bucket) | TTFT ms | TTFT breakdown: processor / prefill / "
                "first token ms | TTFT device part / compute floor | compiles in repeats |"
            ),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key in ("448x448", "1344x1344"):
            p = r.get("processor", {}).get(key, {})
            vz = r.get("vision", {}).get(key, {})
            tt = r.get("ttft", {}).get(key, {})
            bd = tt.get("breakdown", {})
            parts = " / ".join(_ms(bd.get(k)) for k in ("processor", "prefill", "first_token"))
            ratio = tt.get("device_over_floor")
            comp = sum(x.get("compiles_in_repeats", 0) for x in (vz, tt))
            lines.append(
                f"| {key} | {_ms(p.get('seconds'))} | {vz.get('slices', '-')} "
                f"({vz.get('slice_bucket', '-')}) | {_ms(vz.get('seconds_per_slice'))} | "
                f"{tt.get('prompt_tokens', '-')} ({tt.get('token_bucket', '-')}) | "
                f"{_ms(tt.get('seconds'))} | {parts} | "
                f"{'-' if ratio is None else f'{ratio:.2f}x'} | {comp} |"
            )
        lines.append("")
    if "prefill" in r:
        p = r["prefill"]
        lines += [
            "| prefill (text, batch 1) | tokens/s | fraction of measured matmul rate |",
            "|---|---|---|",
            (
                f"| {p['tokens']} tokens | {_rate(p['tokens_per_s'])} | "
                f"{_pct(p.get('fraction_of_matmul_rate'))} |"
            ),
            "",
        ]
    if "decode" in r:
        d = r["decode"]
        peer = r.get("peer", {}).get("decode", {}) if "skipped" not in r.get("peer", {}) else {}
        lines += [
            (
                f"Decode: {d['steps']} new tokens after a {d['prompt_tokens']}-token prompt, greedy, "
                "static cache; roofline = weight bytes per step / measured read bandwidth; full "
                "roofline = max((weight + KV-cache bytes) / bandwidth, matmul FLOPs / matmul rate)."
            ),
            "",
            (
                "| batch | tokens/s | ms / step | roofline tokens/s | of weight roofline | "
                "of full roofline | torch tokens/s | ours / torch |"
            ),
            "|---|---|---|---|---|---|---|---|",
        ]
        for b, e in d["batches"].items():
            pe = peer.get(b, {})
            lines.append(
                f"| {b} | {_rate(e['tokens_per_s'])} | {_ms(e['step_s'])} | "
                f"{e.get('roofline_tokens_per_s', 0):.1f} | "
                f"{_pct(e.get('fraction_of_weight_roofline'))} | "
                f"{_pct(e.get('fraction_of_weight_kv_roofline'))} | "
                f"{_rate(pe.get('tokens_per_s'))} | "
                f"{pe.get('ours_over_torch', float('nan')):.2f}x |"
            )
        lines.append("")
    if "peer" in r:
        pr = r["peer"]
        if "skipped" in pr:
            lines += [f"PyTorch peer: {pr['skipped']}", ""]
        else:
            lc = pr["logits_check"]
            lines += [
                (
                    f"PyTorch peer: {pr['implementation']}; same weights (last-token logits max |diff| "
                    f"{lc['max_abs_diff']:.3g} of max |logit| {lc['max_abs_logit']:.3g}, argmax equal: "
                    f"{lc['argmax_equal']})."
                ),
            ]
            if "prefill" in pr:
                pp = pr["prefill"]
                lines.append(
                    f"Prefill {pp['tokens']} tokens: torch {_rate(pp['tokens_per_s'])} tokens/s, "
                    f"ours / torch {pp['ours_over_torch']:.2f}x."
                )
            lines.append("")
    if "ablations" in r:
        ab = r["ablations"]
        lines += [
            "| ablation | shape | separate / baseline ms | fused / candidate ms | speedup |",
            "|---|---|---|---|---|",
        ]
        for rows, e in ab["fused_projections"].items():
            for name in ("qkv", "gate_up"):
                x = e[name]
                lines.append(
                    f"| fused {name} projection | {rows} rows | {_ms(x['separate_s'])} | "
                    f"{_ms(x['fused_s'])} | {x['speedup']:.2f}x |"
                )
        hs = ab["host_sync"]
        lines.append(
            f"| decode loop on device vs host round trip per token | batch 1, {hs['steps']} "
            f"tokens | stream {_rate(hs['stream_tokens_per_s'])} tok/s | device loop "
            f"{_rate(hs['device_loop_tokens_per_s'])} tok/s | {hs['device_loop_speedup']:.2f}x |"
        )
        att = ab["attention"]
        base = att["impls"].get("xla", {}).get("seconds")
        for impl, e in att["impls"].items():
            if "error" in e:
                lines.append(
                    f"| attention {impl} | T = S = {att['tokens']} | - | {e['error']} | - |"
                )
            elif base:
                lines.append(
                    f"| attention {impl} (vs xla) | T = S = {att['tokens']} causal | {_ms(base)} | "
                    f"{_ms(e['seconds'])} | {base['median'] / e['seconds']['median']:.2f}x |"
                )
        lines.append("")
    if "workload" in r:
        w = r["workload"]
        lines += [
            (
                f"Mixed workload ({w['model']}): {w['requests']} requests, {w['conversations']} "
                f"conversations, modes {w['modes']}, slices per request {w['slices_per_request']}; "
                f"{w['distinct_signatures']} distinct shape signatures, warm-up compiled "
                f"{w['warmup_compiles']} XLA programs; **compilations after warm-up: "
                f"{w['compiles_after_warmup']}** (traces {w['traces_after_warmup']}); "
                f"{w['new_tokens']} new tokens in {w['run_s']:.1f} s."
            ),
            "",
        ]
    return "\n".join(lines)


def plot(reports: list[tuple[str, dict[str, Any]]], path: pathlib.Path) -> None:
    """Decode tokens/s vs batch size (min-max bars), the roofline and the torch peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(reports)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    for ax, (name, rep) in zip(axes[0], reports):
        d = rep["results"]["decode"]
        bw, rate = measure.roofline_rates(rep["results"]["probes"])
        m = rep["model"]
        bs = np.array([int(b) for b in d["batches"]])
        med = np.array([e["tokens_per_s"]["median"] for e in d["batches"].values()])
        lo = med - np.array([e["tokens_per_s"]["min"] for e in d["batches"].values()])
        hi = np.array([e["tokens_per_s"]["max"] for e in d["batches"].values()]) - med
        grid = np.geomspace(1, max(bs.max(), 1) * 2, 64)
        weight_bound = grid * bw / m["llm_decode_read_bytes"]
        compute_bound = rate / (2.0 * m["llm_matmul_params"]) * np.ones_like(grid)
        ax.plot(grid, np.minimum(weight_bound, compute_bound), "k--", label="roofline")
        ax.errorbar(bs, med, yerr=[lo, hi], fmt="o-", capsize=3, label="minicpmv-jax")
        peer = rep["results"].get("peer", {})
        if "decode" in peer:
            pb = [int(b) for b in peer["decode"]]
            ax.plot(pb, [e["tokens_per_s"]["median"] for e in peer["decode"].values()], "s-",
                    label="transformers (torch)")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s")
        llm = m["truncated"]["llm_layers"]
        depth = f", {llm[0]}/{llm[1]} layers" if llm[0] != llm[1] else ""
        ax.set_title(
            f"{name}: MiniCPM-V {m['version']} {m['dtype']}{depth}\n"
            f"{rep['device']['backend']} {rep['device']['device_kind']}",
            fontsize=9,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("reports", nargs="+", type=pathlib.Path)
    p.add_argument("--plot", type=pathlib.Path, default=None, help="PNG of decode vs roofline")
    args = p.parse_args(argv)
    reps = [(f.stem, json.loads(f.read_text())) for f in args.reports]
    for name, rep in reps:
        print(f"### {name}\n\n{markdown(rep)}\n")
    if args.plot:
        with_decode = [
            (n, r) for n, r in reps if "decode" in r["results"] and "probes" in r["results"]
        ]
        plot(with_decode, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
