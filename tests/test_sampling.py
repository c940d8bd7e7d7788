"""Logits processors and beam search against the golden decoding-strategy fixtures (no model)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, VERSIONS, load_case

from minicpmv_jax import sampling
from minicpmv_jax.settings import GenerationSettings

BEAM_CASES = [
    (v, c)
    for v in VERSIONS
    for c in sorted((FIXTURES / v / "cases").iterdir())
    if c.name.startswith("beam_default")
]
REP_CASES = [(v, FIXTURES / v / "cases" / "greedy_rep_penalty") for v in VERSIONS]


def _ids(param):
    return f"{param[0]}/{param[1].name}"


def _terminators(case: dict) -> tuple[int, ...]:
    return tuple(case["case"]["generate_kwargs"]["eos_token_id"])


@pytest.mark.parametrize("param", REP_CASES, ids=_ids)
def test_greedy_repetition_penalty_scores(param):
    """step_logits -> step_scores (penalty over the generated ids only); argmax = generated_ids."""
    case = load_case(param[1])
    llm = case["llm"]
    logits, want_scores = llm["step_logits"][0], llm["step_scores"][0]
    ids = llm["generated_ids"][0]
    penalty = case["case"]["chat_kwargs"]["repetition_penalty"]
    params = sampling.SamplingParams.create(repetition_penalty=penalty)
    mode = sampling.DecodeMode()
    terms = _terminators(case)
    state = sampling.SampleState.init(1, len(ids), logits.shape[-1], jax.random.key(0))
    for t in range(len(ids)):
        scores = sampling.process_logits(
            jnp.asarray(logits[t : t + 1]), state.presence, state.step, params, terms
        )
        np.testing.assert_allclose(np.asarray(scores[0]), want_scores[t], rtol=0, atol=1e-6)
        state = sampling.sample_step(state, jnp.asarray(logits[t : t + 1]), mode, params, terms)
        assert int(state.tokens[0, t]) == ids[t]
    assert int(state.length[0]) == len(ids)


def _fake_forward(step_logits):
    """A model whose step s returns the recorded logits of the running beams (best first)."""
    table = jnp.asarray(step_logits)  # [S, N, V]

    def forward(carry, tokens, parent, step):
        del tokens, parent
        return carry + 1, table[step][None]

    return forward


@pytest.mark.parametrize("param", BEAM_CASES, ids=_ids)
def test_beam_search_replays_fixture(param):
    case = load_case(param[1])
    llm, info = case["llm"], case["case"]
    step_logits = llm["beam_step_logits"][0]  # [S, N, V]
    n = step_logits.shape[1]
    max_new = info["chat_kwargs"]["max_new_tokens"]
    params = sampling.SamplingParams.create(
        repetition_penalty=info["chat_kwargs"]["repetition_penalty"]
    )
    run = jax.jit(
        lambda first: sampling.beam_search(
            _fake_forward(step_logits),
            jnp.zeros((), jnp.int32),
            first,
            num_beams=n,
            max_new=max_new,
            params=params,
            terminators=_terminators(case),
        )
    )
    state, forwards = run(jnp.asarray(step_logits[0, :1]))
    tokens, length, score, beams = (np.asarray(x)[0] for x in sampling.beam_result(state))
    want = llm["generated_ids"][0]
    assert int(length) == len(want)
    np.testing.assert_array_equal(tokens[: len(want)], want)
    np.testing.assert_array_equal(beams[: len(want)], llm["beam_indices"][0])
    np.testing.assert_allclose(score, llm["sequences_scores"][0], atol=1e-5)
    assert int(state.step) == info["decoding"]["num_steps"] == step_logits.shape[0]
    assert int(forwards) == int(state.step) - 1  # step 0 uses the prompt logits


@pytest.mark.parametrize("param", BEAM_CASES, ids=_ids)
def test_beam_scores_are_penalised_log_softmax(param):
    """log_softmax + penalty over each running beam's history = beam_step_scores."""
    case = load_case(param[1])
    llm, info = case["llm"], case["case"]
    step_logits, want = llm["beam_step_logits"][0], llm["beam_step_scores"][0]
    n, v = step_logits.shape[1:]
    params = sampling.SamplingParams.create(
        repetition_penalty=info["chat_kwargs"]["repetition_penalty"]
    )
    state = sampling.BeamState.init(1, n, info["chat_kwargs"]["max_new_tokens"], v)
    for s in range(step_logits.shape[0]):
        got = sampling.beam_scores(
            jnp.asarray(step_logits[s]), state.presence[0], state.step, params, _terminators(case)
        )
        np.testing.assert_allclose(np.asarray(got), want[s], atol=2e-5)
        state = sampling.beam_step(
            state, jnp.asarray(step_logits[s][None]), params, _terminators(case), 10**6
        )


