"""Smoke test of the 4.6 benchmark (benchmarks/bench_v46.py) on the tiny fixture model: the
prefill-length and decode sections run and report finite positive numbers (the TTFT section
compiles a 2048-token 4x prompt: too slow for the suite). Speed itself is not asserted."""

import json
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_v46


def test_bench_v46_tiny(tmp_path):
    out = tmp_path / "v46.json"
    argv = ["--preset", "tiny", "--sections", "prefill,decode", "--batch-sizes", "1",
            "--prefill-tokens", "128",
            "--decode-steps", "3", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert bench_v46.main(argv) == 0
    rep = json.loads(out.read_text())
    values = [r["ms_per_token"] for r in rep["prefill_vs_length"]]
    values += [r["tokens_per_s"] for r in rep["decode"]]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert "ttft" not in rep and len(values) == 2
