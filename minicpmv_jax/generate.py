"""The sampler: prompt logits, prefill and decode over a static KV cache (greedy, sampling, beam).

``Sampler`` holds a model (its ``config``, ``module``, ``processor`` and ``mesh``, as gemma's
``Sampler`` holds a transformer) and owns everything between processor outputs and new tokens:

1. ``batching.prepare_batch`` (host, numpy) right-pads the prompts to a token-length bucket and
   stacks the slices of all images of all conversations into one ``VisionBatch``.
2. ``prefill`` (one ``jax.jit`` per (batch, token bucket, slice bucket, patch bucket, cache length))
   runs the vision tower and resampler on every slice in one call, scatters the features at the
   ``image_bound`` rows, runs the LLM over the prompt and fills the KV cache (donated).
   ``prompt_logits`` is the same prompt computation without a cache, returning every position.
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

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from minicpmv_jax import sampling
from minicpmv_jax.batching import Buckets, PreparedBatch, VisionBatch, prepare_batch
from minicpmv_jax.errors import PromptTooLongError
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.layers import LayerParts
from minicpmv_jax.model import encode_images, merge_embeds
from minicpmv_jax.sampling import DecodeMode, SamplingParams
from minicpmv_jax.settings import GenerationError, GenerationSettings
from minicpmv_jax.sharding import cache_shardings, constrain_cache, make_mesh, path_name

log = logging.getLogger(__name__)

# How many times each jitted function was traced (= compiled for a new shape / static argument).
# Tests read it to check that requests inside existing buckets trigger no compilation.
TRACE_COUNTS: Counter = Counter()


# ------------------------------------------------------------------------------------------------
# Results and request shapes
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationOutput:
    """What one ``Sampler.run`` produced.

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
class RequestShape:
    """What decides which programs a request compiles, for ``Sampler.warmup``.

    batch: conversations in the request; prompt_tokens: the longest prompt (image placeholders
    included); slices: image slices over the whole batch (0 = text only); patches: the largest
    patch bucket among them (1024 for 448x448-scale slices, see ``processor.patch_buckets``);
    max_new_tokens, do_sample, num_beams, early_stopping: as in ``GenerationSettings``. Values
    inside the same buckets share programs. stream: the request is streamed token by token
    (``chat(stream=True)``, ``Sampler.stream``), which runs per-token programs of its own.
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


def encode_vision(module, v) -> jax.Array:
    """Resampler rows [G, Q, D] of a typed `VisionBatch` (vision tower in chunks, then resampler)."""
    return encode_images(
        module,
        v.pixel_patches,
        v.position_ids,
        v.vision_mask,
        v.patch_valid,
        v.tgt_sizes,
        v.temporal_ids,
        v.group_index,
        num_groups=v.num_groups,
    )


def _embed_prompt(module, batch: PreparedBatch) -> jax.Array:
    """Token embeddings [B, T, D] with the resampler rows of every image slice scattered in."""
    ids = batch.input_ids
    v = batch.vision
    if v is None:
        return module.llm.embed(ids)
    feats = encode_vision(module, v)  # [G, Q, D]
    return merge_embeds(module, ids, batch.image_slot, feats.reshape(-1, feats.shape[-1]))


def _prompt(graphdef, state, batch: PreparedBatch):
    """The prompt without a cache: (float32 logits [B, T, V], float32 embeddings [B, T, D])."""
    TRACE_COUNTS["prompt"] += 1
    module = nnx.merge(graphdef, state)
    x = _embed_prompt(module, batch)
    logits, _ = module.llm(x, batch.positions, None, batch.token_valid)
    return logits, x.astype(jnp.float32)


def _encode(graphdef, state, vision: VisionBatch):
    """Stage outputs of the image path: (float32 vision tower features [I, P, Dv], float32
    resampler output [G, Q, D]), for parity checks that name their stage."""
    TRACE_COUNTS["encode"] += 1
    module = nnx.merge(graphdef, state)
    v = vision
    feats = module.vpm(v.pixel_patches, v.position_ids, v.vision_mask, v.group_index >= 0)
    out = module.resampler(
        feats, v.tgt_sizes, v.patch_valid, v.group_index, v.num_groups, v.temporal_ids
    )
    return feats.astype(jnp.float32), out.astype(jnp.float32)


def _prefill(graphdef, state, cache: KVCache, batch: PreparedBatch):
    """Vision + resampler on all slices, merge, LLM over the prompt, fill the cache.

    Args:
      cache: KVCache [L, B, S, K, H] (donated; its previous contents are discarded).
      batch: the request (``batching.prepare_batch``).
    Returns:
      (float32 logits [B, V] of each row's last prompt token, cache).
    """
    TRACE_COUNTS["prefill"] += 1
    module = nnx.merge(graphdef, state)
    cache = cache.replace(end=jnp.zeros_like(cache.end), valid=jnp.zeros_like(cache.valid))
    x = _embed_prompt(module, batch)
    h, cache = module.llm.hidden(x, batch.positions, cache, batch.token_valid)
    rows = jnp.arange(h.shape[0])
    # the row's LAST token, not its last attended one (a masked id-0 token can end a prompt)
    logits = module.llm.logits(h[rows, batch.last_index][:, None])[:, 0]  # [B, V]
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
    work,
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

    The prefilled cache [L, B, S, K, H] is copied into ``work`` [L, B * N, S, K, H], a donated
    buffer (transformers expands the prompt to num_beams copies before the prefill: same
    values). Each step reorders the rows of the parent beams (``_reorder_cache``) inside that
    buffer, and only in the M generated slots: the S - M prompt slots of a row's beams hold the
    same keys and values whatever the reordering, so the step gathers an [L, B * N, M, K, H]
    slice and writes it back in place instead of copying the whole cache.

    Returns:
      (tokens int32 [B, M], lengths int32 [B], steps int32 [], scores float32 [B],
       beam indices int32 [B, M], work cache for the pool).
    """
    TRACE_COUNTS["decode"] += 1
    module = nnx.merge(graphdef, state)
    n = mode.num_beams
    b = first_logits.shape[0]
    start = cache.max_len - buffer  # first generated slot (the token bucket T)

    def expand(buf, rows):  # write each row's N copies into the donated buffer, in place
        return jax.lax.dynamic_update_slice(buf, jnp.repeat(rows, n, axis=1), (0,) * buf.ndim)

    work = work.replace(
        k=expand(work.k, cache.k),
        v=expand(work.v, cache.v),
        end=cache.end,
        valid=jnp.repeat(cache.valid, n, axis=0),  # the same for every beam of a row
    )
    pos = jnp.repeat(next_position, n)  # [B * N]

    def reorder(buf, rows):  # [L, B * N, S, K, H]: generated slots of the parent rows
        generated = jax.lax.slice_in_dim(buf, start, buf.shape[2], axis=2)[:, rows]
        return jax.lax.dynamic_update_slice_in_dim(buf, generated, start, axis=2)

    def forward(work, tokens, parent, step):
        rows = (jnp.arange(b)[:, None] * n + parent).reshape(-1)  # [B * N]
        work = work.replace(k=reorder(work.k, rows), v=reorder(work.v, rows))
        logits, work = _forward(module, work, tokens.reshape(-1), pos + step - 1)
        return work, logits.reshape(b, n, -1)

    s, work = sampling.beam_search(
        forward,
        work,
        first_logits,
        num_beams=n,
        max_new=max_new,
        params=params,
        terminators=terminators,
        early_stopping=mode.early_stopping,
        buffer=buffer,
    )
    tokens, length, score, beams = sampling.beam_result(s)
    return tokens, length, s.step, score, beams, constrain_cache(work)


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
# Sampler
# ------------------------------------------------------------------------------------------------


class CachePool:
    """Reusable KV-cache buffers, keyed by (rows, slots), at most ``size`` of them.

    A request takes the buffer of its shape (donated to its programs) and gives it back when
    done; past ``size`` buffers the least recently used one is dropped, so a server that sees
    many request shapes holds a bounded amount of cache memory. ``size=0`` keeps none.
    """

    def __init__(self, size: int):
        if int(size) < 0:
            raise GenerationError(f"cache pool size must be >= 0, got {size}")
        self.size = int(size)
        self._free: collections.OrderedDict[tuple, KVCache] = collections.OrderedDict()

    def take(self, key: tuple) -> KVCache | None:
        return self._free.pop(key, None)

    def give(self, key: tuple, cache: KVCache) -> None:
        self._free[key] = cache
        self._free.move_to_end(key)
        while len(self._free) > self.size:
            self._free.popitem(last=False)

    def keys(self) -> list[tuple]:
        """Held shapes, least recently used first."""
        return list(self._free)


# the weights a compiled program uses inside a loop (layers.PACKED_BF16)
PACKED_STACKS = ("llm.model.layers.", "vpm.encoder.layers.")
PACKED_TABLES = ("llm.model.embed_tokens.embedding", "llm.lm_head.weight")


def pack_weights(
    state: nnx.State,
    stacks: tuple[str, ...] = PACKED_STACKS,
    tables: tuple[str, ...] = PACKED_TABLES,
) -> tuple[nnx.State, list[jax.Array]]:
    """CPU backend: the layer stacks, embedding table and lm_head of a bf16 model as uint16
    views of the same memory (`layers.PACKED_BF16`); returns (state, the arrays now viewed).
    `stacks` (name prefixes) and `tables` (whole names) say which parameters: by default the
    2.x layout's; MiniCPM-V 4.6 packs its tied embedding table alone (`v46.model`).

    XLA:CPU converts each bf16 operand of a loop to a float32 copy before the loop; the packed
    weights are reinterpreted slice by slice inside it instead (`layers.scan_layers`,
    `llm.Llm.embed` / `logits`), so a bf16 model's programs no longer hold float32 copies of
    it. Only single-device arrays whose view aliases their memory are packed (no copy, same
    bytes); other backends, dtypes and shardings are left as they are.
    """
    if jax.default_backend() != "cpu":
        return state, []
    leaves, sources = [], []
    for path, var in nnx.to_flat_state(state):
        x = var.get_value()
        name = path_name(path)
        if (
            isinstance(x, jax.Array)
            and x.dtype == jnp.bfloat16
            and len(x.sharding.device_set) == 1
            and ((stacks and name.startswith(stacks)) or name in tables)
        ):
            bits = jax.device_put(np.asarray(x).view(np.uint16), x.sharding)
            if bits.unsafe_buffer_pointer() == x.unsafe_buffer_pointer():  # a view, not a copy
                leaves.append((path, var.replace(bits)))
                sources.append(x)
                continue
        leaves.append((path, var))
    return nnx.from_flat_state(leaves), sources


# XLA's compiler frees its working memory (LLVM modules, buffers; 0.15-0.3 GB for the 2.6
# prefill / decode programs) back to the C heap, which keeps it: the process's resident memory
# stays that much higher, and the first run of the program just compiled adds its temporaries
# on top. On the CPU backend the samplers hand that freed memory back to the OS after each
# compilation (glibc `malloc_trim`; elsewhere a no-op): peak memory of a bf16 chat turn on the
# 1.05 B 2.6-layout model 2.92 -> 2.75 GB (BENCHMARKS.md). False leaves the heap alone (A/B).
TRIM_AFTER_COMPILE = True
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring's event
_trim_registered = False


def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


def _trim_listener(event: str, duration_secs: float, **kwargs) -> None:
    if event == COMPILE_EVENT and TRIM_AFTER_COMPILE:
        trim = _malloc_trim()
        if trim is not None:
            trim(0)


def trim_after_compiles() -> bool:
    """Register (once per process) the `jax.monitoring` listener that returns the heap's free
    memory to the OS after each XLA backend compilation. Returns whether it is registered."""
    global _trim_registered
    if not _trim_registered and TRIM_AFTER_COMPILE and _malloc_trim() is not None:
        jax.monitoring.register_event_duration_secs_listener(_trim_listener)
        _trim_registered = True
    return _trim_registered


# the decoder stack whose layers a CPU program reads as separate arrays (layers.LayerParts)
SPLIT_STACKS = ("llm.model.layers.",)
# The samplers split float32 and bf16 stacks. A bf16 layer read in place needs no float32 copy
# inside the decode loop as long as its dots take the bf16 weights as they are
# (`layers.cpu_aware_dot`, one row included): a batch-1 decode step of 2.6's layers (bf16, 6
# layers) 78 -> 49 ms per layer against the packed, scanned stack (BENCHMARKS.md).
SPLIT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Read when a Sampler is built; False keeps its stack whole and scanned on CPU as elsewhere (A/B
# measurements; compile time flat in depth: full-depth 2.6 float32 prefill + decode compile
# 1.8 s stacked, 7.5 s as per-layer views, BENCHMARKS.md "Compile time at full depth").
SPLIT_LAYERS = True


def _view(x: jax.Array, piece: np.ndarray, offset: int, sharding) -> jax.Array | None:
    """`piece` (a slice of x's numpy view starting `offset` bytes in) as an array aliasing x's
    memory, or None where the runtime would copy it (an unaligned slice)."""
    part = jax.device_put(piece, sharding)
    return part if part.unsafe_buffer_pointer() == x.unsafe_buffer_pointer() + offset else None


def _layer_view(x: jax.Array, host: np.ndarray, i: int) -> jax.Array | None:
    """Layer i of the stacked single-device array `x` (`host` = its numpy view) as an array
    aliasing x's memory, or None where the runtime would copy it (an unaligned slice)."""
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):  # drop the "layers" axis of the spec
        spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, PS(*spec[1:]))
    return _view(x, host[i], i * host[0].nbytes, sharding)


