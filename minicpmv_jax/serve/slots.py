"""The engine's device side: a KV cache of decode slots and the two programs that use it.

* ``SlotCache``: K/V ``[L, SLOTS, S, K, H]`` with a write index PER ROW (``end`` int32 [SLOTS]) and
  a validity mask per row and slot.
* ``SlotRows``: the first ``rows`` rows of a ``SlotCache`` as the LLM sees them. It has what the
  LLM uses of ``kv_cache.KVCache`` (``append`` / ``mask`` / ``write`` / ``max_len`` and
  ``k[layer]`` / ``v[layer]``), so ``llm.Llm`` runs on it unchanged; reads and writes go to the
  whole buffers in place (no copy of the cache), restricted to the first ``rows`` rows.
* ``SlotState``: each row's sampling state and parameters as arrays (last token, RoPE position,
  step, token history, PRNG key, temperature / top-k / top-p / repetition penalty, greedy or
  sampled), so requests with different settings share one compiled step.
* ``insert``: copies a request's prefilled B=1 cache ``[L, 1, T, K, H]`` into one slot (a traced
  slot index: one program per token bucket T), selects its first token from the prefill logits
  and resets that row's state.
* ``decode_step``: one token for each of the first ``rows`` rows (a static row bucket: one
  program per bucket): the LLM on each row's last token at its own position, then per-row logits
  processing and selection (``sampling.process_logits`` / ``warp_for_sampling`` per row, so each
  row's numbers are those of a batch-1 ``chat()``; a multi-row step's float32 logits come from
  ``step_logits``). Rows from ``rows`` on are left as they are;
  free rows below ``rows`` step too, greedily (the engine's busy-row mask clears their sample
  flag).
* ``take_row`` / ``put_row``: copy one row (cache and state) to another row, so the engine can
  keep its busy rows at the front and step a smaller bucket (two programs: see ``move``).

Rows below ``rows`` that hold no request still run (static shapes); the host ignores their
tokens. A row's selection depends only on its own logits, history and key, never on the other
rows.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax import sampling
from minicpmv_jax.config import LlmConfig
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.layers import OutInDense
from minicpmv_jax.sampling import SamplingParams
from minicpmv_jax.sharding import constrain_cache


@flax.struct.dataclass
class SlotCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    end: jax.Array  # int32 [B]: each row's first free slot
    valid: jax.Array  # bool [B, S]: slot holds a real token of the row's request

    @classmethod
    def init(cls, cfg: LlmConfig, rows: int, max_len: int, dtype) -> SlotCache:
        shape = (cfg.num_layers, rows, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            end=jnp.zeros((rows,), jnp.int32),
            valid=jnp.zeros((rows, max_len), bool),
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def rows(self, n: int) -> SlotRows:
        """The first ``n`` rows, as the LLM reads and writes them (``SlotRows.cache()`` back)."""
        if not 1 <= n <= self.valid.shape[0]:
            raise ValueError(f"rows: {n} is not in [1, {self.valid.shape[0]}]")
        return SlotRows(k=LayerRows(self.k, n), v=LayerRows(self.v, n), end=self.end,
                        valid=self.valid, rows=n)  # fmt: skip


@flax.struct.dataclass
class LayerRows:
    """A stacked K or V buffer read the way attention reads a cache, ``x[layer]``, restricted to
    the first ``rows`` rows: ``[rows, S, K, H]``. The buffer itself stays whole (donated, updated
    in place by ``SlotRows.write``)."""

    buf: jax.Array  # [L, B, S, K, H]
    rows: int = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:  # what sharding.constrain reads (the whole buffer)
        return self.buf.shape

    def __getitem__(self, layer) -> jax.Array:
        x = jax.lax.dynamic_index_in_dim(self.buf, layer, 0, keepdims=False)  # [B, S, K, H]
        return x[: self.rows]


@flax.struct.dataclass
class SlotRows:
    """Rows ``[0, rows)`` of a ``SlotCache``: the cache a decode step of ``rows`` rows runs on."""

    k: LayerRows
    v: LayerRows
    end: jax.Array  # int32 [B] (every row; only the first ``rows`` are read or advanced)
    valid: jax.Array  # bool [B, S]
    rows: int = flax.struct.field(pytree_node=False)

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def cache(self) -> SlotCache:
        return SlotCache(k=self.k.buf, v=self.v.buf, end=self.end, valid=self.valid)

    def _slots(self, start: jax.Array, t: int) -> jax.Array:
        return start[:, None] + jnp.arange(t)[None, :]  # [rows, T]

    def append(self, token_valid: jax.Array) -> tuple[SlotRows, jax.Array]:
        """Reserve T slots per row at its own ``end``; returns (cache, start int32 [rows]).

        A full row (an idle slot that kept stepping) stops advancing.
        """
        n, t = self.rows, token_valid.shape[1]
        start = self.end[:n]
        valid = self.valid.at[jnp.arange(n)[:, None], self._slots(start, t)].set(
            token_valid.astype(bool), mode="drop"
        )
        end = self.end.at[:n].set(jnp.minimum(start + t, self.max_len))
        return self.replace(end=end, valid=valid), start

    def mask(self, start: jax.Array, t: int) -> jax.Array:
        """bool [rows, 1, T, S]: row b's query i (slot start[b] + i) attends its valid slots <= it."""
        causal = jnp.arange(self.max_len)[None, None, :] <= self._slots(start, t)[:, :, None]
        return (self.valid[: self.rows, None, :] & causal)[:, None]

    def write(self, layer, start: jax.Array, k: jax.Array, v: jax.Array) -> SlotRows:
        """Store k, v [rows, T, K, H] of one layer at each row's slots [start, start + T).

        Up to two rows: one ``dynamic_update_slice`` per row, which XLA:CPU runs in place in
        bfloat16 too (one scatter for all rows copies a whole bfloat16 cache every step). More
        rows: one scatter (in place in float32; in bfloat16 a chain of per-row updates measured
        slower still: 1.9 s against 0.32 s for a 16-row step, 1 layer, 16 x 4096 slots).
        A full row (a free slot that kept stepping) has its write clamped onto its last slots
        (per row) or dropped (scatter); only free rows get there.
        """
        if k.shape[0] > 2:
            rows = jnp.arange(k.shape[0])[:, None]
            slots = self._slots(start, k.shape[1])

            def put(buf: LayerRows, x):
                new = buf.buf.at[layer, rows, slots].set(x.astype(buf.buf.dtype), mode="drop")
                return LayerRows(new, self.rows)

        else:

            def put(buf: LayerRows, x):
                new, x = buf.buf, x.astype(buf.buf.dtype)
                for b in range(x.shape[0]):  # [1, 1, T, K, H] at (layer, b, start[b], 0, 0)
                    at = (layer, b, start[b], 0, 0)
                    new = jax.lax.dynamic_update_slice(new, x[b][None, None], at)
                return LayerRows(new, self.rows)

        return self.replace(k=put(self.k, k), v=put(self.v, v))


