"""The LLM's logits (`Llm.logits`) at the MiniCPM-V 2.6 lm_head shape (3584 x 151,666) on the
CPU backend, for 1 / 4 / 16 rows: the lm_head stored in torch's layout [V, D]
(`layers.OutInDense`, today's `Llm.logits`) against the previous layout, an nnx.Linear kernel
[D, V] (a copy of the previous `Llm.logits` below), interleaved in one process.

Three weight forms, as the samplers hold them: float32; bf16 as the CPU samplers pass it
(packed uint16 bit patterns, taken in 1M-weight tiles: `generate.pack_weights`); int8
(`quant.Int8OutInDense` against `quant.Int8Dense`, dequantized in tiles).

    python -m benchmarks.logits_layout            # prints one line per form and row count
"""

from __future__ import annotations

import argparse
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpmv_jax import quant
from minicpmv_jax.layers import PACKED_BF16, OutInDense, cpu_aware_dot, dense, unpack_bf16
from minicpmv_jax.llm import LOGITS_TILE, Llm
from minicpmv_jax.sharding import RULES, make_mesh

D, V = 3584, 151_666  # MiniCPM-V 2.6 hidden size and vocabulary


# ---- the previous layout: nnx.Linear kernel [D, V] (Llm.logits / _tiled_logits before) ----


def _tiled_logits_before(h, kernel, dtype):
    """h [..., D] @ packed bf16 kernel uint16 [D, V] in column tiles (the previous code)."""
    d, v = kernel.shape
    cols = max(1, min(v, LOGITS_TILE // d))
    n = v // cols
    dims = (((h.ndim - 1,), (0,)), ((), ()))

    def tile(j):
        w = unpack_bf16(jax.lax.dynamic_slice_in_dim(kernel, j * cols, cols, axis=1))
        return cpu_aware_dot(h, w.astype(dtype), dims)

    y = jnp.moveaxis(jax.lax.map(tile, jnp.arange(n)), 0, -2)
    y = y.reshape(*h.shape[:-1], n * cols)
    if n * cols < v:
        rest = unpack_bf16(kernel[:, n * cols :]).astype(dtype)
        y = jnp.concatenate([y, cpu_aware_dot(h, rest, dims)], axis=-1)
    return y


def logits_before(lm_head, h):
    kernel = lm_head.kernel[...]
    if kernel.dtype == PACKED_BF16:
        dtype = lm_head.dtype or jnp.bfloat16
        return _tiled_logits_before(h.astype(dtype), kernel, dtype).astype(jnp.float32)
    return lm_head(h).astype(jnp.float32)


def logits_after(lm_head, h):
    return Llm.logits(types.SimpleNamespace(lm_head=lm_head), h)


# ---- modules holding given arrays ----


def _heads(w_vd: np.ndarray, form: str):
    """(before module, after module) holding the same weights [V, D] in the two layouts."""
    dtype = jnp.float32 if form == "float32" else jnp.bfloat16
    kw = {"dtype": dtype, "param_dtype": dtype}
    with jax.set_mesh(make_mesh()), nnx.logical_axis_rules(RULES):
        before = nnx.eval_shape(
            lambda: dense(D, V, ("embed", "vocab"), bias=False, rngs=nnx.Rngs(0), **kw)
        )
        after = nnx.eval_shape(lambda: OutInDense(D, V, ("vocab", "embed"), rngs=nnx.Rngs(0), **kw))
    if form == "int8":
        q, scale = quant.quantize_kernel(w_vd, -2)  # [V, D] int8, [V]
        b = quant.Int8Dense(
            nnx.Param(jnp.asarray(np.ascontiguousarray(q.T))), nnx.Param(jnp.asarray(scale)),
            None, jnp.bfloat16,
        )  # fmt: skip
        a = quant.Int8OutInDense(
            nnx.Param(jnp.asarray(q)), nnx.Param(jnp.asarray(scale)), None, jnp.bfloat16
        )
        return b, a
    if form == "float32":
        before.kernel = nnx.Param(jnp.asarray(np.ascontiguousarray(w_vd.T)))
        after.weight = nnx.Param(jnp.asarray(w_vd))
        return before, after
    bits = w_vd.astype(jnp.bfloat16).view(np.uint16)  # packed bf16, as generate.pack_weights
    before.kernel = nnx.Param(jnp.asarray(np.ascontiguousarray(bits.T)))
    after.weight = nnx.Param(jnp.asarray(bits))
    return before, after


def _median_s(f, *args, n: int) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--forms", default="float32,bf16,int8")
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    w_vd = (rng.standard_normal((V, D), np.float32) * 0.02).astype(np.float32)
    for form in args.forms.split(","):
        before, after = _heads(w_vd, form)
        runs = {}
        for name, fn, module in (("before", logits_before, before), ("after", logits_after, after)):
            graphdef, state = nnx.split(module)
            runs[name] = (
                jax.jit(lambda state, h, fn=fn, g=graphdef: fn(nnx.merge(g, state), h)),
                state,
            )
        for m in map(int, args.rows.split(",")):
            h = jnp.asarray(rng.standard_normal((m, 1, D)).astype(np.float32))
            if form != "float32":
                h = h.astype(jnp.bfloat16)
            y = {k: np.asarray(f(s, h)) for k, (f, s) in runs.items()}
            np.testing.assert_allclose(y["after"], y["before"], rtol=2e-2, atol=2e-2)
            t = {}
            for k in ("before", "after", "before", "after"):  # interleaved: best of two medians
                f, s = runs[k]
                t[k] = min(t.get(k, np.inf), _median_s(f, s, h, n=args.repeats))
            print(
                f"{form:7s} rows {m:2d}: before [D,V] {t['before'] * 1e3:7.1f} ms  after [V,D] "
                f"{t['after'] * 1e3:7.1f} ms  speed-up {t['before'] / t['after']:4.2f}x  "
                f"max |diff| {np.abs(y['after'] - y['before']).max():.1e}",
                flush=True,
            )
        del before, after, runs


if __name__ == "__main__":
    main()
