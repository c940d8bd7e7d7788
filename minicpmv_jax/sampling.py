"""Logits processors, token selection and beam search, all in jnp (jit / lax.while_loop safe).

Everything here mirrors transformers' generation utilities (the numerical reference of the
official MiniCPM-V ``chat()``), in particular:

* ``RepetitionPenaltyLogitsProcessor``: the "sequence" it sees holds only the NEW tokens, because
  the official ``chat()`` hands the prompt to ``generate()`` as ``inputs_embeds`` (its input_ids
  are empty). Greedy search applies it to raw logits; beam search applies it to log-probabilities.
* ``MinNewTokensLengthLogitsProcessor``: terminators get ``-inf`` while fewer than
  ``min_new_tokens`` tokens were generated.
* ``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper`` ->
  ``MinPLogitsWarper`` (in that order, ``min_tokens_to_keep=1``), then ``multinomial`` sampling.
  ``filtered_logprobs`` returns the log-probabilities of that draw, computed by the same code.
* ``GenerationMixin._beam_search`` (transformers >= 4.50, vectorised): ``K = max(2, 1 + n_eos) *
  num_beams`` candidates per step, a finished-hypothesis list of ``num_beams`` entries, the
  ``early_stopping`` rules and ``length_penalty``.

Shapes: B batch rows (conversations), N beams, V vocabulary, M = max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# transformers marks impossible beam entries by adding -1e9 (not -inf) in float32; we do the same
# so that the ranking, including ties at the -1e9 plateau, behaves identically.
NEG = -1.0e9


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeMode:
    """Static (hashable) part of the decoding settings: one compiled decode loop per value.

    The numeric knobs (temperature, top-k, top-p, penalties) live in ``SamplingParams`` and are
    traced, so changing them never recompiles. Both are derived from a validated
    ``settings.GenerationSettings`` and do not check their values again.
    """

    do_sample: bool = False
    num_beams: int = 1
    # transformers' ``early_stopping``: False (heuristic), True (stop at num_beams finished) or
    # "never" (heuristic with the best possible length).
    early_stopping: bool | str = False


@flax.struct.dataclass
class SamplingParams:
    """Traced decoding numbers (float32 / int32 scalars)."""

    temperature: jax.Array  # > 0; 1.0 = off
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # (0, 1]; 1.0 = off
    repetition_penalty: jax.Array  # > 0; 1.0 = off
    min_new_tokens: jax.Array  # int32, 0 = off
    length_penalty: jax.Array  # beam search only
    min_p: jax.Array  # [0, 1]; 0.0 = off

    @classmethod
    def create(
        cls,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        min_new_tokens: int = 0,
        length_penalty: float = 1.0,
        min_p: float = 0.0,
    ) -> SamplingParams:
        f32, i32 = jnp.float32, jnp.int32
        return cls(
            temperature=jnp.asarray(temperature, f32),
            top_k=jnp.asarray(top_k, i32),
            top_p=jnp.asarray(top_p, f32),
            repetition_penalty=jnp.asarray(repetition_penalty, f32),
            min_new_tokens=jnp.asarray(min_new_tokens, i32),
            length_penalty=jnp.asarray(length_penalty, f32),
            min_p=jnp.asarray(min_p, f32),
        )


def check_sampling_values(
    *, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, min_new_tokens=0, min_p=0.0
) -> None:
    """Raise ValueError on values transformers would reject (checked in Python, before tracing)."""
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if int(top_k) < 0 or int(top_k) != top_k:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not float(repetition_penalty) > 0.0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if int(min_new_tokens) < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    if not 0.0 <= float(min_p) <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {min_p}")


# --------------------------------------------------------------------------------------------
# Logits processors
# --------------------------------------------------------------------------------------------


def add_tokens(presence: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mark ``tokens`` in a token-history mask.

    Args:
      presence: bool [R, V], True where the token already occurs in row r's new tokens.
      tokens: int [R], one new token per row.
    """
    rows = jnp.arange(presence.shape[0])
    return presence.at[rows, tokens].set(True)


