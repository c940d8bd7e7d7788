"""Few-row matmuls on the CPU backend: (in, out) kernels (`x @ W`, our layout) against the torch
(out, in) layout (`(W x^T)^T`) and numpy, at the MiniCPM-V 2.6 lm_head and MLP shapes.

    python -m benchmarks.dot_layout            # float32; prints one line per shape and row count
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {  # name: (in, out)
    "lm_head": (3584, 151_666),
    "up/gate": (3584, 18_944),
    "down": (18_944, 3584),
}


def _median_s(f, *args, n: int = 5) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    rng = np.random.default_rng(0)
    in_out = jax.jit(lambda x, w: x @ w)
    out_in = jax.jit(lambda x, wt: (wt @ x.T).T)
    for name, (d, v) in SHAPES.items():
        w_np = (rng.standard_normal((d, v), np.float32) * 0.02).astype(np.float32)
        w, wt = jnp.asarray(w_np), jnp.asarray(np.ascontiguousarray(w_np.T))
        for m in (1, 4, 16):
            x_np = rng.standard_normal((m, d)).astype(np.float32)
            x = jnp.asarray(x_np)
            np.testing.assert_allclose(in_out(x, w), out_in(x, wt), rtol=1e-4, atol=1e-4)
            a, b = _median_s(in_out, x, w), _median_s(out_in, x, wt)
            c = _median_s(np.matmul, x_np, w_np)
            print(
                f"{name:8s} {d}x{v} rows {m:2d}: (in,out) {a * 1e3:7.1f} ms  (out,in) "
                f"{b * 1e3:7.1f} ms  numpy {c * 1e3:7.1f} ms  ratio {a / b:4.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
