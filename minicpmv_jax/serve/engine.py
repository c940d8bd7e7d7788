"""Continuous batching: a fixed set of decode slots in one static KV cache, one scheduler thread.

``Engine(model, slots, max_len)`` answers ``types.Request`` values:

1. ``submit`` (the caller's thread) checks the request, runs the processor and lays the prompt
   out in its buckets (``batching.prepare_batch``, the same buckets as ``chat()``), then queues
   it (bounded: ``QueueFull`` with a retry estimate). Refusals are ``RequestError`` naming the
   field: bad settings, too many images, prompt + max_tokens longer than ``max_len``.
2. The scheduler thread admits waiting requests into free slots between decode steps: the
   request's prefill runs alone (batch 1, the bucketed prefill program of ``generate.py``: vision
   tower, resampler, LLM) into a batch-1 cache, ``slots.insert`` copies it into the free row of
   the slot cache and selects the first token.
3. While any slot is busy, ``slots.decode_step`` advances the busy rows by one token; the host
   turns each row's token into text (``text.AnswerText``), checks the end of the answer (the
   model's end-of-turn tokens, the request's stop token ids and stop strings, ``max_tokens``) and
   frees a finished or cancelled row at once, to be refilled before the next step.

Decode row buckets: a decode step costs more with more rows (on a CPU a 16-row step of MiniCPM-V
2.6 costs about 4x a 1-row step), so the step is compiled for a few row counts (``decode_buckets``,
default the powers of two below ``slots``, and ``slots``) and each step runs the smallest bucket
that holds every busy row: rows [0, bucket) of the slot cache, read and written in place. To keep
that bucket small, a request takes the lowest free slot, and when a finished request leaves a hole
below a busy row that keeps the bucket larger than the number of busy rows needs, that row is
moved down (``slots.take_row`` / ``put_row``: one row of cache and state, a fraction of a
step's cost), as vLLM pads a batch up to its CUDA-graph batch sizes and JetStream keeps its
decode slots.

Exactness: a row's numbers depend only on its own request (its own cache row, positions, token
history and PRNG key, selection as ``sampling.sample_step`` does for a batch of one), so a greedy
answer is the answer of ``chat()`` for the same request alone and a seeded sampled answer does
not depend on what else runs.

Compilation: ``start()`` compiles the decode step of every row bucket, the row move, one insert
per token bucket <= ``max_len``
and the prefill of every shape in ``warmup`` (``generate.RequestShape``: prompt tokens, image
slices, patch bucket); ``stats().compilations_after_start`` counts programs traced later (a
request outside the warmed prefill shapes compiles its prefill once).

MiniCPM-V 4.6 (hybrid DeltaNet + attention cache) is not supported by the engine.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from minicpmv_jax import generate, versions
from minicpmv_jax.batching import Buckets, PreparedBatch, VisionBatch, prepare_batch
from minicpmv_jax.errors import MiniCPMVError
from minicpmv_jax.generate import RequestShape
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.serve import slots as slot_programs
from minicpmv_jax.serve.slots import SlotCache, SlotState
from minicpmv_jax.serve.text import AnswerText
from minicpmv_jax.serve.types import (
    Delta,
    EngineStats,
    EngineStopped,
    Finished,
    QueueFull,
    Request,
    RequestError,
)
from minicpmv_jax.settings import GenerationError, GenerationSettings
from minicpmv_jax.sharding import cache_shardings

log = logging.getLogger(__name__)

# Programs traced by all engines (prefill, insert, decode); each engine also counts its own.
TRACE_COUNTS: Counter = Counter()


def _counted(fn, counts: Counter, name: str):
    """``fn`` that counts its traces in ``counts[name]`` and ``TRACE_COUNTS[name]``."""

    def traced(*args, **kwargs):
        counts[name] += 1
        TRACE_COUNTS[name] += 1
        return fn(*args, **kwargs)

    return traced


def _count_images(messages) -> int:
    n = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            n += sum(not isinstance(c, str) for c in content)
    return n


def _decode_buckets(slots: int, buckets: Sequence[int] | None) -> tuple[int, ...]:
    """Sorted row buckets in [1, slots], ``slots`` included (names the bad value)."""
    if buckets is None:
        buckets = [1 << i for i in range(slots.bit_length()) if 1 << i < slots]
    out = set()
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= slots:
            raise MiniCPMVError(f"decode_buckets: {b!r} is not a row count in [1, slots={slots}]")
        out.add(int(b))
    return tuple(sorted(out | {slots}))


class Handle:
    """A submitted request: its events (``Delta``... then one ``Finished``), cancel, result."""

    def __init__(self, engine: Engine, request: Request, request_id: str, prompt_tokens: int):
        self.request = request
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._engine = engine
        self._events: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._done = False
        # set by the engine
        self.prepared: PreparedBatch | None = None
        self.settings: GenerationSettings | None = None
        self.submitted_at = time.monotonic()

    def events(self, timeout: float | None = None) -> Iterator[Delta | Finished]:
        """Events as they come; ``timeout`` bounds each wait (``queue.Empty`` when it passes)."""
        while True:
            ev = self._events.get(timeout=timeout)
            yield ev
            if isinstance(ev, Finished):
                return

    def cancel(self) -> None:
        """Stop the request; its slot is freed before the next decode step."""
        self._cancelled.set()
        self._engine._wake()

    def result(self, timeout: float | None = None) -> Finished:
        for ev in self.events(timeout):
            if isinstance(ev, Finished):
                return ev
        raise MiniCPMVError("the request ended without a Finished event")


@dataclasses.dataclass
class _Row:
    """Host bookkeeping of a busy slot."""

    handle: Handle
    text: AnswerText
    stop_ids: frozenset[int]
    count: int = 0
    started: float = 0.0


class Engine:
    """Continuous batching over ``slots`` decode rows of ``max_len`` cache slots each.

    Args:
      model: a ``pipeline.MiniCPMV`` with its processor (2.5, 2.6 or 4.5).
      slots: decode rows (requests decoded together).
      max_len: cache slots per row; a request needs prompt tokens + max_tokens <= max_len.
      max_queue: requests waiting for a slot beyond which ``submit`` raises ``QueueFull``
        (queued requests that free rows will take do not count).
      max_images: images (or video frames) per request.
      decode_buckets: row counts the decode step is compiled for (each step runs the smallest
        that holds the busy rows); default: 1, 2, 4, ... below ``slots``, and ``slots``.
        ``slots`` is always added.
      compact: move a busy row down into a free lower slot when that makes the decode bucket
        smaller (default True).
      warmup: prefill shapes compiled by ``start()`` (``generate.RequestShape``; only
        prompt_tokens, slices and patches matter). Default: a text prompt in every token bucket
        <= max_len, and 1, 2, 4, 8 and 10 slices of 448x448-scale images (patch bucket 1024) in
        the two smallest token buckets that hold their query tokens. Other shapes compile on
        their first request (counted in ``stats().compilations_after_start``).
    """

    def __init__(
        self,
        model,
        *,
        slots: int = 8,
        max_len: int = 4096,
        max_queue: int = 64,
        max_images: int = 8,
        decode_buckets: Sequence[int] | None = None,
        compact: bool = True,
        warmup: Sequence[RequestShape] | None = None,
    ):
        if getattr(model.config, "version", None) == "4.6":
            raise MiniCPMVError(
                "the serving engine does not support MiniCPM-V 4.6 yet (its hybrid DeltaNet + "
                "attention cache has no slot layout); serve 2.5, 2.6 or 4.5"
            )
        if model.processor is None:
            raise MiniCPMVError("the serving engine needs the model's processor")
        for name, value in (("slots", slots), ("max_len", max_len), ("max_queue", max_queue)):
            if int(value) < 1:
                raise MiniCPMVError(f"Engine {name} must be >= 1, got {value}")
        self.decode_buckets = _decode_buckets(int(slots), decode_buckets)
        self.compact = bool(compact)
        self.model = model
        self.processor = model.processor
        self.sampler = model.sampler
        self.slots, self.max_len = int(slots), int(max_len)
        self.max_queue, self.max_images = int(max_queue), int(max_images)
        self.version = versions.spec(model.config.version)
        self.terminators = tuple(int(t) for t in self.processor.terminators)
        base = self.sampler.buckets
        tokens = tuple(t for t in base.tokens if t < self.max_len) + (self.max_len,)
        # chat()'s token buckets up to max_len: a prompt prefills in the bucket chat() uses
        self.buckets = Buckets(
            tokens=tokens, slices=base.slices, new_tokens=base.new_tokens, max_cache_len=max_len
        )
        self.warmup_shapes = list(warmup) if warmup is not None else self._default_warmup()
        self.vocab = int(model.config.llm.vocab_size)

        s = self.sampler
        rep = NamedSharding(s.mesh, PS())
        self.traces: Counter = Counter()  # programs this engine traced
        self._prefill = jax.jit(
            _counted(generate._prefill, self.traces, "prefill"),
            static_argnums=0,
            donate_argnums=2,
            out_shardings=(rep, KVCache(k=None, v=None, end=rep, valid=None)),
        )
        self._insert = jax.jit(
            _counted(slot_programs.insert, self.traces, "insert"),
            static_argnames="terminators",
            donate_argnums=(0, 1),
        )
        self._decode = jax.jit(
            _counted(slot_programs.decode_step, self.traces, "decode"),
            static_argnums=0,
            static_argnames=("terminators", "active"),
            donate_argnums=(2, 3),
        )
        # a row move is two programs (slots.move says why)
        self._take_row = jax.jit(_counted(slot_programs.take_row, self.traces, "take_row"))
        self._put_row = jax.jit(
            _counted(slot_programs.put_row, self.traces, "put_row"), donate_argnums=(0, 1)
        )

        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._waiting: collections.deque[Handle] = collections.deque()
        self._rows: list[_Row | None] = [None] * self.slots
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._prefill_caches: dict[int, KVCache] = {}
        self._cache: SlotCache | None = None
        self._state: SlotState | None = None
        self._traces_at_start: int | None = None
        self.requests_finished = 0
        self.tokens_generated = 0
        self._service_s = 1.0  # moving average of a request's time in a slot (retry estimate)
        self.decode_rows = 0  # rows of the last decode step (its bucket)
        self.decode_steps: Counter = Counter()  # decode steps by rows stepped
        self.rows_moved = 0
        self.seconds: Counter = Counter()  # scheduler wall time by program kind (stats())

    # -- set-up -------------------------------------------------------------------------------

    def _default_warmup(self) -> list[RequestShape]:
        q = int(self.model.config.query_num)
        shapes = [RequestShape(prompt_tokens=t) for t in self.buckets.tokens]
        # every slice bucket up to one fully sliced image (10), in the two smallest token
        # buckets that hold its slices
        for n in (b for b in self.buckets.slices if b <= 10):
            fits = [t for t in self.buckets.tokens if t >= n * (q + 2) + 16][:2]
            shapes += [RequestShape(prompt_tokens=t, slices=n, patches=1024) for t in fits]
        return shapes

    def start(self) -> None:
        """Allocate the slot cache, compile every program, start the scheduler thread."""
        if self._thread is not None:
            raise MiniCPMVError("the engine is already started")
        s = self.sampler
        cfg = s.llm_config
        with s.context():
            cache = SlotCache.init(cfg, self.slots, self.max_len, s.cache_dtype)
            self._cache = jax.device_put(cache, cache_shardings(s.mesh, cache))
            self._state = SlotState.init(self.slots, self.vocab)
        self._compile()
        self._traces_at_start = sum(self.traces.values())
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="minicpmv-engine", daemon=True)
        self._thread.start()

    def _compile(self) -> None:
        """Run every program once on placeholders (into slot 0, which is then free again)."""
        from minicpmv_jax.processor import patch_bucket_size

        patch_buckets = self.processor.patch_buckets
        seen = set()
        patch_dim = self.model.config.vision.patch_dim
        for shape in self.warmup_shapes:
            t = self.buckets.token_bucket(min(shape.prompt_tokens, self.max_len))
            i = self.buckets.slice_bucket(shape.slices)
            p = patch_bucket_size(shape.patches, patch_buckets) if i else 0
            if (t, i, p) in seen:
                continue
            seen.add((t, i, p))
            vision = VisionBatch.placeholder(i, p, patch_dim) if i else None
            n = min(shape.prompt_tokens, t)
            prepared = PreparedBatch.placeholder(1, n, t, vision)
            self._admit_arrays(prepared, 0, GenerationSettings(max_new_tokens=1), seed=0)
        for t in self.buckets.tokens:  # every insert program, whatever the warmed prefills
            if not any(k[0] == t for k in seen):
                with self.sampler.context():
                    cache = self._prefill_cache(t)
                    logits = jnp.zeros((1, self.vocab), jnp.float32)
                    greedy = GenerationSettings(max_new_tokens=1)
                    self._insert_call(cache, logits, 0, 1, 1, greedy, 0)
                    self._prefill_caches[t] = cache
        with self.sampler.context():
            for b in self.decode_buckets:
                tok, self._cache, self._state = self._decode(
                    self.sampler.graphdef,
                    self.sampler.state,
                    self._cache,
                    self._state,
                    np.zeros(self.slots, bool),
                    terminators=self.terminators,
                    active=b,
                )
                int(tok[0])
            if self.compact and len(self.decode_buckets) > 1:
                self._move_call(0, 0)

    # -- requests -----------------------------------------------------------------------------

    def submit(self, request: Request) -> Handle:
        """Check, process and queue a request (raises RequestError / QueueFull / EngineStopped)."""
        if not self._accepting:
            raise EngineStopped("the engine is not accepting requests")
        settings = self._settings(request)
        self._check_queue()
        prepared, n = self._prepare(request)
        if n + request.max_tokens > self.max_len:
            raise RequestError(
                f"the prompt has {n} tokens; with max_tokens={request.max_tokens} it needs "
                f"{n + request.max_tokens} cache slots, more than max_len={self.max_len}: lower "
                f"max_tokens to at most {self.max_len - n} or shorten the prompt"
            )
        rid = request.request_id or f"req-{next(self._ids)}"
        handle = Handle(self, request, rid, n)
        handle.prepared = prepared
        handle.settings = settings
        with self._cv:
            if not self._accepting:
                raise EngineStopped("the engine is not accepting requests")
            self._check_queue()
            self._waiting.append(handle)
            self._cv.notify_all()
        return handle

    def _check_queue(self) -> None:
        # queued requests that a free row takes at the next step boundary are not waiting for a
        # slot: a burst into free rows is accepted however late the scheduler thread runs
        busy = sum(r is not None for r in self._rows)
        waiting = len(self._waiting) - (self.slots - busy)
        if waiting >= self.max_queue:
            retry = self._service_s * (len(self._waiting) + busy) / self.slots
            raise QueueFull(
                f"{waiting} requests are waiting for a slot (max_queue={self.max_queue})",
                retry_after=max(0.5, retry),
            )

    def _settings(self, r: Request) -> GenerationSettings:
        for name in ("max_tokens", "top_k"):
            v = getattr(r, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise RequestError(f"{name} must be an integer, got {v!r}")
        if r.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {r.max_tokens}")
        if not float(r.temperature) >= 0.0:
            raise RequestError(f"temperature must be >= 0, got {r.temperature}")
        if any(not isinstance(s, str) for s in r.stop):
            raise RequestError(f"stop must hold strings, got {r.stop!r}")
        for t in r.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise RequestError(f"stop_token_ids must hold integers, got {t!r}")
            if not 0 <= t < self.vocab:
                raise RequestError(f"stop_token_ids: {t} is not a token id of this model")
        n_images = _count_images(r.messages)
        if n_images > self.max_images:
            raise RequestError(
                f"messages: {n_images} images, more than max_images={self.max_images}"
            )
        sample = float(r.temperature) > 0.0
        try:
            return GenerationSettings(
                max_new_tokens=int(r.max_tokens),
                do_sample=sample,
                temperature=float(r.temperature) if sample else 1.0,
                top_k=int(r.top_k),
                top_p=float(r.top_p),
                repetition_penalty=float(r.repetition_penalty),
                seed=r.seed,
            )
        except GenerationError as e:
            raise RequestError(str(e).replace("max_new_tokens", "max_tokens")) from None

    def _prepare(self, r: Request) -> tuple[PreparedBatch, int]:
        if r.enable_thinking and not self.version.thinking:
            raise RequestError(
                f"enable_thinking: MiniCPM-V {self.version.name} has no thinking mode"
            )
        tids = None if r.temporal_ids is None else [list(g) for g in r.temporal_ids]
        try:
            out = self.processor(
                r.messages,
                max_slice_nums=r.max_slice_nums,
                use_image_id=r.use_image_id,
                enable_thinking=r.enable_thinking,
                system_prompt=r.system_prompt,
                temporal_ids=tids,
            )
        except (MiniCPMVError, ValueError, TypeError, KeyError, OSError) as e:
            raise RequestError(f"messages: {e}") from None
        n = int(np.asarray(out["input_ids"]).shape[-1])
        if n >= self.max_len:
            raise RequestError(
                f"the prompt has {n} tokens, the cache holds max_len={self.max_len}: shorten it "
                "or use fewer / smaller images (max_slice_nums)"
            )
        return prepare_batch([out], self.buckets, int(self.model.config.query_num)), n

    def stats(self) -> EngineStats:
        with self._lock:
            active = sum(r is not None for r in self._rows)
            waiting = len(self._waiting)
            steps = dict(self.decode_steps)
        after = 0
        if self._traces_at_start is not None:
            after = sum(self.traces.values()) - self._traces_at_start
        return EngineStats(
            slots=self.slots,
            active_slots=active,
            queue_length=waiting,
            requests_finished=self.requests_finished,
            tokens_generated=self.tokens_generated,
            compilations_after_start=after,
            decode_buckets=self.decode_buckets,
            decode_rows=self.decode_rows,
            decode_steps=steps,
            rows_moved=self.rows_moved,
            prefill_s=self.seconds["prefill"],
            decode_s=self.seconds["decode"],
            move_s=self.seconds["move"],
        )

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; ``drain``: finish the queued and running requests first, else cancel
        them. Then stop the scheduler thread (waits up to ``timeout`` seconds, then cancels)."""
        with self._cv:
            self._accepting = False
            self._stopping = True
            if not drain:
                for h in self._handles():
                    h._cancelled.set()
            self._cv.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():  # the drain took too long: cancel what is left
            with self._cv:
                for h in self._handles():
                    h._cancelled.set()
                self._cv.notify_all()
            self._thread.join(timeout)

    def _handles(self) -> list[Handle]:
        return [r.handle for r in self._rows if r is not None] + list(self._waiting)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # -- the scheduler thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._drop_cancelled()
                admit = []
                free = [i for i, r in enumerate(self._rows) if r is None]
                while self._waiting and free:
                    admit.append((self._waiting.popleft(), free.pop(0)))
                busy = any(r is not None for r in self._rows)
                if not admit and not busy:
                    if self._stopping and not self._waiting:
                        return
                    self._cv.wait(0.1)
                    continue
                for h, i in admit:  # reserved now: stats() counts them as active
                    self._rows[i] = _Row(h, None, frozenset())
            try:
                for h, i in admit:
                    self._admit(h, i)
                if self.compact:
                    self._compact()
                if any(r is not None for r in self._rows):
                    self._step()
            except Exception as e:
                log.exception("the engine loop failed")
                for i, r in enumerate(self._rows):
                    if r is not None:
                        self._finish(i, "error", f"engine failure: {e}")

    def _drop_cancelled(self) -> None:
        for h in [h for h in self._waiting if h._cancelled.is_set()]:
            self._waiting.remove(h)
            self._finish_handle(h, Finished("cancelled", "", h.prompt_tokens, 0))
        for i, r in enumerate(self._rows):
            if r is not None and r.text is not None and r.handle._cancelled.is_set():
                self._finish(i, "cancelled")

    def _admit(self, h: Handle, slot: int) -> None:
        r = h.request
        text = AnswerText(self.processor, r.enable_thinking, r.stop)
        stop_ids = frozenset(int(t) for t in r.stop_token_ids)
        row = _Row(h, text, stop_ids, started=time.monotonic())
        self._rows[slot] = row
        if h._cancelled.is_set():
            return self._finish(slot, "cancelled")
        try:
            seed = secrets.randbits(32) if h.settings.seed is None else h.settings.seed
            t0 = time.perf_counter()
            tok = self._admit_arrays(h.prepared, slot, h.settings, seed)
            self.seconds["prefill"] += time.perf_counter() - t0
        except Exception as e:
            log.exception("%s: prefill failed", h.request_id)
            return self._finish(slot, "error", f"prefill failed: {e}")
        h.prepared = None  # the pixels are no longer needed
        self._on_token(slot, tok)

    def _prefill_cache(self, t: int) -> KVCache:
        cache = self._prefill_caches.pop(t, None)
        if cache is None:
            s = self.sampler
            cache = KVCache.init(s.llm_config, 1, t, s.cache_dtype)
            cache = jax.device_put(cache, cache_shardings(s.mesh, cache))
        return cache

    def _admit_arrays(self, prepared: PreparedBatch, slot: int, settings, seed: int) -> int:
        """Prefill one prompt and insert it into ``slot``; returns its first token."""
        s = self.sampler
        t = prepared.input_ids.shape[1]
        with s.context():
            logits, cache = self._prefill(s.graphdef, s.state, self._prefill_cache(t), prepared)
            tok = self._insert_call(
                cache,
                logits,
                slot,
                prepared.lengths[0],
                int(prepared.next_position[0]),
                settings,
                seed,
            )
            self._prefill_caches[t] = cache
        return tok

    def _insert_call(self, cache, logits, slot, length, position, settings, seed) -> int:
        i32 = np.int32
        tok, self._cache, self._state = self._insert(
            self._cache,
            self._state,
            cache,
            logits,
            i32(slot),
            i32(length),
            i32(position),
            settings.params(),
            np.bool_(settings.do_sample),
            np.uint32(seed),
            terminators=self.terminators,
        )
        return int(tok)

    def _bucket(self, rows: int) -> int:
        """The smallest decode bucket of at least ``rows`` rows."""
        return next(b for b in self.decode_buckets if b >= rows)

    def _compact(self) -> None:
        """Move the highest busy rows into the lowest free slots while that shrinks the bucket."""
        while True:
            busy = [i for i, r in enumerate(self._rows) if r is not None]
            if not busy or self._bucket(busy[-1] + 1) == self._bucket(len(busy)):
                return
            src = busy[-1]
            dst = next(i for i, r in enumerate(self._rows) if r is None)
            t0 = time.perf_counter()
            self._move_call(src, dst)
            np.asarray(self._cache.end)  # the move's end (its time, not the next step's)
            self.seconds["move"] += time.perf_counter() - t0
            with self._lock:
                self._rows[dst], self._rows[src] = self._rows[src], None
            self.rows_moved += 1

    def _move_call(self, src: int, dst: int) -> None:
        with self.sampler.context():
            row, row_state = self._take_row(self._cache, self._state, np.int32(src))
            self._cache, self._state = self._put_row(
                self._cache, self._state, row, row_state, np.int32(dst)
            )

    def _step(self) -> None:
        s = self.sampler
        busy = np.array([r is not None for r in self._rows])
        rows = self._bucket(int(np.flatnonzero(busy)[-1]) + 1)
        t0 = time.perf_counter()
        try:
            with s.context():
                tok, self._cache, self._state = self._decode(
                    s.graphdef,
                    s.state,
                    self._cache,
                    self._state,
                    busy,
                    terminators=self.terminators,
                    active=rows,
                )
                tokens = np.asarray(tok)
            self.seconds["decode"] += time.perf_counter() - t0
            with self._lock:
                self.decode_rows = rows
                self.decode_steps[rows] += 1
        except Exception as e:
            log.exception("decode step failed")
            for i, r in enumerate(self._rows):
                if r is not None:
                    self._finish(i, "error", f"decode failed: {e}")
            return
        for i, r in enumerate(self._rows):
            if r is not None and r.text is not None:
                self._on_token(i, int(tokens[i]))

    def _on_token(self, slot: int, tok: int) -> None:
        row = self._rows[slot]
        row.count += 1
        self.tokens_generated += 1
        h = row.handle
        reason = None
        if tok in self.terminators or tok in row.stop_ids:
            reason = "stop"
            piece = ""
        else:
            piece = row.text.push(tok)
            if row.text.stopped:
                reason = "stop"
            elif row.count >= h.request.max_tokens:
                reason = "length"
        if reason is not None and not row.text.stopped:
            piece += row.text.finish()
        h._events.put(Delta(piece, (tok,)))
        if reason is not None:
            self._finish(slot, reason)

    def _finish(self, slot: int, reason: str, error: str | None = None) -> None:
        row = self._rows[slot]
        self._rows[slot] = None
        text = row.text.text if row.text is not None else ""
        fin = Finished(reason, text, row.handle.prompt_tokens, row.count, error=error)
        self._finish_handle(row.handle, fin)
        if row.started:
            a = 0.2
            self._service_s = (1 - a) * self._service_s + a * (time.monotonic() - row.started)

    def _finish_handle(self, h: Handle, fin: Finished) -> None:
        if h._done:
            return
        h._done = True
        self.requests_finished += 1
        h._events.put(fin)
