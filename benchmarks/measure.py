"""Measurement primitives: repeated timing, XLA compile counting, peak memory, machine probes.

Every number the harness reports comes from one of these: `time_repeats` (median and min-max of
blocking calls after warm-up), `CompileCounter` (XLA backend compilations, from jax.monitoring),
`peak_memory` (device.memory_stats() where the backend has it, process RSS otherwise) and the two
probes that set the roofline of this very run: `measure_bandwidth` (large on-device read and copy)
and `measure_matmul` (large square matmul in the compute dtype).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

# jax.monitoring event recorded once per XLA backend compilation (jit, pjit, eager op).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of `n` repeats: median and the min-max spread."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        if not seconds:
            raise ValueError("no timings")
        return cls(statistics.median(seconds), min(seconds), max(seconds), len(seconds))

    def scaled(self, factor: float) -> Timing:
        """Same spread times `factor` (e.g. per slice); a rate uses `rate` instead."""
        return Timing(self.median * factor, self.min * factor, self.max * factor, self.n)

    def rate(self, amount: float) -> dict[str, float]:
        """amount / seconds: median rate and its spread (the min time gives the max rate)."""
        return {"median": amount / self.median, "min": amount / self.max, "max": amount / self.min}

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def time_repeats(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[Timing, float]:
    """Time a blocking call: (Timing of `repeats` calls after warm-up, seconds of the first call).

    The first call's time includes tracing and compilation when `fn` runs a fresh program; the
    repeats do not (the harness checks that they compiled nothing).
    """
    first = None
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - t0 if first is None else first
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - t0)
    return Timing.of(seconds), first


class CompileCounter:
    """Counts XLA backend compilations process-wide (jit, eager ops) via jax.monitoring."""

    _count = 0
    _registered = False

    @classmethod
    def install(cls) -> None:
        if not cls._registered:
            jax.monitoring.register_event_duration_secs_listener(cls._listener)
            cls._registered = True

    @classmethod
    def _listener(cls, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            cls._count += 1

    @classmethod
    def count(cls) -> int:
        cls.install()
        return cls._count


def device_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "num_devices": jax.device_count(),
    }


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "host_memory_bytes": mem,
        "platform": platform.platform(),
        "load_average": load_average(),
        "python": platform.python_version(),
    }


def load_average() -> list[float] | None:
    """1 / 5 / 15-minute load averages: other processes on the machine perturb timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "transformers", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def peak_memory() -> dict[str, Any]:
    """Peak device bytes (memory_stats) where available; on CPU the process's peak RSS."""
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise or return None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {
            "source": "device.memory_stats()",
            "peak_bytes": int(stats["peak_bytes_in_use"]),
            "bytes_limit": int(stats.get("bytes_limit", 0)) or None,
        }
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"source": "process peak RSS (ru_maxrss)", "peak_bytes": int(rss_kib) * 1024}


@functools.partial(jax.jit, donate_argnums=0)
def _add_one(x):
    return x + 1  # reads and writes every byte; donation makes it in place (no fresh pages)


@jax.jit
def _read_sum(x):
    return jnp.sum(x, dtype=jnp.float32)  # reads every byte, writes one scalar


def measure_bandwidth(nbytes: int, repeats: int = 5) -> dict[str, Any]:
    """Device memory bandwidth in bytes/s of a large read (sum) and a large in-place x + 1.

    Decode streams weights (reads), so `read` is the roofline number; `copy` (read + write of
    the same buffer, donated) is reported next to it as the classic STREAM-like figure.
    """
    n = nbytes // 2
    x = jnp.zeros((n,), jnp.bfloat16)
    read, _ = time_repeats(lambda: _read_sum(x), repeats)
    state = {"x": x}

    def copy():
        state["x"] = _add_one(state["x"])
        return state["x"]

    rw, _ = time_repeats(copy, repeats)
    return {
        "array_bytes": 2 * n,
        "read_bytes_per_s": read.rate(2 * n),
        "copy_bytes_per_s": rw.rate(2 * 2 * n),
        # the roofline bandwidth: the best rate seen (STREAM's "best rate"), since other work on
        # the machine only ever slows a repeat down
        "bytes_per_s": max(read.rate(2 * n)["max"], rw.rate(4 * n)["max"]),
        "rule": "best",
    }


def measure_matmul(n: int, dtype, repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of an [n, n] @ [n, n] matmul in `dtype` (float32 accumulation)."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
    t, _ = time_repeats(lambda: f(a, b), repeats)
    return {"n": n, "dtype": str(jnp.dtype(dtype)), "flops_per_s": t.rate(2.0 * n**3)}


def roofline_rates(probes: dict[str, Any]) -> tuple[float, float]:
    """(bytes/s, FLOP/s) that set a report's rooflines: the best rate of the repeats.

    Reports written before this rule (no "rule" key in the bandwidth probe) used the median
    matmul rate and the larger of the median read / copy rates; they are read back that way.
    """
    bw, mm = probes["bandwidth"], probes["matmul"]
    if bw.get("rule") == "best":
        return float(bw["bytes_per_s"]), float(mm["flops_per_s"]["max"])
    return float(bw["bytes_per_s"]), float(mm["flops_per_s"]["median"])


def finite_positive(x: float) -> bool:
    return bool(np.isfinite(x) and x > 0)