def split_layers(
    state: nnx.State, dtypes: tuple = (jnp.float32,)
) -> tuple[nnx.State, list[jax.Array]]:
    """CPU backend: each decoder-stack parameter [L, ...] as its L layer slices, views of the
    same memory (`layers.LayerParts`); returns (state, the arrays now viewed).

    XLA:CPU copies a dot's weight operand that is a slice of a stack before the dot, so a
    scanned batch-1 decode step reads each layer weight three times; with the parts the
    programs run the decoder as an unrolled loop whose dots read the weights in place
    (`layers.scan_layers`). Only a stack whose parameters all have one of `dtypes` is split
    (float32 by default; the samplers add bf16, `SPLIT_DTYPES`), and only single-device arrays
    whose every slice aliases the stack's memory (no copy: the model's memory is unchanged);
    abstract arrays (compile-only models) are split into abstract parts.

    Left stacked: a stack holding other dtypes (int8 kernels with float32 scales; a packed
    bf16 stack, whose uint16 -> bf16 reinterpretation XLA:CPU makes as a copy that, unrolled,
    it hoists ahead of the layers: a bf16 copy of every layer at once). A bf16 stack is split
    only where its dots take bf16 weights as they are (`layers.cpu_aware_dot`): a dot that
    converts its weights to float32 would, unrolled and loop-invariant, have every layer's
    float32 copy hoisted ahead of the layers.
    Other backends are left as they are: their compilers slice a stack in place, and a scan
    keeps compile time flat in depth.
    """
    if jax.default_backend() != "cpu":
        return state, []
    flat = nnx.to_flat_state(state)
    stack = [var.get_value() for path, var in flat if path_name(path).startswith(SPLIT_STACKS)]
    if not stack or any(getattr(x, "dtype", None) not in dtypes for x in stack):
        return state, []
    leaves, sources = [], []
    for path, var in flat:
        x = var.get_value()
        parts = None
        if path_name(path).startswith(SPLIT_STACKS) and getattr(x, "ndim", 0) >= 1:
            if isinstance(x, jax.ShapeDtypeStruct):
                parts = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype)] * x.shape[0]
            elif isinstance(x, jax.Array) and len(x.sharding.device_set) == 1:
                host = np.asarray(x)
                parts = [_layer_view(x, host, i) for i in range(x.shape[0])]
                if any(p is None for p in parts):
                    parts = None
                else:
                    sources.append(x)
        leaves.append((path, var.replace(LayerParts(parts)) if parts else var))
    split = sum(isinstance(v.get_value(), LayerParts) for _, v in leaves)
    if split < len(stack):  # the rest is sliced per layer (a copy before each dot)
        log.info("decoder stack: %d of %d parameters as per-layer views", split, len(stack))
    return nnx.from_flat_state(leaves), sources


