"""Gated DeltaNet kernels: the chunked delta rule equals a token-by-token float64 numpy
evaluation of the recurrence (spec §9.2 step 8) from a non-zero state, across chunk boundaries."""

import numpy as np

from minicpmv_jax.v46.deltanet import chunk_delta_rule, l2norm, recurrent_delta_rule


def reference(q, k, v, g, beta, state):
    """Recurrence in float64: S <- e^g S; u = beta (v - S^T k); S <- S + k u^T; o = S^T q."""
    q, k, v, g, beta, s = (np.asarray(a, np.float64) for a in (q, k, v, g, beta, state))
    b, t, h, _ = k.shape
    out = np.zeros((b, t, h, v.shape[-1]))
    for i in range(t):
        s = s * np.exp(g[:, i])[..., None, None]
        u = beta[:, i][..., None] * (v[:, i] - np.einsum("bhkv,bhk->bhv", s, k[:, i]))
        s = s + k[:, i][..., :, None] * u[..., None, :]
        out[:, i] = np.einsum("bhkv,bhk->bhv", s, q[:, i])
    return out, s


def test_chunked_and_recurrent_equal_the_recurrence():
    rng = np.random.default_rng(0)
    b, t, h, dk, dv = 2, 37, 3, 8, 5
    q = np.asarray(l2norm(rng.normal(size=(b, t, h, dk)).astype(np.float32))) * dk**-0.5
    k = np.asarray(l2norm(rng.normal(size=(b, t, h, dk)).astype(np.float32)))
    v = rng.normal(size=(b, t, h, dv)).astype(np.float32)
    g = -rng.uniform(0.01, 1.0, size=(b, t, h)).astype(np.float32)
    beta = rng.uniform(0, 1, size=(b, t, h)).astype(np.float32)
    s0 = rng.normal(size=(b, h, dk, dv)).astype(np.float32)
    want_o, want_s = reference(q, k, v, g, beta, s0)
    o, s = chunk_delta_rule(q, k, v, g, beta, s0, chunk=16)  # 3 chunks, the last one padded
    np.testing.assert_allclose(np.asarray(o), want_o, atol=1e-4)
    np.testing.assert_allclose(np.asarray(s), want_s, atol=1e-4)
    o1, s1 = recurrent_delta_rule(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0)
    want_o1, want_s1 = reference(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], s0)
    np.testing.assert_allclose(np.asarray(o1), want_o1[:, 0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(s1), want_s1, atol=1e-5)


def test_unit_lower_inverse_and_no_lapack_call():
    """(I + A)^-1 equals numpy's inverse, and the chunked rule compiles to no LAPACK custom call
    (`triangular_solve` on CPU is jaxlib's batched trsm, which deadlocked a release-size prefill)."""
    import jax

    from minicpmv_jax.v46.deltanet import unit_lower_inverse

    rng = np.random.default_rng(1)
    a = np.tril(rng.uniform(-1, 1, size=(3, 2, 16, 16)), -1).astype(np.float32)
    want = np.linalg.inv(np.eye(16) + a.astype(np.float64))
    np.testing.assert_allclose(np.asarray(unit_lower_inverse(a)), want, rtol=1e-4, atol=1e-4)
    x = np.zeros((1, 40, 2, 8), np.float32)
    g = np.zeros((1, 40, 2), np.float32)
    hlo = (
        jax.jit(chunk_delta_rule, static_argnums=6)
        .lower(x, x, x, g, g, np.zeros((1, 2, 8, 8), np.float32), 16)
        .as_text()
    )
    assert "custom_call" not in hlo and "lapack" not in hlo
