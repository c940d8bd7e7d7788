"""Matmul throughput on this CPU: XLA (jax) against PyTorch, float32 and bfloat16 weights.

The question behind issue 16 (bf16 on CPU): does XLA:CPU run a bf16 dot natively, as PyTorch's
oneDNN kernels do with AVX512-BF16 / AMX, or does it convert the weights to float32 on every
call? Each row times ``x [m, K] @ w [K, N]`` at a decode shape (m = 1, memory-bound: GB/s of
weights read) and a prefill shape (m = 256, compute-bound: GFLOP/s), 2.6's MLP up-projection
(K = 3584, N = 18944). Variants on the XLA side: float32 weights, bf16 weights (bf16 result),
bf16 weights with a float32 accumulator (``preferred_element_type``), and the float32 dot after an
explicit bit-exact bf16 -> float32 upcast of the weights (what a "convert per call" costs).

    python -m benchmarks.cpu_dot [--threads 2] [--repeats 5]
    XLA_FLAGS=--xla_cpu_use_onednn=true python -m benchmarks.cpu_dot   # an XLA flag's effect
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

K, N = 3584, 18944


def _median(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def jax_rows(ms, repeats):
    import jax
    import jax.numpy as jnp
    from jax import lax

    def upcast(w):  # bit-exact bf16 -> float32: the high 16 bits of the float32 pattern
        bits = lax.bitcast_convert_type(w, jnp.uint16).astype(jnp.uint32) << 16
        return lax.bitcast_convert_type(bits, jnp.float32)

    variants = {
        "float32 weights": (jnp.float32, lambda x, w: x @ w),
        "bf16 weights, bf16 result": (jnp.bfloat16, lambda x, w: x @ w),
        "bf16 weights, float32 accumulator": (
            jnp.bfloat16,
            lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32),
        ),
        "bf16 weights upcast per call": (
            jnp.bfloat16,
            lambda x, w: x.astype(jnp.float32) @ upcast(w),
        ),
    }
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((K, N), np.float32)
    rows = []
    for name, (dtype, f) in variants.items():
        w = jnp.asarray(w32, dtype)
        fn = jax.jit(f)
        for m in ms:
            x = jnp.asarray(rng.standard_normal((m, K)), dtype)
            t = _median(lambda fn=fn, x=x, w=w: fn(x, w).block_until_ready(), repeats)
            rows.append(("jax " + jax.__version__, name, m, t, w.nbytes))
    return rows


def torch_rows(ms, repeats, threads):
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    w32 = torch.from_numpy(rng.standard_normal((N, K), np.float32))  # nn.Linear layout
    rows = []
    for name, dtype in (("float32 weights", torch.float32), ("bf16 weights", torch.bfloat16)):
        w = w32.to(dtype)
        for m in ms:
            x = torch.from_numpy(rng.standard_normal((m, K), np.float32)).to(dtype)
            with torch.inference_mode():
                t = _median(lambda x=x, w=w: torch.nn.functional.linear(x, w), repeats)
            rows.append(("torch " + torch.__version__, name, m, t, w.numel() * w.element_size()))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_dot", description=__doc__)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--m", default="1,256", help="rows of x (1: decode, 256: prefill)")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    ms = [int(v) for v in args.m.split(",")]
    load0 = os.getloadavg()
    rows = jax_rows(ms, args.repeats)
    if not args.no_torch:
        try:
            rows += torch_rows(ms, args.repeats, args.threads)
        except ImportError:
            print("(torch not installed: no PyTorch rows)")
    load1 = os.getloadavg()
    print(f"x [m, {K}] @ w [{K}, {N}]; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"load average {load0[0]:.2f} -> {load1[0]:.2f}")  # fmt: skip
    print("| library | weights | m | ms | GFLOP/s | weight GB/s |")
    print("|---|---|---|---|---|---|")
    for lib, name, m, t, nbytes in rows:
        print(f"| {lib} | {name} | {m} | {t * 1e3:.1f} | {2 * m * K * N / t / 1e9:.1f} | "
              f"{nbytes / t / 1e9:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