# the bf16 lm_head a CPU program reads as row tiles, each its own array (`split_head`)
SPLIT_HEAD_TABLES = ("llm.lm_head.weight",)
# Read when a Sampler is built; False passes the bf16 lm_head packed and whole (A/B
# measurements): the tiled product then slices each tile out of it, a copy (BENCHMARKS.md).
SPLIT_HEAD = True


def split_head(
    state: nnx.State, tables: tuple[str, ...] = SPLIT_HEAD_TABLES
) -> tuple[nnx.State, list[jax.Array]]:
    """CPU backend: a bf16 lm_head weight [V, D] as its row tiles of `llm.SPLIT_TILE`
    weights (whole vocabulary rows; the rows after the last whole tile form one more), zero-copy
    views of the same memory (`layers.LayerParts`); returns (state, the arrays now viewed).

    XLA:CPU copies a dot's weight operand that is a slice of a larger array before the dot, so
    the tiled product of a whole (packed) lm_head wrote and read every tile once more per step;
    given as separate arrays the tiles' dots read the bf16 weights in place (`llm.Llm.logits`),
    and as bf16 operands of the decode loop that only dots read they need no float32 copy.
    Only single-device bf16 arrays whose every tile aliases their memory are split; other
    backends, dtypes and shardings are left as they are (the whole weight, packed on CPU).
    """
    from minicpmv_jax.llm import SPLIT_TILE

    if jax.default_backend() != "cpu":
        return state, []
    leaves, sources = [], []
    for path, var in nnx.to_flat_state(state):
        x = var.get_value()
        if (
            path_name(path) in tables
            and isinstance(x, jax.Array)
            and x.dtype == jnp.bfloat16
            and x.ndim == 2
            and len(x.sharding.device_set) == 1
        ):
            v, d = x.shape
            rows = max(1, min(v, SPLIT_TILE // d))
            host = np.asarray(x)
            parts = [
                _view(x, host[a : a + rows], a * d * host.itemsize, x.sharding)
                for a in range(0, v, rows)
            ]
            if all(p is not None for p in parts):
                leaves.append((path, var.replace(LayerParts(parts))))
                sources.append(x)
                continue
        leaves.append((path, var))
    return nnx.from_flat_state(leaves), sources


class Sampler:
    """Compiled prompt / prefill / decode programs of one model, with their shape buckets.

    Args:
      model: anything with ``config``, ``module`` and ``mesh`` (a ``pipeline.MiniCPMV``);
        ``processor`` supplies the stop tokens (decoding raises without one) and the patch
        buckets ``warmup`` compiles for.
      buckets: shape buckets (see ``batching.Buckets``).
      cache_dtype: KV cache dtype (default: the LLM compute dtype); bfloat16 halves the cache.
      cache_pool: KV cache buffers kept for reuse between requests (``CachePool``).
    """

    def __init__(
        self, model, buckets: Buckets | None = None, cache_dtype=None, cache_pool: int = 4
    ):
        self.model = model
        self.config = model.config
        self.buckets = buckets or Buckets()
        cfg = model.config.llm
        self.llm_config = cfg
        self.cache_dtype = jnp.dtype(cache_dtype if cache_dtype is not None else cfg.dtype)
        self.query_num = int(model.config.query_num)
        processor = getattr(model, "processor", None)
        self.terminators = None
        if processor is not None:
            self.terminators = tuple(int(t) for t in processor.terminators)
        if jax.default_backend() == "cpu":
            trim_after_compiles()
        self.graphdef, state = nnx.split(model.module)
        # SPLIT_LAYERS is this module's switch only (the train step has its own); a split stack
        # or lm_head is not packed (pack_weights takes whole arrays only)
        state, split_from = split_layers(state, SPLIT_DTYPES) if SPLIT_LAYERS else (state, [])
        state, head_from = split_head(state) if SPLIT_HEAD else (state, [])
        self._state, packed_from = pack_weights(state)
        self._packed_from = packed_from + split_from + head_from
        self.pool = CachePool(cache_pool)
        # Shardings live on these top-level jits only (the traced functions nest no jit).
        # Host-read outputs are replicated over the model's mesh: a multi-host process can only
        # fetch an array it holds whole. The KV cache output is left to the layout the traced
        # functions pin (constrain_cache = cache_shardings, batch-sharded when B divides); its
        # scalar write index is replicated (stream reads it).
        mesh = getattr(model, "mesh", None)
        self.mesh = mesh if mesh is not None else make_mesh()
        rep = NamedSharding(self.mesh, PS())
        cache_out = KVCache(k=None, v=None, end=rep, valid=None)
        self._prompt = jax.jit(_prompt, static_argnums=0, out_shardings=rep)
        self._encode = jax.jit(_encode, static_argnums=0, out_shardings=rep)
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
        # the B-row prefill cache is read (and pooled again); the B * N-row work buffer is
        # donated and reordered in place
        self._decode_beam = jax.jit(
            _decode_beam,
            static_argnums=0,
            static_argnames=("mode", "terminators", "buffer"),
            donate_argnums=3,
            out_shardings=(rep, rep, rep, rep, rep, cache_out),  # ..., beam indices, work
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

    @property
    def state(self) -> nnx.State:
        """The model's parameters as the programs take them (see `pack_weights`)."""
        if any(x.is_deleted() for x in self._packed_from):
            raise GenerationError(
                "the model's weights were deleted after its programs were built (donated to a "
                "training step?); call model.configure_generation() to rebuild them"
            )
        return self._state

    def context(self) -> contextlib.ExitStack:
        """The context every program runs (and is compiled) under: the model's mesh, and true
        float32 matmuls for a float32 model (TPU / GPU default to bf16 / tf32 passes)."""
        stack = contextlib.ExitStack()
        # the context mesh: block-boundary activations follow sharding.RULES, outputs replicate
        stack.enter_context(jax.set_mesh(self.mesh))
        if self.llm_config.dtype == jnp.float32:
            stack.enter_context(jax.default_matmul_precision("highest"))
        return stack

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
        """A [L, B, S, K, H] cache buffer: a pooled one (reused, donated) or a fresh one.

        Both are placed with one canonical sharding, so that a reused buffer (a program output)
        and a fresh one give the same jit cache key (no recompilation).
        """
        cache = self.pool.take((batch, length))
        if cache is None:
            cache = KVCache.init(self.llm_config, batch, length, self.cache_dtype)
        # sharding.RULES layout (KV heads / batch replicated where the mesh does not divide them)
        return jax.device_put(cache, cache_shardings(self.mesh, cache))

    def _abstract_cache(self, batch: int, length: int) -> KVCache:
        """ShapeDtypeStructs of ``_cache(batch, length)``, its shardings included (so that a
        lowered program donates and aliases the buffer as a real call does)."""
        shapes = jax.eval_shape(
            lambda: KVCache.init(self.llm_config, batch, length, self.cache_dtype)
        )
        return jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            shapes,
            cache_shardings(self.mesh, shapes),
        )

    def _terminators(self) -> tuple[int, ...]:
        if self.terminators is None:
            raise GenerationError("generation needs the model's processor (its stop tokens)")
        return self.terminators

    # -- prompt ---------------------------------------------------------------------------------

    def prepare(self, outputs: Sequence[Mapping[str, Any]]) -> PreparedBatch:
        return prepare_batch(outputs, self.buckets, self.query_num)

    def prompt_logits(self, output: Mapping[str, Any], return_intermediates: bool = False):
        """float32 [T, V]: logits at every prompt position of one processed conversation.

        The prefill's computation (same batch layout, embeddings, RoPE positions and attention
        mask) without a KV cache. With return_intermediates=True returns (logits, {"vision"
        [I, P, Dv], "resampler" [G, Q, D], "embeds" [T, D]}) so that a parity failure can name
        its stage (vision and resampler only for a conversation with images).
        """
        prepared = self.prepare([output])
        t = prepared.lengths[0]
        with self.context():
            logits, embeds = self._prompt(self.graphdef, self.state, prepared)
            logits = np.asarray(logits)[0, :t]
            if not return_intermediates:
                return logits
            mid = {"embeds": np.asarray(embeds)[0, :t]}
            if prepared.vision is not None:
                vis, res = self._encode(self.graphdef, self.state, prepared.vision)
                mid["vision"] = np.asarray(vis)[: _num_slices(output)]
                mid["resampler"] = np.asarray(res)[: _num_groups(output)]
        return logits, mid

    def encode(self, output: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(float32 vision features [I, P, Dv], float32 resampler output [G, Q, D]) of one
        conversation's slices (the vision keys of a processor output suffice)."""
        n = _num_slices(output)
        vision = VisionBatch.stack([output]).pad_to(self.buckets.slice_bucket(n))
        with self.context():
            vis, res = self._encode(self.graphdef, self.state, vision)
            return np.asarray(vis)[:n], np.asarray(res)[: _num_groups(output)]

    def prefill(self, prepared: PreparedBatch, cache_len: int) -> tuple[jax.Array, KVCache]:
        """Run the jitted prefill. -> (float32 logits [B, V], cache)."""
        cache = self._cache(prepared.input_ids.shape[0], cache_len)
        with self.context():
            return self._prefill(self.graphdef, self.state, cache, prepared)

    # -- generation -----------------------------------------------------------------------------

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
        return self.run_prepared(self.prepare(outputs), settings, record_logits=record_logits)

    def run_prepared(
        self,
        prepared: PreparedBatch,
        settings: GenerationSettings,
        *,
        record_logits: bool = False,
        step_limit: int | None = None,
    ) -> GenerationOutput:
        """Prefill + decode of a prepared batch. step_limit: decode at most this many tokens
        (a traced value: the programs are those of ``settings.max_new_tokens``)."""
        terminators = self._terminators()
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
        with self.context():
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
                    terminators=terminators,
                    buffer=m,
                    record_logits=record_logits,
                )
                self.pool.give((prepared.input_ids.shape[0], s_len), cache)
                if record is not None:
                    out.step_logits = np.asarray(record)
            else:
                rows = prepared.input_ids.shape[0] * mode.num_beams
                tokens, length, steps, score, beams, work = self._decode_beam(
                    self.graphdef,
                    self.state,
                    cache,
                    self._cache(rows, s_len),
                    logits,
                    next_pos,
                    max_new,
                    params,
                    mode=mode,
                    terminators=terminators,
                    buffer=m,
                )
                self.pool.give((prepared.input_ids.shape[0], s_len), cache)
                self.pool.give((rows, s_len), work)
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
        Returns {"signatures", "programs" (traces), "seconds"}.
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
        patch_dim = self.config.vision.patch_dim
        for (b, t, i, p, *_), shape in seen.items():
            vision = VisionBatch.placeholder(i, p, patch_dim) if i else None
            prepared = PreparedBatch.placeholder(b, shape.prompt_tokens, t, vision)
            if not shape.stream:
                self.run_prepared(prepared, shape.settings(), step_limit=1)
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
        kw = {"mode": settings.mode, "terminators": self._terminators()}
        _, m, s_len = self.cache_len(max(prepared.lengths), settings.max_new_tokens)
        logits, cache = self.prefill(prepared, s_len)
        params = settings.params()
        max_new = jnp.asarray(settings.max_new_tokens, jnp.int32)
        key = settings.key()
        with self.context():
            s, token, stop = self._first_step(logits, params, key, max_new, buffer=m, **kw)
        next_pos = jnp.asarray(prepared.next_position)
        try:
            while True:
                yield np.asarray(token).astype(np.int64)
                if bool(stop):
                    break
                # the context is entered per call: a generator must not leak it to its caller
                with self.context():
                    s, cache, token, stop = self._next_step(
                        self.graphdef, self.state, cache, s, next_pos, params, max_new, **kw
                    )
        finally:
            self.pool.give((prepared.input_ids.shape[0], s_len), cache)

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
        cache = self._abstract_cache(batch, s_len)
        i = self.buckets.slice_bucket(num_slices)
        vision = (
            VisionBatch.placeholder(i, patch_bucket, self.config.vision.patch_dim) if i else None
        )
        prepared = PreparedBatch.placeholder(batch, min(prompt_len, t), t, vision).abstract()
        timings = {}

        def build(name, fn, *args, **kwargs):  # trace + lower, then compile, timed apart
            t0 = time.perf_counter()
            lowered = fn.lower(*args, **kwargs)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            timings[f"{name}_lower_s"] = t1 - t0
            timings[f"{name}_compile_s"] = time.perf_counter() - t1
            return compiled

        with self.context():
            prefill = build("prefill", self._prefill, self.graphdef, self.state, cache, prepared)
            logits = sds((batch, cfg.vocab_size), jnp.float32)
            pos = sds((batch,), jnp.int32)
            params = SamplingParams.create()
            scalar = sds((), jnp.int32)
            common = (self.graphdef, self.state, cache, logits, pos, scalar, params)
            terminators = self._terminators()
            if num_beams == 1:
                decode = build(
                    "decode",
                    self._decode_sample,
                    *common,
                    jax.random.key(0),
                    mode=DecodeMode(),
                    terminators=terminators,
                    buffer=m,
                    record_logits=False,
                )
            else:
                work = self._abstract_cache(batch * num_beams, s_len)
                decode = build(
                    "decode",
                    self._decode_beam,
                    *common[:3],
                    work,
                    *common[3:],
                    mode=DecodeMode(num_beams=num_beams),
                    terminators=terminators,
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


def _num_slices(output: Mapping[str, Any]) -> int:
    return int(np.asarray(output["tgt_sizes"]).reshape(-1, 2).shape[0])


def _num_groups(output: Mapping[str, Any]) -> int:
    sizes = output.get("group_sizes")
    return _num_slices(output) if sizes is None else int(np.asarray(sizes).reshape(-1).shape[0])


def _memory(compiled) -> dict[str, int | None]:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        ma = None
    names = ("argument", "output", "temp", "alias", "generated_code")
    return {f"{n}_bytes": getattr(ma, f"{n}_size_in_bytes", None) if ma else None for n in names}
