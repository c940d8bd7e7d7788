"""Host-side batching: processor outputs -> one padded, typed batch with static shapes.

The one place that knows how a request is laid out for the compiled programs, used by the
prompt logits, prefill, warm-up and memory reports alike:

* ``Buckets``: the shape buckets (prompt tokens T, slices I, new tokens M);
* ``VisionBatch``: every image slice of a request, stacked and padded to a slice bucket;
* ``PreparedBatch``: the prompt rows of a request plus their ``VisionBatch`` (``prepare_batch``).

Both are ``flax.struct`` dataclasses of numpy arrays: they go into ``jax.jit`` as pytrees, and
their ``abstract()`` gives the ShapeDtypeStructs a program is lowered with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import numpy as np

from minicpmv_jax.image import aligned_zeros, grow_rows


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
    # 10 = one image fully sliced at max_slice_nums 9 (source + 9): the common large-image case;
    # 5 = a 4:3 photo (source + a 2 x 2 grid), which bucket 8 padded by 60% more tower work
    slices: tuple[int, ...] = (1, 2, 4, 5, 8, 10, 16, 32, 64)
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


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


@flax.struct.dataclass
class VisionBatch:
    """The image slices of a request (numpy, I slices of P patches).

    A slice's arrays are those of its conversation's processor output; padding slices (from
    ``pad_to``) are all-invalid: no valid patch, group -1 (dropped by the resampler), a 1x1 grid,
    and one attended (zero) key so the tower's softmax stays finite.
    """

    pixel_patches: np.ndarray  # float32 [I, P, 3*14*14]
    position_ids: np.ndarray  # int32 [I, P]: position-table id of each patch
    vision_mask: np.ndarray  # bool [I, P]: keys the vision tower attends
    patch_valid: np.ndarray  # bool [I, P]: keys the resampler attends
    tgt_sizes: np.ndarray  # int32 [I, 2]: patch grid (h, w)
    temporal_ids: np.ndarray  # int32 [I]: frame time id, -1 = still image
    group_index: np.ndarray  # int32 [I]: resampler output group, -1 = padding

    @property
    def num_slices(self) -> int:
        return self.pixel_patches.shape[0]

    @property
    def num_groups(self) -> int:
        """Groups are at most slices: the static bound of the resampler's output rows."""
        return self.group_index.shape[0]

    @classmethod
    def stack(cls, outputs: Sequence[Mapping[str, Any]]) -> VisionBatch:
        """Concatenate the slices of several conversations' processor outputs, in order.

        Patch arrays are padded to the largest patch bucket among them; the resampler groups of
        conversation r follow those of conversations < r. ``group_sizes`` (default: one slice
        per group) and ``temporal_ids`` (default -1) may be absent.
        """
        parts = [o for o in outputs if np.asarray(o["tgt_sizes"]).reshape(-1, 2).shape[0]]
        if not parts:
            return cls.placeholder(0, 0, 0)
        p = max(int(np.asarray(o["pixel_patches"]).shape[1]) for o in parts)

        def cat(name, fill, dtype):
            xs = [np.asarray(o[name], dtype) for o in parts]  # no copy when the dtype matches
            if len(xs) == 1 and xs[0].shape[1] == p:  # one conversation (a video's pixels are
                return xs[0]  # GBs): its arrays as they are, no copy
            n = sum(x.shape[0] for x in xs)
            out = aligned_zeros((n, p, *xs[0].shape[2:]), dtype)  # [I, P, ...]
            if fill:
                out[...] = fill
            start = 0
            for x in xs:  # pad each conversation's P to the batch's
                out[start : start + x.shape[0], : x.shape[1]] = x
                start += x.shape[0]
            return out

        groups, temporal, offset = [], [], 0
        for o in parts:
            n = np.asarray(o["tgt_sizes"]).reshape(-1, 2).shape[0]
            sizes = np.asarray(o.get("group_sizes", np.ones((n,), np.int64))).reshape(-1)
            groups.append(np.repeat(np.arange(len(sizes)) + offset, sizes))
            offset += len(sizes)
            tids = o.get("temporal_ids")
            temporal.append(np.full((n,), -1) if tids is None else np.asarray(tids).reshape(-1))
        return cls(
            pixel_patches=cat("pixel_patches", 0, np.float32),
            position_ids=cat("position_ids", 0, np.int32),
            vision_mask=cat("vision_mask", False, bool),
            patch_valid=cat("patch_valid", False, bool),
            tgt_sizes=np.concatenate(
                [np.asarray(o["tgt_sizes"]).reshape(-1, 2) for o in parts]
            ).astype(np.int32),
            temporal_ids=np.concatenate(temporal).astype(np.int32),
            group_index=np.concatenate(groups).astype(np.int32),
        )

    def pad_to(self, slices: int) -> VisionBatch:
        """Append all-invalid slices up to ``slices`` (a slice bucket)."""
        n = self.num_slices
        if slices < n:
            raise ValueError(f"cannot pad {n} slices to {slices}")
        if slices == n:
            return self

        def pad(x, fill):  # one aligned allocation (XLA:CPU then takes it without a copy)
            out = aligned_zeros((slices, *x.shape[1:]), x.dtype)
            out[:n] = x
            out[n:] = fill
            return out

        vision_mask = pad(self.vision_mask, False)
        vision_mask[n:, 0] = True
        # the processor reserves room for the padding slices: no copy of the pixels (GBs)
        patches = grow_rows(self.pixel_patches, slices)
        return VisionBatch(
            pixel_patches=pad(self.pixel_patches, 0) if patches is None else patches,
            position_ids=pad(self.position_ids, 0),
            vision_mask=vision_mask,
            patch_valid=pad(self.patch_valid, False),
            tgt_sizes=pad(self.tgt_sizes, 1),
            temporal_ids=pad(self.temporal_ids, -1),
            group_index=pad(self.group_index, -1),
        )

    @classmethod
    def placeholder(cls, slices: int, patches: int, patch_dim: int) -> VisionBatch:
        """Zeros with the shapes and dtypes of ``slices`` real slices of ``patches`` patches
        (warm-up: one attended key and one group per slice keep every value finite)."""
        mask = np.zeros((slices, patches), bool)
        mask[:, :1] = True
        return cls(
            pixel_patches=aligned_zeros((slices, patches, patch_dim), np.float32),
            position_ids=np.zeros((slices, patches), np.int32),
            vision_mask=mask,
            patch_valid=mask.copy(),
            tgt_sizes=np.ones((slices, 2), np.int32),
            temporal_ids=np.full((slices,), -1, np.int32),
            group_index=np.arange(slices, dtype=np.int32),
        )

    def abstract(self) -> VisionBatch:
        """The same tree of ``jax.ShapeDtypeStruct`` (lowering without data)."""
        return _abstract(self)


