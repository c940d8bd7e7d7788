"""Host-side (numpy) layout of 4.6 vision inputs: packed strip -> one padded row per unit.

The processor's `pixel_values` [1, 3, 14, 14*N] packs every unit's patches side by side; here each
unit (h, w) becomes one row of a [U, P, 588] array (raster order, zero rows past h*w) with its
bucketed position ids, validity and the window / 2x2-group orders the merger stages gather with.
"""

from __future__ import annotations

import numpy as np

PATCH_BUCKET = 256  # P is a multiple of this (keeps the tower's compilations few)
UNIT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def position_ids(h: int, w: int, side: int) -> np.ndarray:
    """int32 [h*w]: nearest row of the side x side table (`get_vision_nearest_position_ids`,
    float32 `bucketize(i / h, arange(1/side, 1, 1/side), right=True)`)."""
    n = int(np.ceil((1.0 - 1.0 / side) / (1.0 / side)))
    bounds = (1.0 / side + np.arange(n) * (1.0 / side)).astype(np.float32)
    bh = np.searchsorted(bounds, np.arange(h, dtype=np.float32) / np.float32(h), side="right")
    bw = np.searchsorted(bounds, np.arange(w, dtype=np.float32) / np.float32(w), side="right")
    return (bh[:, None] * side + bw[None, :]).reshape(-1).astype(np.int32)


def window_order(h: int, w: int, size: int) -> np.ndarray:
    """int32 [size]: raster row of each slot when a (h, w) grid is read 2x2 window by window
    (windows in raster order of (h/2, w/2), inside one (top-left, top-right, bottom-left,
    bottom-right)); slots past h*w map to themselves (padding)."""
    r = np.arange(h // 2)[:, None, None, None]
    c = np.arange(w // 2)[None, :, None, None]
    dy = np.arange(2)[None, None, :, None]
    dx = np.arange(2)[None, None, None, :]
    idx = ((2 * r + dy) * w + 2 * c + dx).reshape(-1)
    out = np.arange(size, dtype=np.int32)
    out[: idx.size] = idx
    return out


def _bucket(n: int, buckets) -> int:
    for b in buckets:
        if b >= n:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def unit_patches(pixel_values: np.ndarray, target_sizes: np.ndarray) -> list[np.ndarray]:
    """Split the packed strip [1, 3, p, p*N] into per-unit patch vectors [h*w, 3*p*p]."""
    strip = np.asarray(pixel_values, np.float32)
    strip = strip.reshape(strip.shape[-3:]) if strip.ndim == 4 else strip
    c, p, total = strip.shape
    n = total // p
    flat = strip.reshape(c, p, n, p).transpose(2, 0, 1, 3).reshape(n, c * p * p)
    sizes = [int(h) * int(w) for h, w in np.asarray(target_sizes).reshape(-1, 2)]
    if sum(sizes) != n:
        raise ValueError(f"target_sizes cover {sum(sizes)} patches, pixel_values hold {n}")
    return np.split(flat, np.cumsum(sizes)[:-1])


def layout(
    units: list[np.ndarray], target_sizes: np.ndarray, mode: str, side: int
) -> dict[str, np.ndarray]:
    """Padded per-unit arrays for the tower, ViT merger and projector.

    Returns: patches f32 [U, P, 588], position_ids i32 [U, P], valid bool [U, P],
      window_index i32 [U, P] (16x only), merge_index i32 [U, M] (M = P/4 in 16x, P in 4x),
      tokens i32 [U] (output rows per unit), num_units (real U).
    """
    sizes = np.asarray(target_sizes, np.int64).reshape(-1, 2)
    u = len(units)
    ub = _bucket(max(u, 1), UNIT_BUCKETS)
    p = max(
        PATCH_BUCKET, -(-max((x.shape[0] for x in units), default=1) // PATCH_BUCKET) * PATCH_BUCKET
    )
    dim = units[0].shape[1] if units else 588
    out = {
        "patches": np.zeros((ub, p, dim), np.float32),
        "position_ids": np.zeros((ub, p), np.int32),
        "valid": np.zeros((ub, p), bool),
        "merge_index": np.tile(np.arange(p // 4 if mode == "16x" else p, dtype=np.int32), (ub, 1)),
        "tokens": np.zeros((ub,), np.int32),
        "num_units": u,
    }
    if mode == "16x":
        out["window_index"] = np.tile(np.arange(p, dtype=np.int32), (ub, 1))
    out["valid"][u:, 0] = True  # padding units: one valid key keeps their softmax finite
    for i, (x, (h, w)) in enumerate(zip(units, sizes)):
        h, w = int(h), int(w)
        out["patches"][i, : h * w] = x
        out["position_ids"][i, : h * w] = position_ids(h, w, side)
        out["valid"][i, : h * w] = True
        if mode == "16x":
            out["window_index"][i] = window_order(h, w, p)
            h, w = h // 2, w // 2
        out["merge_index"][i] = window_order(h, w, out["merge_index"].shape[1])
        out["tokens"][i] = h * w // 4
    return out