@flax.struct.dataclass
class SlotState:
    """Per-row decoding state and settings (B = SLOTS rows)."""

    token: jax.Array  # int32 [B]: last selected token (the next forward pass's input)
    position: jax.Array  # int32 [B]: RoPE position of ``token``
    step: jax.Array  # int32 [B]: tokens selected so far
    presence: jax.Array  # bool [B, V]: token history (repetition penalty)
    key: jax.Array  # uint32 [B, ...]: PRNG key data
    params: SamplingParams  # fields [B]
    do_sample: jax.Array  # bool [B]: False = greedy (argmax of the processed logits)

    @classmethod
    def init(cls, rows: int, vocab: int) -> SlotState:
        key = jax.random.key_data(jax.random.key(0))
        params = SamplingParams.create()
        return cls(
            token=jnp.zeros((rows,), jnp.int32),
            position=jnp.zeros((rows,), jnp.int32),
            step=jnp.zeros((rows,), jnp.int32),
            presence=jnp.zeros((rows, vocab), bool),
            key=jnp.broadcast_to(key, (rows,) + key.shape),
            params=jax.tree.map(lambda x: jnp.broadcast_to(x, (rows,)), params),
            do_sample=jnp.zeros((rows,), bool),
        )


def select(rows: SlotState, logits: jax.Array, terminators: tuple[int, ...]):
    """Each row's next token from its raw logits [B, V], as ``sampling.sample_step`` selects it
    for a batch of one (the same processors, the same key schedule). -> (int32 [B], state)."""

    def process(lg, presence, step, params):
        return sampling.process_logits(lg[None], presence[None], step, params, terminators)[0]

    scores = jax.vmap(process)(logits, rows.presence, rows.step, rows.params)
    keys = jax.vmap(jax.random.split)(jax.random.wrap_key_data(rows.key))  # [B, 2]
    greedy = jnp.argmax(scores, axis=-1).astype(jnp.int32)

    def draw(args):
        key, s, params, do_sample = args

        def warp_and_draw(_):
            warped = sampling.warp_for_sampling(s[None], params)
            return jax.random.categorical(key, warped, axis=-1)[0].astype(jnp.int32)

        return jax.lax.cond(do_sample, warp_and_draw, lambda _: jnp.int32(0), None)

    # row by row, so the sort of top-k / top-p (tens of ms per row over a 151k vocabulary on a
    # CPU) runs only for the rows that sample, not for every row of a step where one does
    sampled = jax.lax.map(draw, (keys[:, 1], scores, rows.params, rows.do_sample))
    tok = jnp.where(rows.do_sample, sampled, greedy)
    return tok, rows.replace(
        token=tok,
        step=rows.step + 1,
        presence=sampling.add_tokens(rows.presence, tok),
        key=jax.random.key_data(keys[:, 0]),
    )


