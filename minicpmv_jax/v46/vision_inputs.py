"""Host-side (numpy) layout of 4.6 vision inputs: packed patches + a per-unit attention layout.

The processor's `pixel_values` [1, 3, 14, 14*N] packs every unit's patches side by side; here they
stay packed (units back to back, raster order, padded at the end to a bucket) with their bucketed
position ids, the per-unit attention layout and the window / 2x2-group orders the merger stages
gather with.
"""

from __future__ import annotations

import numpy as np

PATCH_BUCKET = 256  # N is a multiple of this (keeps the tower's compilations few)
# P (one unit's padded attention row) is a multiple of this: the per-unit attention's work
# grows with P^2 (a 1344x896 image: an 1120-patch overview + six 1024-patch slices; P = 1280
# made the attention 1.52x its real work, P = 1152 1.23x)
UNIT_ROW_BUCKET = 128
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
    """Packed arrays for the tower, ViT merger and projector.

    Every per-token stage (patch embedding, projections, MLPs, norms) runs on the packed real
    patches, units back to back, each in raster order of its grid, padded only at the end to a
    multiple of PATCH_BUCKET (N); only the attention reads one padded row per unit ([U, P], P a
    multiple of UNIT_ROW_BUCKET; the official block-diagonal attention). A unit of h*w patches
    is a multiple of 4 in both modes (grids are even; 16x: multiples of 4), so the 2x2 windows
    and groups never straddle units.

    Returns: patches f32 [N, 588], position_ids i32 [N]; the attention layout `rows` i32 [U, P]
      (packed row of each slot), `valid` bool [U, P] (slot < h*w), `slots` i32 [N] (slot of each
      packed row in the flattened [U*P]); in 16x `window_perm` i32 [N] (rows in the ViT merger's
      window order) and the same attention layout of the merged tokens (`rows2` [U, P/4],
      `valid2`, `slots2` [N/4]); `merge_perm` i32 [M] (M = N/4 in 16x, N in 4x: rows of the
      final tokens in the projector's 2x2-group order); tokens i32 [U] (output rows per unit,
      back to back), num_units (real U; `unit_count` the same as an int32 array).
    """
    sizes = np.asarray(target_sizes, np.int64).reshape(-1, 2)
    u = len(units)
    ub = _bucket(max(u, 1), UNIT_BUCKETS)
    counts = [x.shape[0] for x in units]
    p = max(UNIT_ROW_BUCKET, -(-max(counts, default=1) // UNIT_ROW_BUCKET) * UNIT_ROW_BUCKET)
    n = max(PATCH_BUCKET, -(-sum(counts) // PATCH_BUCKET) * PATCH_BUCKET)
    dim = units[0].shape[1] if units else 588
    merged = mode == "16x"
    nf = n // 4 if merged else n
    out = {
        "patches": np.zeros((n, dim), np.float32),
        "position_ids": np.zeros((n,), np.int32),
        "merge_perm": np.arange(nf, dtype=np.int32),
        "tokens": np.zeros((ub,), np.int32),
        "num_units": u,
        "unit_count": np.asarray(u, np.int32),  # the same, as an input of the tower
    }

    def attention_layout(grids, size, total, key=""):
        rows = np.zeros((ub, size), np.int32)
        valid = np.zeros((ub, size), bool)
        valid[u:, 0] = True  # padding units: one valid key keeps their softmax finite
        slots = np.zeros((total,), np.int32)
        start = 0
        for i, (h, w) in enumerate(grids):
            c = h * w
            rows[i, :c] = start + np.arange(c)
            valid[i, :c] = True
            slots[start : start + c] = i * size + np.arange(c)
            start += c
        out.update({"rows" + key: rows, "valid" + key: valid, "slots" + key: slots})

    grids = [(int(h), int(w)) for h, w in sizes]
    attention_layout(grids, p, n)
    if merged:
        out["window_perm"] = np.arange(n, dtype=np.int32)
        attention_layout([(h // 2, w // 2) for h, w in grids], p // 4, n // 4, "2")
    start = start_f = 0
    for i, (x, (h, w)) in enumerate(zip(units, grids)):
        c = h * w
        out["patches"][start : start + c] = x
        out["position_ids"][start : start + c] = position_ids(h, w, side)
        if merged:
            out["window_perm"][start : start + c] = start + window_order(h, w, c)
            h, w = h // 2, w // 2
        out["merge_perm"][start_f : start_f + h * w] = start_f + window_order(h, w, h * w)
        out["tokens"][i] = h * w // 4
        start, start_f = start + c, start_f + h * w
    return out