def test_top_k_top_p_match_transformers_semantics():
    x = jnp.asarray([[3.0, 1.0, 2.0, 0.0, 2.0, -1.0]])
    params = sampling.SamplingParams.create(top_k=2)
    got = np.asarray(sampling.warp_for_sampling(x, params))
    # k=2: the second largest is 2.0, and both tokens tied at 2.0 are kept (scores < kth removed)
    np.testing.assert_array_equal(np.isfinite(got[0]), [True, False, True, False, True, False])
    # top-p: probabilities of [2, 1, 0] -> 0.665, 0.245, 0.09; p = 0.7 keeps two tokens
    y = jnp.log(jnp.asarray([[0.09, 0.665, 0.245]]))
    got = np.asarray(sampling.warp_for_sampling(y, sampling.SamplingParams.create(top_p=0.7)))
    np.testing.assert_array_equal(np.isfinite(got[0]), [False, True, True])
    # a tiny p still keeps the most likely token (min_tokens_to_keep = 1)
    got = np.asarray(sampling.warp_for_sampling(y, sampling.SamplingParams.create(top_p=1e-6)))
    np.testing.assert_array_equal(np.isfinite(got[0]), [False, True, False])
    # temperature scales the kept scores
    got = np.asarray(sampling.warp_for_sampling(y, sampling.SamplingParams.create(temperature=0.5)))
    np.testing.assert_allclose(got, np.asarray(y) / 0.5, rtol=1e-6)


SAMPLING = FIXTURES / "sampling"
SAMPLING_CASES = json.loads((SAMPLING / "cases.json").read_text())


def _settings(case: dict) -> dict:
    """filtered_logprobs keywords of a fixture settings row (None = processor not used)."""
    eff = case["effective"]
    kw = {k: eff[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")}
    return dict(kw, min_p=eff["min_p"], min_new_tokens=eff["min_new_tokens"])


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=lambda c: c["name"])
def test_filtered_logprobs_match_transformers(case):
    """transformers' logits processors + log_softmax: same kept set, values within 1e-4."""
    with np.load(SAMPLING / f"{case['name']}.npz") as z:
        logits, history, want = z["logits"], z["history"], z["logprobs"]
    got = np.asarray(
        sampling.filtered_logprobs(
            logits, history, eos_token_id=case["eos_token_id"], **_settings(case)
        )
    )
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    kept = np.isfinite(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=0, atol=1e-4)


@functools.cache
def _draw(n: int, rows: int = 200):
    """The on-device sampler (``sample_step``, as the decode loop runs it) drawing n tokens.

    A ``lax.scan`` carries the PRNG key from step to step as the decode loop does; each step
    samples ``rows`` copies of the row at once (n // rows steps), which keeps the per-step sort
    small: one [n, V] sort costs about four times as much CPU on XLA as the same rows in blocks.
    """
    assert n % rows == 0, (n, rows)

    @functools.partial(jax.jit, static_argnames="terminators")
    def draw(logits, presence, step, params, key, terminators):
        v = logits.shape[-1]
        mode = sampling.DecodeMode(do_sample=True)
        logits = jnp.broadcast_to(logits, (rows, v))

        def one_step(key, _):
            state = sampling.SampleState.init(rows, 1, v, key)
            state = state.replace(presence=jnp.broadcast_to(presence, (rows, v)), step=step)
            state = sampling.sample_step(state, logits, mode, params, terminators)
            return state.key, state.tokens[:, step]

        return jax.lax.scan(one_step, key, length=n // rows)[1].reshape(n)

    return draw


def tv_bound(p: np.ndarray, n: int, delta: float) -> float:
    """A bound the empirical total variation of n iid draws from p exceeds with prob. <= delta.

    TV = 1/2 sum_i |f_i - p_i| for the empirical frequencies f. By Jensen,
    E|f_i - p_i| <= sqrt(Var f_i) = sqrt(p_i (1 - p_i) / n), so E[TV] <= 1/2 sum_i that. TV is a
    function of the n independent draws that changes by at most 1/n when one draw changes, so
    McDiarmid's inequality gives P(TV >= E[TV] + t) <= exp(-2 n t^2); t = sqrt(ln(1/delta) / 2n).
    """
    return 0.5 * float(np.sum(np.sqrt(p * (1 - p) / n))) + float(
        np.sqrt(np.log(1 / delta) / (2 * n))
    )


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=lambda c: c["name"])
def test_sampler_draws_from_filtered_logprobs(case):
    """20k draws per row through the real sampler: nothing outside the kept set, and total
    variation from exp(filtered_logprobs) within ``tv_bound`` (delta 1e-9 per row: all 32 rows
    of the suite pass with probability > 1 - 4e-8 when the sampler is right)."""
    n, delta = 20_000, 1e-9
    with np.load(SAMPLING / f"{case['name']}.npz") as z:
        logits, history = z["logits"], z["history"]
    settings = _settings(case)
    terms = tuple(case["eos_token_id"])
    logp = np.asarray(
        sampling.filtered_logprobs(logits, history, eos_token_id=terms, **settings), np.float64
    )
    params = sampling.SamplingParams.create(
        **dict(
            settings, min_p=settings["min_p"] or 0.0, min_new_tokens=settings["min_new_tokens"] or 0
        )
    )
    v = logits.shape[-1]
    for r in range(len(logits)):
        seen = history[r][history[r] >= 0]
        presence = jnp.zeros((1, v), bool).at[0, seen].set(True)
        key = jax.random.key(1000 + r)
        tok = np.asarray(_draw(n)(logits[r : r + 1], presence, len(seen), params, key, terms))
        freq = np.bincount(tok, minlength=v) / n
        p = np.exp(logp[r])
        assert not freq[~np.isfinite(logp[r])].any(), f"row {r}: drew a filtered token"
        tv = 0.5 * np.abs(freq - p).sum()
        bound = tv_bound(p, n, delta)
        assert tv <= bound, f"{case['name']} row {r}: total variation {tv:.4f} > {bound:.4f}"
        # the bound is tight enough to matter: the unfiltered softmax would be rejected
        if case["name"] == "official_2_6":
            raw = np.exp(logits[r] - logits[r].max())
            assert 0.5 * np.abs(freq - raw / raw.sum()).sum() > bound


def test_min_new_tokens_suppresses_terminators():
    logits = jnp.asarray([[0.0, 5.0, 1.0]])
    params = sampling.SamplingParams.create(min_new_tokens=2)
    mode = sampling.DecodeMode()
    state = sampling.SampleState.init(1, 4, 3, jax.random.key(0))
    for want in (2, 2, 1):
        state = sampling.sample_step(state, logits, mode, params, (1,))
        assert int(state.tokens[0, state.step - 1]) == want
    assert not bool(state.alive[0]) and int(state.length[0]) == 3


def test_finished_rows_emit_pad_and_stop():
    logits = jnp.asarray([[0.0, 5.0, 1.0], [0.0, 1.0, 5.0]])
    params = sampling.SamplingParams.create()
    state = sampling.SampleState.init(2, 3, 3, jax.random.key(0))
    for _ in range(3):
        state = sampling.sample_step(state, logits, sampling.DecodeMode(), params, (1,))
    np.testing.assert_array_equal(np.asarray(state.tokens), [[1, 0, 0], [2, 2, 2]])
    np.testing.assert_array_equal(np.asarray(state.length), [1, 3])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"repetition_penalty": 0.0},
        {"min_new_tokens": -2},
    ],
)
def test_invalid_sampling_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GenerationSettings(max_new_tokens=4, do_sample=True, **kwargs)


