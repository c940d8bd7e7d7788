"""The decoder projections' weight layout on the CPU backend: [in, out] kernels (`nnx.Linear`,
`x @ W`) against torch's [out, in] (`layers.OutInDense`, x contracted with W's dim 1), both
through `layers.cpu_aware_dot` (bf16: float32 result, one row taken as two), at the 2.6-layout
test model's decoder shapes (Qwen2-0.5B geometry: D 896, 14 q / 2 kv heads of 64, MLP 4864).

Each timed call runs a loop (`lax.fori_loop`, as the decode loop) over `--layers` distinct
weights of one shape, passed as separate arguments (as `generate.split_layers` passes a layer
stack), one dependent product per weight, so the weights stream from memory as in a decode
step; bf16 weights both as they are (the split path) and as uint16 bit patterns reinterpreted
inside the loop (`generate.pack_weights` / `layers.unpack_bf16`). A / B calls interleave; the
median of `--calls` calls each, per product.

    python -m benchmarks.decoder_layout [--rows 1,8,128,1024] [--calls 30]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from minicpmv_jax.layers import cpu_aware_dot, unpack_bf16

SHAPES = {  # name: (in, out, projections of this shape in one layer)
    "q/o": (896, 896, 2),
    "k/v": (896, 128, 2),
    "gate/up": (896, 4864, 2),
    "down": (4864, 896, 1),
}
DIMS = {"in_out": (((1,), (0,)), ((), ())), "out_in": (((1,), (1,)), ((), ()))}


def _chain(layout: str, steps: int):
    dims = DIMS[layout]

    def f(x, *ws):
        def body(_, x):
            for w in ws:
                y = cpu_aware_dot(x, unpack_bf16(w), dims)
                x = x + (jnp.sum(y, axis=-1, keepdims=True) * 1e-6).astype(x.dtype)
            return x

        return jax.lax.fori_loop(0, steps, body, x)

    return jax.jit(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8,128,1024")
    p.add_argument("--layers", type=int, default=24, help="distinct weights at 1-8 rows")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--variants", default="float32,bfloat16,bfloat16-packed")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    load0 = os.getloadavg()
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load average {load0[0]:.2f}")
    print("| weights | shape (in x out) | rows | [in, out] us | [out, in] us | ratio |")
    print("|---|---|---|---|---|---|")
    totals = {}
    for variant in args.variants.split(","):
        dtype = jnp.float32 if variant == "float32" else jnp.bfloat16
        packed = variant.endswith("packed")
        for m in map(int, args.rows.split(",")):
            # prefill rows are compute-bound: fewer weights keep a call short
            n = args.layers if m <= 8 else max(1, args.layers * 8 // m)
            steps = 2
            for name, (din, dout, count) in SHAPES.items():
                w32 = [
                    (rng.standard_normal((din, dout), np.float32) * 0.03) for _ in range(n)
                ]  # fmt: skip
                ws = {}
                for layout in DIMS:
                    arrs = [a if layout == "in_out" else np.ascontiguousarray(a.T) for a in w32]
                    arrs = [jnp.asarray(a, dtype) for a in arrs]
                    if packed:
                        arrs = [jax.lax.bitcast_convert_type(a, jnp.uint16) for a in arrs]
                    ws[layout] = arrs
                del w32
                x = jnp.asarray(rng.standard_normal((m, din)), dtype)
                fns = {layout: _chain(layout, steps) for layout in DIMS}
                outs = {k: np.asarray(fns[k](x, *ws[k]), np.float32) for k in DIMS}
                tol = 1e-4 if dtype == jnp.float32 else 2e-2
                np.testing.assert_allclose(outs["in_out"], outs["out_in"], rtol=tol, atol=tol)
                times = {k: [] for k in DIMS}
                for _ in range(args.calls):
                    for k in DIMS:
                        t = time.perf_counter()
                        jax.block_until_ready(fns[k](x, *ws[k]))
                        times[k].append(time.perf_counter() - t)
                per = {k: float(np.median(v)) / (n * steps) * 1e6 for k, v in times.items()}
                print(
                    f"| {variant} | {name} {din}x{dout} | {m} | {per['in_out']:.1f} | "
                    f"{per['out_in']:.1f} | {per['in_out'] / per['out_in']:.2f}x |",
                    flush=True,
                )
                tot = totals.setdefault((variant, m), [0.0, 0.0])
                tot[0] += count * per["in_out"]
                tot[1] += count * per["out_in"]
                del ws, fns
    load1 = os.getloadavg()
    print(f"\none layer's 7 projections (sums); load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print("| weights | rows | [in, out] us | [out, in] us | ratio |")
    print("|---|---|---|---|---|")
    for (variant, m), (a, b) in totals.items():
        print(f"| {variant} | {m} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