@flax.struct.dataclass
class PreparedBatch:
    """Device-ready arrays of one request (numpy; shapes static per bucket).

    B rows (conversations) right-padded to the token bucket T; pad slots are never attended.
    """

    input_ids: np.ndarray  # int32 [B, T]
    token_valid: np.ndarray  # bool [B, T]: attended prompt tokens
    positions: np.ndarray  # int32 [B, T]: RoPE positions
    last_index: np.ndarray  # int32 [B]: the row's last prompt token
    next_position: np.ndarray  # int32 [B]: RoPE position of the first new token
    image_slot: np.ndarray  # int32 [B, T]: row into the [G * Q] features, -1 = text
    vision: VisionBatch | None  # None: text only

    @property
    def lengths(self) -> list[int]:
        """True prompt length of each row."""
        return [int(i) + 1 for i in self.last_index]

    @property
    def shape_key(self) -> tuple:
        v = self.vision
        return self.input_ids.shape + ((0, 0) if v is None else v.pixel_patches.shape[:2])

    @classmethod
    def placeholder(
        cls, rows: int, tokens: int, bucket: int, vision: VisionBatch | None = None
    ) -> PreparedBatch:
        """Zeros with the shapes and dtypes ``prepare_batch`` gives ``rows`` prompts of
        ``tokens`` tokens in token bucket ``bucket`` (warm-up, memory reports)."""
        valid = np.zeros((rows, bucket), bool)
        valid[:, :tokens] = True
        return cls(
            input_ids=np.zeros((rows, bucket), np.int32),
            token_valid=valid,
            positions=np.broadcast_to(np.arange(bucket, dtype=np.int32), (rows, bucket)).copy(),
            last_index=np.full((rows,), tokens - 1, np.int32),
            next_position=np.full((rows,), tokens, np.int32),
            image_slot=np.full((rows, bucket), -1, np.int32),
            vision=vision,
        )

    def abstract(self) -> PreparedBatch:
        """The same tree of ``jax.ShapeDtypeStruct`` (lowering without data)."""
        return _abstract(self)