def apply_repetition_penalty(scores: jax.Array, presence: jax.Array, penalty) -> jax.Array:
    """transformers ``RepetitionPenaltyLogitsProcessor`` over the generated tokens only.

    Each distinct id already generated: ``score * penalty`` if score < 0 else ``score / penalty``.

    Args:
      scores: float32 [R, V]; presence: bool [R, V]; penalty: scalar (1.0 = no-op).
    """
    penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(presence, penalised, scores)


def suppress_terminators(scores: jax.Array, terminators, active) -> jax.Array:
    """transformers ``MinNewTokensLengthLogitsProcessor``: terminators -> -inf while ``active``.

    Args:
      scores: float32 [R, V]; terminators: tuple of ids; active: bool scalar or [R].
    """
    is_term = jnp.isin(jnp.arange(scores.shape[-1]), jnp.asarray(terminators, jnp.int32))
    active = jnp.asarray(active).reshape(-1, 1)
    return jnp.where(active & is_term[None, :], -jnp.inf, scores)


def warp_for_sampling(scores: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature, top-k, top-p, then min-p (transformers' warper order), min_tokens_to_keep=1.

    Removed tokens get -inf. Top-k keeps every token whose score ties the k-th largest
    (``scores < topk[..., -1]`` is removed, as in ``TopKLogitsWarper``). Top-p sorts ascending,
    removes the prefix whose cumulative probability is ``<= 1 - top_p`` and always keeps the most
    likely token (``TopPLogitsWarper``); we remove by threshold value instead of by scattered sort
    position, which only differs for exact ties at the cut. Min-p removes tokens whose probability
    (after the others) is below ``min_p`` times the largest one (``MinPLogitsWarper``).

    Args:
      scores: float32 [R, V] (already repetition-penalised).
    """
    v = scores.shape[-1]
    x = scores / params.temperature
    asc = jnp.sort(x, axis=-1)  # [R, V] ascending
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, v), v)
    kth = asc[:, v - k][:, None]  # [R, 1] k-th largest (k = V: the smallest -> keeps all)
    asc = jnp.where(asc < kth, -jnp.inf, asc)
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    remove_sorted = cum <= 1.0 - params.top_p
    remove_sorted = remove_sorted.at[:, -1].set(False)  # min_tokens_to_keep = 1
    # cum is non-decreasing, so the removed entries form a prefix; the first kept is the threshold
    first_kept = jnp.sum(remove_sorted, axis=-1)
    thr = jnp.take_along_axis(asc, first_kept[:, None], axis=-1)  # [R, 1]
    x = jnp.where((x < kth) | (x < thr), -jnp.inf, x)
    probs = jax.nn.softmax(x, axis=-1)
    return jnp.where(probs < params.min_p * probs.max(axis=-1, keepdims=True), -jnp.inf, x)


def process_logits(
    logits: jax.Array,
    presence: jax.Array,
    step,
    params: SamplingParams,
    terminators: tuple[int, ...],
) -> jax.Array:
    """Greedy / sampling logits processors in transformers' order: repetition penalty, min new.

    Args:
      logits: [R, V] raw LLM logits; presence: bool [R, V]; step: number of tokens generated so far.
    Returns:
      float32 [R, V] scores (the ``step_scores`` of the golden fixtures).
    """
    scores = apply_repetition_penalty(
        logits.astype(jnp.float32), presence, params.repetition_penalty
    )
    return suppress_terminators(scores, terminators, step < params.min_new_tokens)


def history_presence(history: jax.Array, vocab: int) -> jax.Array:
    """bool [R, V] token-history mask of int [R, H] ids (-1 = padding)."""
    rows = jnp.arange(history.shape[0])[:, None]
    ids = jnp.where(history >= 0, history, vocab)  # padding -> a dropped out-of-range index
    return jnp.zeros((history.shape[0], vocab), bool).at[rows, ids].set(True, mode="drop")


@functools.partial(jax.jit, static_argnames="terminators")
def _filtered_logprobs(logits, history, params, terminators):
    presence = history_presence(history, logits.shape[-1])
    step = jnp.sum(history >= 0, axis=-1)  # [R] tokens generated so far
    scores = process_logits(logits, presence, step, params, terminators)
    return jax.nn.log_softmax(warp_for_sampling(scores, params), axis=-1)


def filtered_logprobs(
    logits,
    history,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    min_new_tokens: int | None = None,
    eos_token_id: int | Sequence[int] = (),
) -> jax.Array:
    """The log-probabilities a sampling step draws its token from (-inf where filtered).

    transformers' logits processors in their order (repetition penalty, min new tokens,
    temperature, top-k, top-p, min-p), then log_softmax: exactly what ``sample_step`` draws from,
    by the same functions (``process_logits`` + ``warp_for_sampling``).

    Args:
      logits: float [B, V] raw next-token logits.
      history: int [B, H] the ids generated so far per row (the repetition penalty and
        min_new_tokens see only new tokens, as in the official chat()), -1 = padding.
      top_k / top_p / min_p / min_new_tokens: 0, 1.0, None, None (or 0) disable them.
      eos_token_id: the terminator id(s) min_new_tokens suppresses.
    Returns:
      float32 [B, V].
    """
    values = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "min_new_tokens": min_new_tokens or 0,
        "min_p": min_p or 0.0,
    }
    check_sampling_values(**values)
    params = SamplingParams.create(**values)
    eos = (eos_token_id,) if isinstance(eos_token_id, (int, np.integer)) else eos_token_id
    logits = jnp.asarray(logits, jnp.float32)
    history = jnp.asarray(history, jnp.int32).reshape(logits.shape[0], -1)
    return _filtered_logprobs(logits, history, params, tuple(int(t) for t in eos))


def select_tokens(scores: jax.Array, mode: DecodeMode, params: SamplingParams, key) -> jax.Array:
    """Greedy argmax (first maximum, like torch.argmax) or a multinomial draw. -> int32 [R]."""
    if not mode.do_sample:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warp_for_sampling(scores, params), axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Greedy / sampling state (one sequence per row)
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class SampleState:
    """Per-row decoding state of greedy search / sampling.

    tokens: int32 [B, M] new tokens (pad 0 after a row finished, as transformers pads).
    presence: bool [B, V] token history for the repetition penalty.
    length: int32 [B] new tokens of each row, terminator included.
    alive: bool [B] row has not produced a terminator.
    step: int32 [] tokens selected so far (all rows).
    key: PRNG key.
    """

    tokens: jax.Array
    presence: jax.Array
    length: jax.Array
    alive: jax.Array
    step: jax.Array
    key: jax.Array

    @classmethod
    def init(cls, batch: int, max_new: int, vocab: int, key) -> SampleState:
        return cls(
            tokens=jnp.zeros((batch, max_new), jnp.int32),
            presence=jnp.zeros((batch, vocab), bool),
            length=jnp.zeros((batch,), jnp.int32),
            alive=jnp.ones((batch,), bool),
            step=jnp.zeros((), jnp.int32),
            key=key,
        )

    def last_tokens(self) -> jax.Array:
        """int32 [B]: the token fed to the next forward pass."""
        return jax.lax.dynamic_index_in_dim(self.tokens, self.step - 1, axis=1, keepdims=False)

    def done(self, max_new: int) -> jax.Array:
        return (self.step >= max_new) | ~jnp.any(self.alive)


def sample_step(
    state: SampleState,
    logits: jax.Array,
    mode: DecodeMode,
    params: SamplingParams,
    terminators: tuple[int, ...],
    pad_id: int = 0,
) -> SampleState:
    """One greedy / sampling step (transformers ``_sample``). logits: [B, V] raw."""
    key, sub = jax.random.split(state.key)
    scores = process_logits(logits, state.presence, state.step, params, terminators)
    tok = select_tokens(scores, mode, params, sub)
    # transformers: finished rows emit pad_token_id (chat() passes 0) and never restart
    tok = jnp.where(state.alive, tok, pad_id)
    hit = jnp.isin(tok, jnp.asarray(terminators, jnp.int32))
    return state.replace(
        tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, tok[:, None], state.step, axis=1),
        presence=add_tokens(state.presence, tok),
        length=state.length + state.alive.astype(jnp.int32),
        alive=state.alive & ~hit,
        step=state.step + 1,
        key=key,
    )


# --------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class BeamState:
    """transformers ``_beam_search`` state for B rows of N beams (M = max_new_tokens).

    running_*: the N live beams, best first. ``running_beams[b, n, t]`` is the beam (row of step t)
    token t was chosen from (transformers' ``beam_indices`` without the batch offset).
    finished_*: the N best finished hypotheses (``beam_scores`` / ``is_sent_finished``), scores
    already divided by ``length ** length_penalty``; unused entries hold score -1e9.
    heuristic_open: [B] transformers' ``is_early_stop_heuristic_unsatisfied``.
    parent: [B, N] beam of the previous step each running beam extends (for the KV cache reorder).
    last_hits: [B, K] candidates of the last step that hit a stopping criterion.
    """

    running_tokens: jax.Array  # int32 [B, N, M]
    running_scores: jax.Array  # float32 [B, N]
    running_beams: jax.Array  # int32 [B, N, M]
    presence: jax.Array  # bool [B, N, V]
    finished_tokens: jax.Array  # int32 [B, N, M]
    finished_scores: jax.Array  # float32 [B, N]
    finished_beams: jax.Array  # int32 [B, N, M]
    finished_length: jax.Array  # int32 [B, N]
    is_finished: jax.Array  # bool [B, N]
    heuristic_open: jax.Array  # bool [B]
    parent: jax.Array  # int32 [B, N]
    all_hit: jax.Array  # bool []: every candidate of the last step hit a stopping criterion
    step: jax.Array  # int32 []

    @classmethod
    def init(cls, batch: int, num_beams: int, max_new: int, vocab: int) -> BeamState:
        b, n, m = batch, num_beams, max_new
        # transformers: running scores 0 for beam 0 and -1e9 for the others, so step 0 expands
        # beam 0 only; finished scores start at -1e9
        running_scores = jnp.zeros((b, n), jnp.float32).at[:, 1:].set(NEG)
        return cls(
            running_tokens=jnp.zeros((b, n, m), jnp.int32),
            running_scores=running_scores,
            running_beams=jnp.full((b, n, m), -1, jnp.int32),
            presence=jnp.zeros((b, n, vocab), bool),
            finished_tokens=jnp.zeros((b, n, m), jnp.int32),
            finished_scores=jnp.full((b, n), NEG, jnp.float32),
            finished_beams=jnp.full((b, n, m), -1, jnp.int32),
            finished_length=jnp.zeros((b, n), jnp.int32),
            is_finished=jnp.zeros((b, n), bool),
            heuristic_open=jnp.ones((b,), bool),
            parent=jnp.zeros((b, n), jnp.int32),
            all_hit=jnp.zeros((), bool),
            step=jnp.zeros((), jnp.int32),
        )

    def last_tokens(self) -> jax.Array:
        """int32 [B, N]: the token each running beam feeds to the next forward pass."""
        return jax.lax.dynamic_index_in_dim(self.running_tokens, self.step - 1, 2, keepdims=False)

    def done(self, max_new: int, early_stopping: bool | str = False) -> jax.Array:
        """transformers ``_beam_search_has_unfinished_sequences`` negated (+ max length)."""
        improvement_possible = jnp.any(self.heuristic_open)
        open_beam = ~(jnp.all(self.is_finished) & (early_stopping is True))
        return (self.step >= max_new) | ~(improvement_possible & open_beam & ~self.all_hit)


def _gather_beams(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x: [B, N, ...], idx: int [B, K] -> [B, K, ...] (transformers ``_gather_beams``)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_scores(
    logits: jax.Array, presence: jax.Array, step, params: SamplingParams, terminators
) -> jax.Array:
    """What beam search ranks: log_softmax(logits) then the logits processors.

    The repetition penalty thus acts on log-probabilities (all <= 0: always multiplied), without
    renormalising (the fixtures' ``beam_step_scores``).

    Args:
      logits: [R, V] raw; presence: bool [R, V] -> float32 [R, V].
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return process_logits(logp, presence, step, params, terminators)


def beam_step(
    state: BeamState,
    logits: jax.Array,
    params: SamplingParams,
    terminators: tuple[int, ...],
    max_new: int,
    early_stopping: bool | str = False,
) -> BeamState:
    """One step of transformers' vectorised beam search.

    Args:
      state: search state after ``state.step`` tokens.
      logits: float [B, N, V] raw logits of the running beams (rows in ``state`` order).
      terminators: stop ids (EosTokenCriteria); reaching ``max_new`` tokens also finishes
        (MaxLengthCriteria: the prompt enters generate() as embeddings, so max_length = max_new).
    Returns:
      the new state; ``parent`` / ``last_tokens()`` give the cache reorder and the next inputs.
    """
    b, n, v = logits.shape
    k = max(2, 1 + len(terminators)) * n  # transformers' beams_to_keep
    step = state.step
    scores = beam_scores(
        logits.reshape(b * n, v), state.presence.reshape(b * n, v), step, params, terminators
    ).reshape(b, n, v)
    cand = (scores + state.running_scores[:, :, None]).reshape(b, n * v)
    top_scores, top_idx = jax.lax.top_k(cand, k)  # [B, K], best first (torch.topk)
    top_beam = (top_idx // v).astype(jnp.int32)
    top_tok = (top_idx % v).astype(jnp.int32)

    # candidate sequences (running history of their beam + the new token)
    cand_tokens = _gather_beams(state.running_tokens, top_beam)
    cand_tokens = jax.lax.dynamic_update_slice_in_dim(cand_tokens, top_tok[..., None], step, 2)
    cand_beams = _gather_beams(state.running_beams, top_beam)
    cand_beams = jax.lax.dynamic_update_slice_in_dim(cand_beams, top_beam[..., None], step, 2)
    hits = jnp.isin(top_tok, jnp.asarray(terminators, jnp.int32)) | (step + 1 >= max_new)

    # next running beams: the best N candidates that did not stop
    # (_get_running_beams_for_next_iteration)
    run_scores = top_scores + hits.astype(jnp.float32) * NEG
    _, keep = jax.lax.top_k(run_scores, n)  # [B, N]
    new_running_scores = jnp.take_along_axis(run_scores, keep, axis=1)
    new_parent = jnp.take_along_axis(top_beam, keep, axis=1)
    new_tok = jnp.take_along_axis(top_tok, keep, axis=1)
    presence = add_tokens(
        _gather_beams(state.presence, new_parent).reshape(b * n, v), new_tok.reshape(-1)
    ).reshape(b, n, v)

    # finished hypotheses (_update_finished_beams): only stopping candidates among the first N of
    # the K enter, scored by sum / length ** length_penalty; the N best are kept
    just_finished = hits & (jnp.arange(k) < n)[None, :]
    norm = top_scores / ((step + 1).astype(jnp.float32) ** params.length_penalty)
    full = jnp.all(state.is_finished, axis=-1, keepdims=True) & (early_stopping is True)
    norm = norm + full.astype(jnp.float32) * NEG
    norm = norm + (~state.heuristic_open[:, None]).astype(jnp.float32) * NEG
    norm = norm + (~just_finished).astype(jnp.float32) * NEG
    merged_scores = jnp.concatenate([state.finished_scores, norm], axis=1)  # [B, N + K]
    _, best = jax.lax.top_k(merged_scores, n)

    def merge(old, new):
        return _gather_beams(jnp.concatenate([old, new], axis=1), best)

    finished_length = merge(state.finished_length, jnp.full((b, k), step + 1, jnp.int32))
    is_finished = merge(state.is_finished, just_finished)
    finished_scores = jnp.take_along_axis(merged_scores, best, axis=1)

    # early-stop heuristic (_check_early_stop_heuristic), after cur_len += 1
    cur = (step + 1).astype(jnp.float32)
    if early_stopping == "never":  # best hypothetical length: max_length when lp > 0
        cur = jnp.where(params.length_penalty > 0, jnp.asarray(max_new, jnp.float32), cur)
    best_running = new_running_scores[:, :1] / cur**params.length_penalty
    worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
    heuristic_open = state.heuristic_open & jnp.any(best_running > worst, axis=-1)
    return BeamState(
        running_tokens=_gather_beams(cand_tokens, keep),
        running_scores=new_running_scores,
        running_beams=_gather_beams(cand_beams, keep),
        presence=presence,
        finished_tokens=merge(state.finished_tokens, cand_tokens),
        finished_scores=finished_scores,
        finished_beams=merge(state.finished_beams, cand_beams),
        finished_length=finished_length,
        is_finished=is_finished,
        heuristic_open=heuristic_open,
        parent=new_parent,
        all_hit=jnp.all(hits),
        step=step + 1,
    )


def beam_result(state: BeamState) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The returned (best finished) hypothesis of each row.

    Returns:
      tokens int32 [B, M] (pad 0 past ``length``), length int32 [B], score float32 [B]
      (transformers' ``sequences_scores``), beam_indices int32 [B, M] (-1 past ``length``).
    """
    m = state.finished_tokens.shape[-1]
    length = state.finished_length[:, 0]
    live = jnp.arange(m)[None, :] < length[:, None]
    tokens = jnp.where(live, state.finished_tokens[:, 0], 0)
    beams = jnp.where(live, state.finished_beams[:, 0], -1)
    return tokens, length, state.finished_scores[:, 0], beams


def beam_search(
    forward,
    carry,
    first_logits: jax.Array,
    *,
    num_beams: int,
    max_new: int,
    params: SamplingParams,
    terminators: tuple[int, ...],
    early_stopping: bool | str = False,
    buffer: int | None = None,
):
    """Full beam search in one ``lax.while_loop`` around a model step function.

    Args:
      forward: ``forward(carry, tokens [B, N], parent [B, N], step) -> (carry, logits [B, N, V])``
        runs the model on the running beams' last tokens after reordering its cache by ``parent``.
      carry: model state (e.g. the KV cache); first_logits: [B, V] logits of the prompt's last
        token (step 0 expands beam 0 only).
      max_new: maximum new tokens (may be traced); buffer: static token buffer length M >=
        max_new (default max_new, which must then be a Python int).
    Returns:
      (final BeamState, carry).
    """
    b, v = first_logits.shape
    logits0 = jnp.broadcast_to(first_logits[:, None, :], (b, num_beams, v))
    step_fn = lambda s, lg: beam_step(s, lg, params, terminators, max_new, early_stopping)
    state = step_fn(BeamState.init(b, num_beams, buffer or max_new, v), logits0)

    def cond(c):
        return ~c[0].done(max_new, early_stopping)

    def body(c):
        s, model_carry = c
        model_carry, logits = forward(model_carry, s.last_tokens(), s.parent, s.step)
        return step_fn(s, logits), model_carry

    state, carry = jax.lax.while_loop(cond, body, (state, carry))
    return state, carry
