"""Matmul rate on the MiniCPM-V 4.6 vision tower's MLP shape ([7424, 1152] x [1152, 4304]),
float32 and bf16: XLA (`jnp.dot`, `layers.cpu_aware_dot`, a dot with a float32 result) against
torch (`@`, `nn.Linear`), one process, 2 torch threads; median of 3 after one call.

`python -m benchmarks.mlp_dot_v46` (under the bench lock)."""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from minicpmv_jax.layers import cpu_aware_dot

M, K, N = 7424, 1152, 4304
FLOP = 2 * M * K * N
DN = (((1,), (0,)), ((), ()))


def med(fn, *args, repeats=3):
    fn(*args)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def report(side, name, t):
    print(f"{side:5s} {name:28s} {t * 1e3:7.1f} ms {FLOP / t / 1e9:6.1f} GFLOP/s", flush=True)


def main():
    rng = np.random.default_rng(0)
    a32 = rng.standard_normal((M, K), np.float32)
    b32 = rng.standard_normal((K, N), np.float32) * 0.03
    variants = {
        "jnp.dot": jax.jit(lambda a, b: jnp.dot(a, b)),
        "cpu_aware_dot": jax.jit(lambda a, b: cpu_aware_dot(a, b, DN)),
        "dot, float32 result": jax.jit(
            lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
        ),
    }
    for dt in (jnp.float32, jnp.bfloat16):
        a, b = jnp.asarray(a32, dt), jnp.asarray(b32, dt)
        for name, f in variants.items():
            t = med(lambda f, a, b: f(a, b).block_until_ready(), f, a, b)
            report("xla", f"{jnp.dtype(dt).name} {name}", t)
    import torch

    torch.set_num_threads(2)
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.from_numpy(a32).to(dt), torch.from_numpy(b32).to(dt)
        report("torch", f"{dt} @", med(lambda a, b: a @ b, a, b))
        lin = torch.nn.Linear(K, N).to(dt)
        with torch.no_grad():
            report("torch", f"{dt} Linear", med(lin, a))


if __name__ == "__main__":
    main()