def test_invalid_num_beams():
    with pytest.raises(ValueError, match="num_beams"):
        GenerationSettings(max_new_tokens=4, num_beams=0)


def test_beam_search_batch_rows_are_independent():
    """Two rows searched together give the same result as each alone (per-row finishing)."""
    cases = [load_case(c) for _, c in BEAM_CASES if "2_6" in str(c)]
    assert len(cases) == 2
    tables = [c["llm"]["beam_step_logits"][0] for c in cases]
    s = max(t.shape[0] for t in tables)
    tables = [np.concatenate([t, np.repeat(t[-1:], s - t.shape[0], 0)]) for t in tables]
    table = jnp.asarray(np.stack(tables))  # [B, S, N, V]
    terms = _terminators(cases[0])
    params = sampling.SamplingParams.create(repetition_penalty=1.2)

    def forward(carry, tokens, parent, step):
        return carry, table[:, step]

    state, _ = sampling.beam_search(
        forward, 0, table[:, 0, 0], num_beams=3, max_new=16, params=params, terminators=terms
    )
    tokens, length, _, _ = sampling.beam_result(state)
    for row, c in enumerate(cases):
        want = c["llm"]["generated_ids"][0]
        assert int(length[row]) == len(want)
        np.testing.assert_array_equal(np.asarray(tokens[row, : len(want)]), want)


def _two_terminator_search(early_stopping, length_penalty=1.0):
    """V=8, terminators (6, 7) most likely at step 0; other tokens far less likely."""
    logits = jnp.asarray([[5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0, 10.0]])

    def forward(carry, tokens, parent, step):
        return carry, jnp.broadcast_to(logits[:, None], (1, 2, 8))

    params = sampling.SamplingParams.create(length_penalty=length_penalty)
    state, _ = sampling.beam_search(
        forward, 0, logits, num_beams=2, max_new=16, params=params, terminators=(6, 7),
        early_stopping=early_stopping,
    )  # fmt: skip
    return state


def test_beam_early_stop_heuristic():
    """Both finished hypotheses (-0.69) beat the best running beam (-5.7 / 1): stop at step 1
    (early_stopping=False); "never" with length_penalty > 0 divides by max_length and goes on."""
    state = _two_terminator_search(False)
    assert int(state.step) == 1
    tokens, length, score, _ = sampling.beam_result(state)
    assert int(length[0]) == 1 and int(tokens[0, 0]) == 6
    np.testing.assert_allclose(
        float(score[0]), np.log(np.exp(10) / (2 * np.exp(10) + np.exp(5) + 5)), rtol=1e-5
    )
    assert int(_two_terminator_search(True).step) == 1  # all num_beams finished
    assert int(_two_terminator_search("never").step) > 1
    assert int(_two_terminator_search("never", length_penalty=-1.0).step) == 1
