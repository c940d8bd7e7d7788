"""Smoke test of the benchmark harness (benchmarks/run.py) on the tiny test configuration.

Runs `benchmarks.run.main` once with the smallest sizes and checks the JSON report's structure
and that every measured number is finite and positive. Speed itself is not asserted.
"""

import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report as report_mod
from benchmarks import run as bench_run
from benchmarks import workload


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    argv = [
        "--preset", "tiny", "--quick", "--sections", "probes,processor,prefill,decode",
        "--batch-sizes", "1,2", "--decode-steps", "3", "--prefill-tokens", "32",
        "--out", str(out),
    ]  # fmt: skip
    assert bench_run.main(argv) == 0
    return json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _timing_ok(t) -> bool:
    return all(_positive(t[k]) for k in ("median", "min", "max")) and t["min"] <= t["max"]


def test_report_header(report):
    for key in ("date", "command", "machine", "device", "versions", "model", "results"):
        assert key in report
    assert report["command"].startswith("python -m benchmarks.run")
    assert report["model"]["truncated"]["llm_layers"][0] >= 1
    assert _positive(report["peak_memory"]["peak_bytes"])
    assert report["compiles_total"] > 0


def test_probes_are_positive(report):
    probes = report["results"]["probes"]
    assert _timing_ok(probes["bandwidth"]["read_bytes_per_s"])
    assert _timing_ok(probes["matmul"]["flops_per_s"])
    assert _positive(probes["bandwidth"]["bytes_per_s"])


def test_processor_prefill_decode(report):
    r = report["results"]
    for size in ("448x448", "1344x1344"):
        assert _timing_ok(r["processor"][size]["seconds"])
        assert r["processor"][size]["slices"] >= 1
    assert _timing_ok(r["prefill"]["tokens_per_s"])
    assert 0 < r["prefill"]["fraction_of_matmul_rate"]
    batches = r["decode"]["batches"]
    assert set(batches) == {"1", "2"}
    for e in batches.values():
        assert _timing_ok(e["tokens_per_s"])
        assert e["forward_steps"] == 2
        assert _positive(e["roofline_tokens_per_s"])
        assert _positive(e["fraction_of_weight_roofline"])
        assert e["compiles_in_repeats"] == 0  # warm decode never recompiles


def test_markdown_tables(report):
    md = report_mod.markdown(report)
    assert "| batch | tokens/s |" in md
    assert "prefill (text, batch 1)" in md


def test_workload_requests_are_deterministic_and_mixed():
    a = workload.make_requests(100, seed=0)
    assert a == workload.make_requests(100, seed=0)
    assert len(a) == 100
    assert {r["mode"] for r in a} == {"greedy", "sample", "beam"}
    images = [c["image"] for r in a for c in r["convs"]]
    assert any(i is None for i in images) and any(i is not None for i in images)


def test_compile_time_report(tmp_path):
    """Full-width 2.6 programs compile from abstract weights; the prompt lands in the 64 bucket."""
    from benchmarks import compile_time

    out = tmp_path / "compile.json"
    argv = ["--preset", "2.6", "--layers", "1", "--prompt-tokens", "40", "--slices", "1"]
    assert compile_time.main([*argv, "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    (row,) = rep["rows"]
    assert row["llm_layers"] == 1 and row["token_bucket"] == 64
    for k in ("prefill_lower_s", "prefill_compile_s", "decode_lower_s", "decode_compile_s"):
        assert _positive(row[k])
    assert "| 1 |" in compile_time.markdown(rep)


# Slow: the benchmark workload end to end (build, warm-up, 8 mixed requests). The default suite
# checks the same promise on the generation path itself
# (test_generate.py::test_warmup_compiles_what_requests_then_run, test_warmup_covers_streaming).
@pytest.mark.slow
def test_workload_warmed_up_from_declared_shapes_compiles_nothing():
    """A small mixed workload: Sampler.warmup on the requests' RequestShapes (sizes only)
    compiles every program the requests then run."""
    from benchmarks import models

    bench = models.build("tiny", dtype="float32")
    res = workload.run(bench, requests=8, seed=1)
    assert res["warmup_signatures"] == res["distinct_signatures"] > 1
    assert res["warmup_compiles"] > 0
    assert res["compiles_after_warmup"] == 0 and res["traces_after_warmup"] == 0


# Slow (10 s: about 15 tiny programs compiled, the decoder unrolled per layer)
@pytest.mark.slow
def test_decode_parts_times_each_part_and_counts_its_weights():
    """benchmarks.decode_parts on the tiny 2.6 fixture in bf16: every part timed, and the weight
    bytes it charges each part equal the parameter count from the config (2 bytes each)."""
    from gen_helpers import load_model

    from benchmarks import decode_parts

    model = load_model("minicpm-v-2_6", "bfloat16")
    res = decode_parts.measure(model, prompt_words=8, new_tokens=3, repeats=1)
    for part in ("loop", "step", "decoder", "lm_head", "sample", "mlp", "attention"):
        assert _positive(res["ms"][part]), part
    c = model.config.llm
    d, f, q, kv = (
        c.hidden_size,
        c.intermediate_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
    )
    attention = d * q + 2 * d * kv + q * d + (q + 2 * kv) * c.qkv_bias
    mlp = 3 * d * f
    w = res["weight_bytes"]
    assert w["mlp"] == 2 * mlp and w["attention"] == 2 * attention
    assert w["decoder"] == 2 * c.num_layers * (attention + mlp + 2 * d)  # + the two RMSNorms
    assert w["lm_head"] == 2 * c.vocab_size * d
    assert len(res["ids"]) == 3
