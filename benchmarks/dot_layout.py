"""Few-row matmuls on the CPU backend: (in, out) kernels (`x @ W`) against the torch (out, in)
layout (`(W x^T)^T`) and numpy, at the MiniCPM-V 2.6 lm_head and MLP shapes, or (`--decoder`)
at every projection of a 2.6 decoder layer, with a prefill's 512 rows among the row counts.

    python -m benchmarks.dot_layout            # float32; prints one line per shape and row count
    python -m benchmarks.dot_layout --decoder --rows 1,3,16,512 --dtype bfloat16

`--dtype bfloat16` takes the product as the model's dense layers do on CPU
(`layers.cpu_aware_dot`: bf16 operands, float32 result); numpy is then left out.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from minicpmv_jax.layers import cpu_aware_dot

SHAPES = {  # name: (in, out)
    "lm_head": (3584, 151_666),
    "up/gate": (3584, 18_944),
    "down": (18_944, 3584),
}
DECODER = {  # MiniCPM-V 2.6 (Qwen2-7B widths): D 3584, F 18,944, 28 q / 4 kv heads of 128
    "q/o": (3584, 3584),
    "k/v": (3584, 512),
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder", action="store_true", help="the decoder layer's projections")
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    in_out = jax.jit(lambda x, w: cpu_aware_dot(x, w, (((1,), (0,)), ((), ()))))
    out_in = jax.jit(lambda x, wt: cpu_aware_dot(wt, x, (((1,), (1,)), ((), ()))).T)
    for name, (d, v) in (DECODER if args.decoder else SHAPES).items():
        w_np = (rng.standard_normal((d, v), np.float32) * 0.02).astype(np.float32)
        w = jnp.asarray(w_np, dtype)
        wt = jnp.asarray(np.ascontiguousarray(w_np.T), dtype)
        for m in map(int, args.rows.split(",")):
            x_np = rng.standard_normal((m, d)).astype(np.float32)
            x = jnp.asarray(x_np, dtype)
            tol = 1e-4 if dtype == jnp.float32 else 2e-2
            np.testing.assert_allclose(
                np.asarray(in_out(x, w), np.float32), np.asarray(out_in(x, wt), np.float32),
                rtol=tol, atol=tol,
            )  # fmt: skip
            a = b = np.inf
            for _ in range(2):  # interleaved; the better of two medians each
                a = min(a, _median_s(in_out, x, w))
                b = min(b, _median_s(out_in, x, wt))
            ref = ""
            if dtype == jnp.float32:
                ref = f"  numpy {_median_s(np.matmul, x_np, w_np) * 1e3:7.1f} ms"
            print(
                f"{name:8s} {d}x{v} rows {m:3d}: (in,out) {a * 1e3:7.1f} ms  (out,in) "
                f"{b * 1e3:7.1f} ms{ref}  ratio {a / b:4.2f}x",
                flush=True,
            )
        del w, wt


if __name__ == "__main__":
    main()
