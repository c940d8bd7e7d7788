"""Prefill and decode over a static KV cache: greedy, sampling and beam search.

One request = a list of conversations (each a ``ProcessorOutput``) run as one batch:

1. ``prepare_batch`` (host, numpy) right-pads the prompts to a token-length bucket and stacks the
   slices of all images of all conversations, padded to a slice bucket and a patch bucket.
2. ``prefill`` (one ``jax.jit`` per (batch, token bucket, slice bucket, patch bucket, cache length))
   runs the vision tower and resampler on every slice in one call, scatters the features at the
   ``image_bound`` rows, runs the LLM over the prompt and fills the KV cache (donated).
3. ``decode`` (one ``jax.jit`` per (batch, cache length, decode mode)) selects tokens inside a
   ``lax.while_loop``: no host round trip per token; it stops on ``max_new_tokens`` (traced), when
   every row produced a terminator, or, for beam search, by transformers' stopping rules.
   ``stream`` runs the same step function one token per call instead.

Shardings: every output the host reads (logits, tokens, lengths, scores, step logits, streaming
state) is replicated over the model's mesh (``out_shardings``), so each process of a multi-host
run can fetch it; the KV cache keeps its ``sharding.cache_shardings`` layout from call to call
(the buffer is donated and reused).

Static shapes: B rows, T = token bucket, S = T + M cache slots, M = decode bucket >= max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from minicpmv_jax import sampling
from minicpmv_jax.errors import MiniCPMVError, PromptTooLongError
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.sampling import DecodeMode, SamplingParams
from minicpmv_jax.sharding import cache_shardings, constrain_cache, make_mesh

log = logging.getLogger(__name__)

# How many times each jitted function was traced (= compiled for a new shape / static argument).
# Tests read it to check that requests inside existing buckets trigger no compilation.
TRACE_COUNTS: Counter = Counter()


class GenerationError(MiniCPMVError):
    """Invalid generation settings (sampling values, lengths, beam settings)."""


# ------------------------------------------------------------------------------------------------
# Buckets
# ------------------------------------------------------------------------------------------------


def _round_up(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; past the largest, the next multiple of the largest."""
    for b in buckets:
        if b >= n:
            return int(b)
    last = int(buckets[-1])
    return -(-n // last) * last


@dataclasses.dataclass(frozen=True, kw_only=True)
class Buckets:
    """Static shape buckets: each distinct combination compiles prefill / decode once.

    tokens: prompt length buckets (T). slices: number of image slices over the batch (I; 0 = text
    only, its own program). new_tokens: decode buffer M >= max_new_tokens (the cache holds T + M
    slots). max_cache_len: requests needing more cache slots raise ``PromptTooLongError``.
    """

    # powers of two with 1.5x steps from 256 on: a prompt pads by at most 50% (one 1344x1344 image
    # + a short question is ~710 tokens: 768, not 1024); 64 and 128 keep a short text question or
    # one small image from prefilling 256 tokens
    tokens: tuple[int, ...] = (
        64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384,
    )  # fmt: skip
    # 10 = one image fully sliced at max_slice_nums 9 (source + 9): the common large-image case
    slices: tuple[int, ...] = (1, 2, 4, 8, 10, 16, 32, 64)
    new_tokens: tuple[int, ...] = (64, 256, 1024, 2048, 4096)
    max_cache_len: int = 40960

    def __post_init__(self):
        for name in ("tokens", "slices", "new_tokens"):
            v = getattr(self, name)
            if not v or any(b <= 0 for b in v) or list(v) != sorted(v):
                raise ValueError(f"Buckets.{name} must be increasing positive ints, got {v}")

    def token_bucket(self, n: int) -> int:
        return _round_up(n, self.tokens)

    def slice_bucket(self, n: int) -> int:
        return 0 if n == 0 else _round_up(n, self.slices)

    def new_token_bucket(self, n: int) -> int:
        return _round_up(n, self.new_tokens)


# ------------------------------------------------------------------------------------------------
# Host-side batch preparation
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedBatch:
    """Device-ready arrays of one request (numpy; shapes static per bucket).

    input_ids int32 [B, T]; token_valid bool [B, T] (attended prompt tokens); positions int32
    [B, T]; last_index int32 [B] (row's last prompt token); next_position int32 [B] (RoPE
    position of the first new token); image_slot int32 [B, T] (row into the [G * Q] features, -1 =
    text); vision: dict of [I, ...] arrays or None (text only); lengths: true prompt lengths.
    """

    input_ids: np.ndarray
    token_valid: np.ndarray
    positions: np.ndarray
    last_index: np.ndarray
    next_position: np.ndarray
    image_slot: np.ndarray
    vision: dict[str, np.ndarray] | None
    lengths: list[int]

    @property
    def shape_key(self) -> tuple:
        v = self.vision
        return self.input_ids.shape + ((0, 0) if v is None else v["pixel_patches"].shape[:2])


def prepare_batch(outputs: Sequence[Any], buckets: Buckets, query_num: int) -> PreparedBatch:
    """Stack processor outputs of several conversations into one padded batch.

    Prompts are right-padded to the token bucket (pad slots are never attended, positions are
    per row, so the padding changes no logits). Slices of all conversations are concatenated in
    order and padded to the slice bucket with all-invalid slices (group -1) and to the largest
    patch bucket of the batch. Each conversation keeps its own vision mask and position ids, so a
    batched conversation sees exactly what it sees alone (for 2.5 this deliberately differs from
    the official batched call, whose mask and strip positions span every slice of the batch).
    """
    from minicpmv_jax.model import image_slot_from_bounds, prompt_positions

    b = len(outputs)
    lengths = [int(np.asarray(o["input_ids"]).shape[-1]) for o in outputs]
    t = buckets.token_bucket(max(lengths))
    ids = np.zeros((b, t), np.int32)
    valid = np.zeros((b, t), bool)
    pos = np.zeros((b, t), np.int32)
    slot = np.full((b, t), -1, np.int32)
    next_pos = np.zeros((b,), np.int32)

    n_slices = [int(np.asarray(o["tgt_sizes"]).reshape(-1, 2).shape[0]) for o in outputs]
    total = sum(n_slices)
    i_pad = buckets.slice_bucket(total)
    group_offset = 0
    vision_parts = []
    for r, (o, n, ni) in enumerate(zip(outputs, lengths, n_slices, strict=True)):
        ids[r, :n] = np.asarray(o["input_ids"]).reshape(-1)
        mask = np.asarray(o["attention_mask"]).reshape(-1).astype(bool)
        valid[r, :n] = mask
        pos[r, :n] = prompt_positions(mask)
        next_pos[r] = int(mask.sum())  # cumsum over prompt + new token - 1
        groups = np.asarray(o["group_sizes"]).reshape(-1) if ni else np.zeros((0,), np.int64)
        if ni:
            row_slot = np.asarray(image_slot_from_bounds(o["image_bound"], n, query_num))
            slot[r, :n] = np.where(row_slot >= 0, row_slot + group_offset * query_num, -1)
            vision_parts.append((o, np.repeat(np.arange(len(groups)) + group_offset, groups)))
        group_offset += len(groups)

    vision = None
    if total:
        p = max(int(np.asarray(o["pixel_patches"]).shape[1]) for o, _ in vision_parts)

        def stack(name, fill, dtype, per_patch=True):
            parts = []
            for o, _ in vision_parts:
                x = np.asarray(o[name]).astype(dtype)
                if per_patch and x.shape[1] < p:  # [I, P, ...] arrays: pad P to the batch's
                    widths = [(0, 0), (0, p - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
                    x = np.pad(x, widths, constant_values=fill)
                parts.append(x)
            x = np.concatenate(parts, axis=0)
            pad = [(0, i_pad - total)] + [(0, 0)] * (x.ndim - 1)
            return np.pad(x, pad, constant_values=fill)

        vision = {
            "pixel_patches": stack("pixel_patches", 0, np.float32),
            "position_ids": stack("position_ids", 0, np.int32),
            "vision_mask": stack("vision_mask", False, bool),
            "patch_valid": stack("patch_valid", False, bool),
            # padding slices: a 1x1 grid
            "tgt_sizes": stack("tgt_sizes", 1, np.int32, per_patch=False),
            "temporal_ids": stack("temporal_ids", -1, np.int32, per_patch=False),
            "group_index": np.pad(
                np.concatenate([g for _, g in vision_parts]).astype(np.int32),
                (0, i_pad - total),
                constant_values=-1,
            ),
        }
        # padding slices attend one (zero) key so their softmax stays finite; they are dropped
        vision["vision_mask"][total:, 0] = True
    last = np.asarray(lengths, np.int32) - 1
    return PreparedBatch(ids, valid, pos, last, next_pos, slot, vision, lengths)


def _placeholder_batch(b: int, n: int, t: int, i: int, p: int, config) -> PreparedBatch:
    """Zeros with the exact shapes and dtypes ``prepare_batch`` gives a request of b rows, n
    prompt tokens (bucket t), i padded slices of p patches (i = 0: text only)."""
    valid = np.zeros((b, t), bool)
    valid[:, :n] = True
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    vision = None
    if i:
        mask = np.zeros((i, p), bool)
        mask[:, 0] = True  # every slice attends one key: finite softmax
        vision = {
            "pixel_patches": np.zeros((i, p, config.vision.patch_dim), np.float32),
            "position_ids": np.zeros((i, p), np.int32),
            "vision_mask": mask,
            "patch_valid": mask.copy(),
            "tgt_sizes": np.ones((i, 2), np.int32),
            "temporal_ids": np.full((i,), -1, np.int32),
            "group_index": np.arange(i, dtype=np.int32),
        }
    return PreparedBatch(
        input_ids=np.zeros((b, t), np.int32),
        token_valid=valid,
        positions=positions,
        last_index=np.full((b,), n - 1, np.int32),
        next_position=np.full((b,), n, np.int32),
        image_slot=np.full((b, t), -1, np.int32),
        vision=vision,
        lengths=[n] * b,
    )


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationOutput:
    """What one ``Generator.run`` produced.

    sequences: new token ids per conversation (terminator last when one was produced).
    step_logits: float32 [B, M, V] raw logits of each greedy / sampling step (record_logits only).
    scores / beam_indices: beam search's ``sequences_scores`` and ``beam_indices`` per row.
    num_steps: decoding steps run (beam search: transformers' loop iterations).
    timings: seconds spent in ``prefill`` and ``decode`` (blocking), ``compile`` when traced.
    """

    sequences: list[np.ndarray]
    step_logits: np.ndarray | None = None
    scores: np.ndarray | None = None
    beam_indices: list[np.ndarray] | None = None
    num_steps: int = 0
    prompt_tokens: list[int] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """Validated decoding settings of one request (transformers' names)."""

    max_new_tokens: int
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    min_p: float = 0.0
    seed: int | None = None  # None: fresh randomness for every call; an int: reproducible

    def __post_init__(self):
        for name in ("max_new_tokens", "num_beams", "top_k", "min_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise GenerationError(f"{name} must be an integer, got {value!r}")
        seed = self.seed
        if seed is not None and (
            isinstance(seed, bool)
            or not isinstance(seed, (int, np.integer))
            or not 0 <= seed < 2**32
        ):
            raise GenerationError(f"seed must be an integer in [0, 2**32) or None, got {seed!r}")
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise GenerationError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise GenerationError("sampling with num_beams > 1 (beam sampling) is not supported")
        try:
            sampling.check_sampling_values(
                temperature=self.temperature if self.do_sample else 1.0,
                top_k=self.top_k,
                top_p=self.top_p,
                repetition_penalty=self.repetition_penalty,
                min_new_tokens=self.min_new_tokens,
                min_p=self.min_p,
            )
        except ValueError as e:
            raise GenerationError(str(e)) from None
        if self.early_stopping not in (False, True, "never"):
            raise GenerationError("early_stopping must be True, False or 'never'")

    @property
    def mode(self) -> DecodeMode:
        return DecodeMode(
            do_sample=self.do_sample, num_beams=self.num_beams, early_stopping=self.early_stopping
        )

    def params(self) -> SamplingParams:
        return SamplingParams.create(
            temperature=self.temperature if self.do_sample else 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            min_new_tokens=self.min_new_tokens,
            length_penalty=self.length_penalty,
            min_p=self.min_p,
        )

    def key(self) -> jax.Array:
        """The sampling PRNG key: the seed's, or one from fresh OS randomness when seed is None
        (as an unseeded transformers ``generate(do_sample=True)`` differs from call to call)."""
        return jax.random.key(secrets.randbits(32) if self.seed is None else self.seed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestShape:
    """What decides which programs a request compiles, for ``Generator.warmup``.

    batch: conversations in the request; prompt_tokens: the longest prompt (image placeholders
    included); slices: image slices over the whole batch (0 = text only); patches: the largest
    patch bucket among them (1024 for 448x448-scale slices, see ``processor.patch_buckets``);
    max_new_tokens, do_sample, num_beams, early_stopping: as in ``GenerationSettings``. Values
    inside the same buckets share programs. stream: the request is streamed token by token
    (``chat(stream=True)``, ``Generator.stream``), which runs per-token programs of its own.
    """

    batch: int = 1
    prompt_tokens: int = 64
    slices: int = 0
    patches: int = 1024
    max_new_tokens: int = 256
    do_sample: bool = False
    num_beams: int = 1
    early_stopping: bool | str = False
    stream: bool = False

    def __post_init__(self):
        for name in ("batch", "prompt_tokens", "patches", "max_new_tokens", "num_beams"):
            if int(getattr(self, name)) < 1:
                raise GenerationError(f"RequestShape.{name} must be >= 1, got {self}")
        if int(self.slices) < 0:
            raise GenerationError(f"RequestShape.slices must be >= 0, got {self}")
        if self.stream and self.num_beams > 1:
            raise GenerationError("RequestShape: streaming is not available with num_beams > 1")

    @classmethod
    def of(
        cls, outputs: Sequence[Any], settings: GenerationSettings, *, stream: bool = False
    ) -> RequestShape:
        """The shape of a request: processor outputs of its conversations + its settings."""
        patches = [int(np.asarray(o["pixel_patches"]).shape[1]) for o in outputs]
        return cls(
            batch=len(outputs),
            prompt_tokens=max(int(np.asarray(o["input_ids"]).shape[-1]) for o in outputs),
            slices=sum(int(np.asarray(o["tgt_sizes"]).reshape(-1, 2).shape[0]) for o in outputs),
            patches=max(patches) or 1024,  # text only: any value (no vision program)
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            num_beams=settings.num_beams,
            early_stopping=settings.early_stopping,
            stream=stream,
        )

    def settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            num_beams=self.num_beams,
            early_stopping=self.early_stopping,
        )


# ------------------------------------------------------------------------------------------------
# Traced functions (graphdef is static; weights are an argument, never a closure)
# ------------------------------------------------------------------------------------------------


def _prefill(graphdef, state, cache: KVCache, batch: dict, vision: dict | None):
    """Vision + resampler on all slices, merge, LLM over the prompt, fill the cache.

    Args:
      cache: KVCache [L, B, S, K, H] (donated; its previous contents are discarded).
      batch: input_ids / token_valid / positions / image_slot [B, T], last_index [B].
      vision: [I, ...] slice arrays or None.
    Returns:
      (float32 logits [B, V] of each row's last prompt token, cache).
    """
    TRACE_COUNTS["prefill"] += 1
    from minicpmv_jax.model import encode_images, merge_embeds

    module = nnx.merge(graphdef, state)
    cache = cache.replace(end=jnp.zeros_like(cache.end), valid=jnp.zeros_like(cache.valid))
    ids = batch["input_ids"]
    if vision is None:
        x = module.llm.embed(ids)
    else:
        num_groups = vision["group_index"].shape[0]  # groups <= slices: one static bound
        feats = encode_images(module, **vision, num_groups=num_groups)  # [G, Q, D]
        x = merge_embeds(module, ids, batch["image_slot"], feats.reshape(-1, feats.shape[-1]))
    h, cache = module.llm.hidden(x, batch["positions"], cache, batch["token_valid"])
    rows = jnp.arange(h.shape[0])
    # the row's LAST token, not its last attended one (a masked id-0 token can end a prompt)
    logits = module.llm.logits(h[rows, batch["last_index"]][:, None])[:, 0]  # [B, V]
    return logits, constrain_cache(cache)


def _forward(module, cache: KVCache, tokens, positions):
    """One decode step of the LLM: tokens, positions int32 [R] -> (float32 [R, V], cache)."""
    x = module.llm.embed(tokens[:, None])  # [R, 1, D]
    # generated tokens are always attended (generate() appends ones to the attention mask),
    # even id 0
    valid = jnp.ones((tokens.shape[0], 1), bool)
    logits, cache = module.llm(x, positions[:, None], cache, valid)
    return logits[:, 0], cache


def _decode_sample(
    graphdef,
    state,
    cache,
    first_logits,
    next_position,
    max_new,
    params,
    key,
    *,
    mode: DecodeMode,
    terminators: tuple,
    buffer: int,
    record_logits: bool,
):
    """Greedy / sampling loop: lax.while_loop, one token per row per iteration.

    Args:
      first_logits: [B, V] prefill logits; next_position: int32 [B]; max_new: int32 [] (traced,
        <= buffer); buffer: static M.
    Returns:
      (tokens int32 [B, M], lengths int32 [B], steps int32 [], step logits [B, M, V] or None,
       cache).
    """
    TRACE_COUNTS["decode"] += 1
    module = nnx.merge(graphdef, state)
    b, v = first_logits.shape
    step_fn = functools.partial(
        sampling.sample_step, mode=mode, params=params, terminators=terminators
    )
    record = jnp.zeros((b, buffer, v), jnp.float32) if record_logits else None

    def put(rec, logits, step):
        if rec is None:
            return None
        return jax.lax.dynamic_update_slice_in_dim(rec, logits[:, None], step, axis=1)

    s = step_fn(sampling.SampleState.init(b, buffer, v, key), logits=first_logits)
    record = put(record, first_logits, 0)

    def cond(c):
        s, cache, _ = c
        return ~s.done(max_new) & (cache.end < cache.max_len)

    def body(c):
        s, cache, rec = c
        logits, cache = _forward(module, cache, s.last_tokens(), next_position + s.step - 1)
        return step_fn(s, logits=logits), cache, put(rec, logits, s.step)

    s, cache, record = jax.lax.while_loop(cond, body, (s, cache, record))
    return s.tokens, s.length, s.step, record, constrain_cache(cache)


def _decode_beam(
    graphdef,
    state,
    cache,
    first_logits,
    next_position,
    max_new,
    params,
    *,
    mode: DecodeMode,
    terminators: tuple,
    buffer: int,
):
    """Beam search (transformers semantics) for B rows of N beams in one lax.while_loop.

    The prefilled cache [L, B, S, K, H] is repeated to B * N rows (transformers expands the
    prompt to num_beams copies before the prefill: same values); each step gathers the cache rows
    of the parent beams (``_temporary_reorder_cache``).
    """
    TRACE_COUNTS["decode"] += 1
    module = nnx.merge(graphdef, state)
    n = mode.num_beams
    b = first_logits.shape[0]
    cache = cache.replace(
        k=jnp.repeat(cache.k, n, axis=1),
        v=jnp.repeat(cache.v, n, axis=1),
        valid=jnp.repeat(cache.valid, n, axis=0),
    )
    pos = jnp.repeat(next_position, n)  # [B * N]

    def forward(cache, tokens, parent, step):
        flat = (jnp.arange(b)[:, None] * n + parent).reshape(-1)  # [B * N]
        cache = cache.replace(k=cache.k[:, flat], v=cache.v[:, flat], valid=cache.valid[flat])
        logits, cache = _forward(module, cache, tokens.reshape(-1), pos + step - 1)
        return cache, logits.reshape(b, n, -1)

    s, cache = sampling.beam_search(
        forward,
        cache,
        first_logits,
        num_beams=n,
        max_new=max_new,
        params=params,
        terminators=terminators,
        early_stopping=mode.early_stopping,
        buffer=buffer,
    )
    tokens, length, score, beams = sampling.beam_result(s)
    return tokens, length, s.step, score, beams


def _first_step(first_logits, params, key, max_new, *, mode, terminators, buffer):
    """Streaming: select token 0 from the prefill logits.

    Returns (SampleState, int32 [B] new tokens, bool [] stop). Everything the host reads per
    token comes out of the program: no eager indexing (which would compile per step index).
    """
    TRACE_COUNTS["stream_first"] += 1
    b, v = first_logits.shape
    s = sampling.SampleState.init(b, buffer, v, key)
    s = sampling.sample_step(s, first_logits, mode, params, terminators)
    return s, s.last_tokens(), s.done(max_new)


def _next_step(graphdef, state, cache, s, next_position, params, max_new, *, mode, terminators):
    """Streaming: one forward + selection (the body of ``_decode_sample``).

    Returns (SampleState, cache, int32 [B] new tokens, bool [] stop).
    """
    TRACE_COUNTS["stream_step"] += 1
    module = nnx.merge(graphdef, state)
    logits, cache = _forward(module, cache, s.last_tokens(), next_position + s.step - 1)
    s = sampling.sample_step(s, logits, mode, params, terminators)
    stop = s.done(max_new) | (cache.end >= cache.max_len)
    return s, constrain_cache(cache), s.last_tokens(), stop


# ------------------------------------------------------------------------------------------------
# Generator
# ------------------------------------------------------------------------------------------------


class Generator:
    """Compiled prefill / decode programs of one model, with their shape buckets.

    Args:
      model: a ``MiniCPMV`` (``module``, ``config``, ``processor``).
      buckets: shape buckets (see ``Buckets``).
      cache_dtype: KV cache dtype (default: the LLM compute dtype); bfloat16 halves the cache.
    """

    def __init__(self, model, buckets: Buckets | None = None, cache_dtype=None):
        self.model = model
        self.buckets = buckets or Buckets()
        cfg = model.config.llm
        self.llm_config = cfg
        self.cache_dtype = jnp.dtype(cache_dtype if cache_dtype is not None else cfg.dtype)
        self.query_num = int(model.config.query_num)
        if getattr(model, "processor", None) is None:
            raise GenerationError("generation needs the model's processor (its stop tokens)")
        self.terminators = tuple(int(t) for t in model.processor.terminators)
        self.pad_id = 0
        self.graphdef, self.state = nnx.split(model.module)
        self._pool: dict[tuple, KVCache] = {}  # reusable cache buffers, donated to prefill
        # Shardings live on these top-level jits only (the traced functions nest no jit).
        # Host-read outputs are replicated over the model's mesh: a multi-host process can only
        # fetch an array it holds whole. The KV cache output is left to the layout the traced
        # functions pin (constrain_cache = cache_shardings, batch-sharded when B divides); its
        # scalar write index is replicated (stream reads it).
        mesh = getattr(model, "mesh", None)
        self.mesh = mesh if mesh is not None else make_mesh()
        rep = NamedSharding(self.mesh, PS())
        cache_out = KVCache(k=None, v=None, end=rep, valid=None)
        self._prefill = jax.jit(
            _prefill, static_argnums=0, donate_argnums=2, out_shardings=(rep, cache_out)
        )
        self._decode_sample = jax.jit(
            _decode_sample,
            static_argnums=0,
            static_argnames=("mode", "terminators", "buffer", "record_logits"),
            donate_argnums=2,
            out_shardings=(rep, rep, rep, rep, cache_out),  # tokens, lengths, steps, logits
        )
        # not donated: the cache grows from B to B * num_beams rows, no buffer to reuse
        self._decode_beam = jax.jit(
            _decode_beam,
            static_argnums=0,
            static_argnames=("mode", "terminators", "buffer"),
            out_shardings=rep,  # tokens, lengths, steps, scores, beam indices
        )
        self._first_step = jax.jit(
            _first_step, static_argnames=("mode", "terminators", "buffer"), out_shardings=rep
        )
        self._next_step = jax.jit(
            _next_step,
            static_argnums=0,
            static_argnames=("mode", "terminators"),
            donate_argnums=2,
            out_shardings=(rep, cache_out, rep, rep),  # state, cache, tokens, stop
        )

    # -- shapes --------------------------------------------------------------------------------

    def cache_len(self, prompt_len: int, max_new_tokens: int) -> tuple[int, int, int]:
        """(T bucket, M bucket, S = T + M cache slots) for a request; raises when it cannot fit."""
        limit = self.buckets.max_cache_len
        if prompt_len >= limit:
            raise PromptTooLongError(
                f"prompt has {prompt_len} tokens but the KV cache holds at most {limit} "
                f"(Buckets.max_cache_len): shorten the prompt, use fewer or smaller images "
                f"(max_slice_nums), or raise max_cache_len"
            )
        if prompt_len + max_new_tokens > limit:
            raise PromptTooLongError(
                f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds the KV "
                f"cache limit of {limit} slots (Buckets.max_cache_len): lower max_new_tokens to "
                f"at most {limit - prompt_len}"
            )
        t = self.buckets.token_bucket(prompt_len)
        m = self.buckets.new_token_bucket(max_new_tokens)
        return t, m, t + m

    def _cache(self, batch: int, length: int) -> KVCache:
        """A [L, B, S, K, H] cache buffer: the last request's (reused, donated) or a fresh one.

        Both are placed with one canonical sharding, so that a reused buffer (a program output)
        and a fresh one give the same jit cache key (no recompilation).
        """
        cache = self._pool.pop((batch, length), None)
        if cache is None:
            cache = KVCache.init(self.llm_config, batch, length, self.cache_dtype)
        # sharding.RULES layout (KV heads / batch replicated where the mesh does not divide them)
        return jax.device_put(cache, cache_shardings(self.mesh, cache))

    # -- stages ---------------------------------------------------------------------------------

    def prefill(self, prepared: PreparedBatch, cache_len: int) -> tuple[jax.Array, KVCache]:
        """Run the jitted prefill. -> (float32 logits [B, V], cache)."""
        b = prepared.input_ids.shape[0]
        cache = self._cache(b, cache_len)
        batch = {
            "input_ids": prepared.input_ids,
            "token_valid": prepared.token_valid,
            "positions": prepared.positions,
            "image_slot": prepared.image_slot,
            "last_index": prepared.last_index,
        }
        return self._prefill(self.graphdef, self.state, cache, batch, prepared.vision)

    def prepare(self, outputs: Sequence[Any]) -> PreparedBatch:
        return prepare_batch(outputs, self.buckets, self.query_num)

    def run(
        self,
        outputs: Sequence[Any],
        settings: GenerationSettings,
        *,
        record_logits: bool = False,
    ) -> GenerationOutput:
        """Generate for a batch of processed conversations (blocking)."""
        if not outputs:
            raise GenerationError("generate() needs at least one conversation")
        return self._run_prepared(self.prepare(outputs), settings, record_logits=record_logits)

    def _run_prepared(
        self,
        prepared: PreparedBatch,
        settings: GenerationSettings,
        *,
        record_logits: bool = False,
        step_limit: int | None = None,
    ) -> GenerationOutput:
        """Prefill + decode of a prepared batch. step_limit: decode at most this many tokens
        (a traced value: the programs are those of ``settings.max_new_tokens``)."""
        timings: dict[str, float] = {}
        n_traces = sum(TRACE_COUNTS.values())
        _, m, s_len = self.cache_len(max(prepared.lengths), settings.max_new_tokens)
        t0 = time.perf_counter()
        logits, cache = self.prefill(prepared, s_len)
        logits.block_until_ready()
        timings["prefill"] = time.perf_counter() - t0
        mode, params = settings.mode, settings.params()
        limit = settings.max_new_tokens if step_limit is None else step_limit
        max_new = jnp.asarray(limit, jnp.int32)
        next_pos = jnp.asarray(prepared.next_position)
        t0 = time.perf_counter()
        out = GenerationOutput(sequences=[], prompt_tokens=list(prepared.lengths))
        if mode.num_beams == 1:
            tokens, length, steps, record, cache = self._decode_sample(
                self.graphdef,
                self.state,
                cache,
                logits,
                next_pos,
                max_new,
                params,
                settings.key(),
                mode=mode,
                terminators=self.terminators,
                buffer=m,
                record_logits=record_logits,
            )
            self._pool[(prepared.input_ids.shape[0], s_len)] = cache
            if record is not None:
                out.step_logits = np.asarray(record)
        else:
            tokens, length, steps, score, beams = self._decode_beam(
                self.graphdef,
                self.state,
                cache,
                logits,
                next_pos,
                max_new,
                params,
                mode=mode,
                terminators=self.terminators,
                buffer=m,
            )
            out.scores = np.asarray(score)
            beams = np.asarray(beams)
        tokens, length = np.asarray(tokens), np.asarray(length)
        timings["decode"] = time.perf_counter() - t0
        out.sequences = [tokens[r, : length[r]].astype(np.int64) for r in range(len(length))]
        if mode.num_beams > 1:
            out.beam_indices = [beams[r, : length[r]].astype(np.int64) for r in range(len(length))]
        out.num_steps = int(steps)
        out.timings = timings
        out.timings["traces"] = sum(TRACE_COUNTS.values()) - n_traces
        return out

    def warmup(self, shapes: Sequence[RequestShape], patch_buckets=None) -> dict[str, Any]:
        """Compile the prefill and decode programs of every request shape now.

        Runs each distinct static signature once on a placeholder batch (zeros, one decoding
        step), so later requests of those shapes start without compiling; their KV cache buffers
        are allocated too. patch_buckets: the processor's (default: the model processor's).
        Returns {"signatures", "programs" (traces), "seconds"}. Requests that go through
        ``model.generate`` / ``chat`` run under the model's matmul-precision context, which is
        part of the compiled programs' identity: warm those up with ``model.warmup``.
        """
        from minicpmv_jax.processor import patch_bucket_size

        if patch_buckets is None:
            patch_buckets = self.model.processor.patch_buckets
        seen: dict[tuple, RequestShape] = {}
        for shape in shapes:
            if not isinstance(shape, RequestShape):
                raise GenerationError(f"warmup() takes RequestShape values, got {shape!r}")
            t, m, _ = self.cache_len(shape.prompt_tokens, shape.max_new_tokens)
            p = patch_bucket_size(shape.patches, patch_buckets) if shape.slices else 0
            i = self.buckets.slice_bucket(shape.slices)
            key = (shape.batch, t, i, p, m, shape.settings().mode, shape.stream)
            seen.setdefault(key, shape)
        traces, t0 = sum(TRACE_COUNTS.values()), time.perf_counter()
        for (b, t, i, p, *_), shape in seen.items():
            prepared = _placeholder_batch(b, shape.prompt_tokens, t, i, p, self.model.config)
            if not shape.stream:
                self._run_prepared(prepared, shape.settings(), step_limit=1)
                continue
            # two tokens: the first-token and the per-token programs (no early stop)
            settings = dataclasses.replace(shape.settings(), min_new_tokens=2)
            tokens = self._stream_prepared(prepared, settings)
            for _ in itertools.islice(tokens, 2):
                pass
            tokens.close()  # hands the cache back to the pool
        return {
            "signatures": len(seen),
            "programs": sum(TRACE_COUNTS.values()) - traces,
            "seconds": time.perf_counter() - t0,
        }

    def stream(self, outputs: Sequence[Any], settings: GenerationSettings) -> Iterator[np.ndarray]:
        """Yield the new token of every row after each step (int64 [B]; pad 0 once finished).

        Same numbers as ``run`` (the same step function), one jitted call per token.
        """
        if settings.num_beams > 1:
            raise GenerationError("streaming is not available with beam search (num_beams > 1)")
        return self._stream_prepared(self.prepare(outputs), settings)

    def _stream_prepared(
        self, prepared: PreparedBatch, settings: GenerationSettings
    ) -> Iterator[np.ndarray]:
        _, m, s_len = self.cache_len(max(prepared.lengths), settings.max_new_tokens)
        logits, cache = self.prefill(prepared, s_len)
        mode, params = settings.mode, settings.params()
        kw = {"mode": mode, "terminators": self.terminators}
        max_new = jnp.asarray(settings.max_new_tokens, jnp.int32)
        key = settings.key()
        s, token, stop = self._first_step(logits, params, key, max_new, buffer=m, **kw)
        next_pos = jnp.asarray(prepared.next_position)
        try:
            while True:
                yield np.asarray(token).astype(np.int64)
                if bool(stop):
                    break
                s, cache, token, stop = self._next_step(
                    self.graphdef, self.state, cache, s, next_pos, params, max_new, **kw
                )
        finally:
            self._pool[(prepared.input_ids.shape[0], s_len)] = cache

    # -- memory ---------------------------------------------------------------------------------

    def memory_report(
        self,
        batch: int,
        prompt_len: int,
        max_new_tokens: int,
        num_slices: int = 0,
        patch_bucket: int = 1024,
        num_beams: int = 1,
    ) -> dict[str, Any]:
        """Bytes of the KV cache and of the compiled prefill / decode programs for a request shape.

        Compiles (without running) on abstract shapes; ``compiled.memory_analysis()`` gives the
        argument / output / temporary bytes XLA plans (None fields where a backend has none).
        """
        t, m, s_len = self.cache_len(prompt_len, max_new_tokens)
        cfg = self.llm_config
        cache_shape = (cfg.num_layers, batch * num_beams, s_len, cfg.num_kv_heads, cfg.head_dim)
        kv_bytes = 2 * int(np.prod(cache_shape)) * self.cache_dtype.itemsize
        sds = jax.ShapeDtypeStruct
        cache = jax.eval_shape(lambda: KVCache.init(cfg, batch, s_len, self.cache_dtype))
        i = self.buckets.slice_bucket(num_slices)
        bt = {
            "input_ids": sds((batch, t), jnp.int32),
            "token_valid": sds((batch, t), bool),
            "positions": sds((batch, t), jnp.int32),
            "image_slot": sds((batch, t), jnp.int32),
            "last_index": sds((batch,), jnp.int32),
        }
        vision = None
        if i:
            pd = self.model.config.vision.patch_dim
            vision = {
                "pixel_patches": sds((i, patch_bucket, pd), jnp.float32),
                "position_ids": sds((i, patch_bucket), jnp.int32),
                "vision_mask": sds((i, patch_bucket), bool),
                "patch_valid": sds((i, patch_bucket), bool),
                "tgt_sizes": sds((i, 2), jnp.int32),
                "temporal_ids": sds((i,), jnp.int32),
                "group_index": sds((i,), jnp.int32),
            }
        timings = {}

        def build(name, fn, *args, **kwargs):  # trace + lower, then compile, timed apart
            t0 = time.perf_counter()
            lowered = fn.lower(*args, **kwargs)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            timings[f"{name}_lower_s"] = t1 - t0
            timings[f"{name}_compile_s"] = time.perf_counter() - t1
            return compiled

        prefill = build("prefill", self._prefill, self.graphdef, self.state, cache, bt, vision)
        v = cfg.vocab_size
        logits = sds((batch, v), jnp.float32)
        pos = sds((batch,), jnp.int32)
        params = SamplingParams.create()
        scalar = sds((), jnp.int32)
        if num_beams == 1:
            decode = build(
                "decode",
                self._decode_sample,
                self.graphdef,
                self.state,
                cache,
                logits,
                pos,
                scalar,
                params,
                jax.random.key(0),
                mode=DecodeMode(),
                terminators=self.terminators,
                buffer=m,
                record_logits=False,
            )
        else:
            decode = build(
                "decode",
                self._decode_beam,
                self.graphdef,
                self.state,
                cache,
                logits,
                pos,
                scalar,
                params,
                mode=DecodeMode(num_beams=num_beams),
                terminators=self.terminators,
                buffer=m,
            )
        weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.state))
        return {
            "batch": batch,
            "token_bucket": t,
            "new_token_bucket": m,
            "cache_len": s_len,
            "num_beams": num_beams,
            "cache_dtype": str(self.cache_dtype),
            "kv_cache_bytes": kv_bytes,
            "weights_bytes": int(weights),
            "prefill": _memory(prefill),
            "decode": _memory(decode),
            "timings": timings,
        }


def _memory(compiled) -> dict[str, int | None]:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        ma = None
    names = ("argument", "output", "temp", "alias", "generated_code")
    return {f"{n}_bytes": getattr(ma, f"{n}_size_in_bytes", None) if ma else None for n in names}