def insert(
    cache: SlotCache,
    rows: SlotState,
    prefill: KVCache,
    logits: jax.Array,
    slot: jax.Array,
    length: jax.Array,
    position: jax.Array,
    params: SamplingParams,
    do_sample: jax.Array,
    seed: jax.Array,
    *,
    terminators: tuple[int, ...],
):
    """Put a prefilled request into row ``slot`` and select its first token.

    Args:
      cache / rows: the slot cache and state (donated).
      prefill: the request's B=1 cache [L, 1, T, K, H] (T <= S); its valid row marks the prompt.
      logits: float32 [1, V] of the prompt's last token; slot, length (prompt tokens), position
        (RoPE position of the first new token): int32 []; params: scalar ``SamplingParams``;
        do_sample: bool []; seed: uint32 [] (the row's key is ``jax.random.key(seed)``).
    Returns:
      (first token int32 [], cache, rows).
    """
    t = prefill.valid.shape[1]

    def put(buf, x):  # [L, B, S, K, H] <- [L, 1, T, K, H] at (slot, 0)
        return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), (0, slot, 0, 0, 0))

    row_valid = jnp.zeros((1, cache.max_len), bool).at[:, :t].set(prefill.valid)
    cache = cache.replace(
        k=put(cache.k, prefill.k),
        v=put(cache.v, prefill.v),
        # generated tokens follow the prompt's last token (the bucket's pad slots are reused)
        end=cache.end.at[slot].set(length),
        valid=jax.lax.dynamic_update_slice(cache.valid, row_valid, (slot, 0)),
    )
    one = SlotState(
        token=jnp.zeros((1,), jnp.int32),
        position=position[None],
        step=jnp.zeros((1,), jnp.int32),
        presence=jnp.zeros((1, logits.shape[-1]), bool),
        key=jax.random.key_data(jax.random.key(seed))[None],
        params=jax.tree.map(lambda x: x[None], params),
        do_sample=do_sample[None],
    )
    tok, one = select(one, logits, terminators)
    rows = jax.tree.map(
        lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), slot, 0),
        rows,
        one,
    )
    return tok[0], constrain_cache(cache), rows


# Multi-row decode steps of engines with at most this many slots take a float32 lm_head's
# logits as a multiply-and-sum over D (``step_logits``); False: the dense layer's dot.
ROW_REDUCE_LOGITS = True
ROW_REDUCE_MAX_SLOTS = 16


