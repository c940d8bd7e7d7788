"""Prometheus metrics of the HTTP front end, written in the text exposition format by hand.

No dependency: counters, gauges and histograms are a few dictionaries under one lock. The engine's
own numbers (queue length, active slots, rows of the last decode step, decode steps per row
bucket, slot moves, compilations) are read from ``Engine.stats()`` when
``/metrics`` is scraped; latencies are measured here, where a request arrives and where its
tokens leave:

* time to first token: from the request's arrival (before its images are decoded) to its first
  generated token;
* time per output token: the gap between two consecutive tokens of one request (a piece of
  several tokens counts as several gaps of equal length);
* end-to-end latency: arrival to the last event;
* tokens/s: generated tokens of all requests over the last ``window_s`` seconds.
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence

__all__ = ["E2E_BUCKETS", "TPOT_BUCKETS", "TTFT_BUCKETS", "Histogram", "Metrics"]

PREFIX = "minicpmv"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    """``{k="v",...}`` with the exposition format's escapes (backslash, quote, newline)."""
    esc = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
    body = ",".join(f'{k}="{v.translate(esc)}"' for k, v in pairs)
    return "{" + body + "}" if body else ""


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` upper bounds, +Inf last)."""

    def __init__(self, buckets: Sequence[float]):
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError(f"histogram buckets must be increasing and distinct, got {buckets}")
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket (not cumulative); last = +Inf
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    @property
    def count(self) -> int:
        return sum(self.counts)

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {total}')
        out.append(f"{name}_sum {_number(self.sum)}")
        out.append(f"{name}_count {total}")
        return out


class Metrics:
    """The server's metrics; every method is thread-safe.

    Args:
      stats: a callable returning the engine's ``EngineStats`` (read at scrape time), or None.
      window_s: the averaging window of the tokens/s gauge.
    """

    def __init__(self, stats: Callable[[], object] | None = None, window_s: float = 10.0):
        self._stats = stats
        self._lock = threading.Lock()
        self.window_s = float(window_s)
        self.started = time.monotonic()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.requests: collections.Counter[str] = collections.Counter()  # by finish reason
        self.rejected: collections.Counter[str] = collections.Counter()  # by HTTP status
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.running = 0  # requests between arrival and their last event
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    # -- recording --------------------------------------------------------------------------

    def request_started(self) -> None:
        with self._lock:
            self.running += 1

    def tokens(self, n: int, *, first_after: float | None, gap: float | None) -> None:
        """``n`` new tokens of one request: ``first_after`` = seconds since its arrival when
        these are its first tokens, else ``gap`` = seconds since its previous tokens."""
        if n <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self.generation_tokens += n
            self._recent.append((now, n))
            if first_after is not None:
                self.ttft.observe(first_after)
                if n > 1:
                    self.tpot.observe(0.0, n - 1)
            elif gap is not None:
                self.tpot.observe(gap / n, n)

    def request_finished(self, reason: str, prompt_tokens: int, seconds: float) -> None:
        with self._lock:
            self.running -= 1
            self.requests[reason] += 1
            self.prompt_tokens += prompt_tokens
            self.e2e.observe(seconds)

    def request_dropped(self) -> None:
        """A started request that ended without a ``Finished`` (refused at submission)."""
        with self._lock:
            self.running -= 1

    def rejected_with(self, status: int) -> None:
        with self._lock:
            self.rejected[str(status)] += 1

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            span = min(self.window_s, max(now - self.started, 1e-9))
            return sum(n for _, n in self._recent) / span

    # -- exposition ---------------------------------------------------------------------------

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4) of every metric."""
        tps = self.tokens_per_s()
        stats = self._stats() if self._stats is not None else None
        out: list[str] = []

        def family(name, kind, help_, samples):
            out.append(f"# HELP {PREFIX}_{name} {help_}")
            out.append(f"# TYPE {PREFIX}_{name} {kind}")
            out.extend(samples)

        def simple(name, kind, help_, value, labels=()):
            family(name, kind, help_, [f"{PREFIX}_{name}{_labels(labels)} {_number(value)}"])

        if stats is not None:
            simple("slots", "gauge", "Decode slots of the engine.", stats.slots)
            simple("active_slots", "gauge", "Decode slots holding a request.", stats.active_slots)
            simple("queue_length", "gauge", "Requests waiting for a slot.", stats.queue_length)
            simple("decode_rows", "gauge",
                   "Rows the last decode step ran: the smallest compiled row bucket holding "
                   "every busy slot.", stats.decode_rows)  # fmt: skip
            steps = {b: stats.decode_steps.get(b, 0) for b in stats.decode_buckets}
            steps.update(stats.decode_steps)
            family("decode_steps_total", "counter", "Decode steps by rows stepped (row bucket).",
                   [f"{PREFIX}_decode_steps_total{_labels([('rows', str(b))])} {n}"
                    for b, n in sorted(steps.items())])  # fmt: skip
            simple("slot_moves_total", "counter",
                   "Busy slots moved down to a free lower slot to shrink the decode bucket.",
                   stats.rows_moved)  # fmt: skip
            simple(
                "compilations_after_start_total",
                "counter",
                "Programs compiled after the engine started (should stay 0).",
                stats.compilations_after_start,
            )
        with self._lock:
            simple("requests_running", "gauge", "Requests received and not yet answered.",
                   self.running)  # fmt: skip
            simple("generation_tokens_per_second", "gauge",
                   f"Generated tokens per second over the last {self.window_s:g} s.", tps)  # fmt: skip
            simple("prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                   self.prompt_tokens)  # fmt: skip
            simple("generation_tokens_total", "counter", "Generated tokens.",
                   self.generation_tokens)  # fmt: skip
            reasons = sorted(set(self.requests) | {"stop", "length", "cancelled", "error"})
            family("requests_total", "counter", "Finished requests by finish reason.",
                   [f"{PREFIX}_requests_total{_labels([('finish_reason', r)])} {self.requests[r]}"
                    for r in reasons])  # fmt: skip
            family("rejected_requests_total", "counter",
                   "Requests answered with an error status before generation, by status.",
                   [f"{PREFIX}_rejected_requests_total{_labels([('status', c)])} {n}"
                    for c, n in sorted(self.rejected.items())])  # fmt: skip
            for name, help_, hist in (
                ("time_to_first_token_seconds", "Arrival to first generated token.", self.ttft),
                ("time_per_output_token_seconds", "Gap between consecutive tokens.", self.tpot),
                ("request_latency_seconds", "Arrival to the last event.", self.e2e),
            ):
                family(name, "histogram", help_, hist.lines(f"{PREFIX}_{name}"))
        return "\n".join(out) + "\n"