def image_slot_from_bounds(image_bound: np.ndarray, t: int, q: int) -> np.ndarray:
    """int32 [T]: feature row g*Q + j for token s_g + j of bound g = [s_g, e_g); -1 elsewhere."""
    slot = np.full((t,), -1, np.int32)
    for g, (s, e) in enumerate(np.asarray(image_bound, np.int64).reshape(-1, 2)):
        if e - s != q:
            raise ValueError(f"image_bound row {g} = [{s}, {e}) does not hold {q} tokens")
        slot[s:e] = np.arange(g * q, (g + 1) * q, dtype=np.int32)
    return slot


def prompt_positions(attention_mask: np.ndarray) -> np.ndarray:
    """RoPE positions transformers derives from the attention mask during generate().

    ``position_ids = cumsum(mask) - 1`` with masked positions set to 1 (``prepare_inputs_for_
    generation``). Quirk (2.6 / 4.5 official): the mask is ``input_ids != 0``, so a genuine id-0
    token in the prompt is masked and the tokens after it are shifted by one position.
    """
    m = attention_mask.astype(np.int64)
    pos = np.cumsum(m, axis=-1) - 1
    return np.where(m > 0, pos, 1).astype(np.int32)


def prepare_batch(
    outputs: Sequence[Mapping[str, Any]], buckets: Buckets, query_num: int
) -> PreparedBatch:
    """Stack processor outputs of several conversations into one padded batch.

    Prompts are right-padded to the token bucket (pad slots are never attended, positions are
    per row, so the padding changes no logits). Slices of all conversations are concatenated in
    order (``VisionBatch.stack``) and padded to the slice bucket. Each conversation keeps its own
    vision mask and position ids, so a batched conversation sees exactly what it sees alone (for
    2.5 this deliberately differs from the official batched call, whose mask and strip positions
    span every slice of the batch). A missing ``attention_mask`` attends every token.
    """
    b = len(outputs)
    lengths = [int(np.asarray(o["input_ids"]).shape[-1]) for o in outputs]
    t = buckets.token_bucket(max(lengths))
    ids = np.zeros((b, t), np.int32)
    valid = np.zeros((b, t), bool)
    pos = np.zeros((b, t), np.int32)
    slot = np.full((b, t), -1, np.int32)
    next_pos = np.zeros((b,), np.int32)
    rows_before = 0  # feature rows of the conversations before this one
    for r, (o, n) in enumerate(zip(outputs, lengths, strict=True)):
        ids[r, :n] = np.asarray(o["input_ids"]).reshape(-1)
        mask = o.get("attention_mask")
        mask = np.ones((n,), bool) if mask is None else np.asarray(mask).reshape(-1).astype(bool)
        valid[r, :n] = mask
        pos[r, :n] = prompt_positions(mask)
        next_pos[r] = int(mask.sum())  # cumsum over prompt + new token - 1
        bound = np.asarray(o.get("image_bound", np.zeros((0, 2)))).reshape(-1, 2)
        row_slot = image_slot_from_bounds(bound, n, query_num)
        slot[r, :n] = np.where(row_slot >= 0, row_slot + rows_before, -1)
        rows_before += len(bound) * query_num
    vision = None
    slices = sum(int(np.asarray(o["tgt_sizes"]).reshape(-1, 2).shape[0]) for o in outputs)
    if slices:
        vision = VisionBatch.stack(outputs).pad_to(buckets.slice_bucket(slices))
    last = np.asarray(lengths, np.int32) - 1
    return PreparedBatch(ids, valid, pos, last, next_pos, slot, vision)