def step_logits(llm, h: jax.Array, slots: int) -> jax.Array:
    """float32 logits [R, V] of a decode step's final hidden states h [R, D].

    On the CPU backend, for R >= 2 rows of an engine of at most ``ROW_REDUCE_MAX_SLOTS`` slots and
    a float32 ``OutInDense`` lm_head: ``sum_d W[v, d] * h[r, d]``, always over ``slots`` rows (h
    zero-padded), so a row's logits do not depend on the step's row bucket (the reduction's
    order depends on the row count) nor on its position (checked in the tests). XLA:CPU runs the
    [V, D] x [D, R] product for a few rows as a general matrix product that repacks the whole
    weight (2.6's 3584 x 151,666 float32 lm_head: 139 ms at 16 rows, 117 ms at 2, against 50 ms
    for one row); the fused multiply-and-sum reads it once: 91 ms over 16 rows
    (BENCHMARKS.md "Serving", the lm_head of a 16-row step). Its values differ from the dot's
    by summation order only, as the dot's for several rows already differ from its one-row
    product (max |diff| 4e-6 on 2.6's logits). One row (and every other case) takes
    ``llm.logits``: a lone request's step is chat()'s.
    """
    head = llm.lm_head
    r = h.shape[0]
    if (
        not ROW_REDUCE_LOGITS
        or r < 2
        or slots > ROW_REDUCE_MAX_SLOTS
        or jax.default_backend() != "cpu"
        or not isinstance(head, OutInDense)
        or head.bias is not None
        or head.dtype not in (None, jnp.float32)
        or head.weight[...].dtype != jnp.float32
        or h.dtype != jnp.float32
    ):
        return llm.logits(h[:, None])[:, 0]
    w = head.weight[...]  # [V, D]
    hp = jnp.zeros((slots, h.shape[1]), h.dtype).at[:r].set(h)  # [slots, D]
    y = (w[:, None, :] * hp[None, :, :]).sum(-1)  # [V, slots]
    return y[:, :r].T.astype(jnp.float32)


def decode_step(
    graphdef,
    state,
    cache: SlotCache,
    rows: SlotState,
    busy: jax.Array,
    *,
    terminators,
    active: int,
):
    """One new token for each of rows [0, active) (static). -> (int32 [active], cache, rows).

    ``busy``: bool [B], the rows that hold a request. A free row keeps stepping (static shapes)
    but its sample flag is cleared, so a finished sampled request's row stops running the sort
    of top-k / top-p every step (its tokens are ignored either way).
    The cache and state of rows >= ``active`` are returned unchanged; the cache buffers are
    updated in place (the caller donates them).
    """
    module = nnx.merge(graphdef, state)
    view = cache.rows(active)
    sub = jax.tree.map(lambda x: x[:active], rows)
    sub = sub.replace(do_sample=sub.do_sample & busy[:active])
    x = module.llm.embed(sub.token[:, None])  # [active, 1, D]
    # generated tokens are always attended (generate() appends ones to the attention mask)
    valid = jnp.ones((x.shape[0], 1), bool)
    h, view = module.llm.hidden(x, sub.position[:, None], view, valid)
    logits = step_logits(module.llm, h[:, 0], rows.token.shape[0])
    tok, sub = select(sub, logits, terminators)
    sub = sub.replace(position=sub.position + 1)
    rows = jax.tree.map(
        lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), 0, 0),
        rows,
        sub,
    )
    return tok, constrain_cache(view.cache()), rows


def take_row(cache: SlotCache, rows: SlotState, src: jax.Array) -> tuple[SlotCache, SlotState]:
    """Row ``src`` (int32 []) of the cache and state, as a one-row cache and state."""

    def take(buf, axis):
        return jax.lax.dynamic_slice_in_dim(buf, src, 1, axis)

    row = SlotCache(
        k=take(cache.k, 1), v=take(cache.v, 1), end=take(cache.end, 0), valid=take(cache.valid, 0)
    )
    return row, jax.tree.map(lambda x: take(x, 0), rows)


def put_row(
    cache: SlotCache, rows: SlotState, row: SlotCache, row_state: SlotState, dst: jax.Array
) -> tuple[SlotCache, SlotState]:
    """Write a one-row cache and state (``take_row``'s) onto row ``dst`` (int32 [])."""

    def put(buf, x, axis):
        return jax.lax.dynamic_update_slice_in_dim(buf, x, dst, axis)

    cache = cache.replace(
        k=put(cache.k, row.k, 1),
        v=put(cache.v, row.v, 1),
        end=put(cache.end, row.end, 0),
        valid=put(cache.valid, row.valid, 0),
    )
    return constrain_cache(cache), jax.tree.map(lambda b, x: put(b, x, 0), rows, row_state)


def move(cache: SlotCache, rows: SlotState, src: jax.Array, dst: jax.Array):
    """Copy row ``src`` (cache and state) onto row ``dst``: int32 [] each. -> (cache, rows).

    Row ``src`` keeps its contents (the engine treats it as free). In one program (``take_row``
    then ``put_row``) for tests; the engine runs the two as separate programs: fused into one,
    XLA:CPU copies a whole bfloat16 cache (twice) to move one row of it."""
    row, row_state = take_row(cache, rows, src)
    return put_row(cache, rows, row, row_state, dst)
