"""Model inputs built straight from a fixture case's processor.npz / vision.npz (ProcessorOutput
fields), so model tests do not depend on the processor implementation."""

from __future__ import annotations

import numpy as np

PATCH_BUCKETS = (256, 512, 1024, 1152, 1280, 1536, 2048, 4096)


def strip_to_patches(strip: np.ndarray) -> np.ndarray:
    """Official strip [3, 14, L*14] -> patch vectors [L, 588], inner order (c, kh, kw)."""
    c, k, lk = strip.shape
    n = lk // k
    return strip.reshape(c, k, n, k).transpose(2, 0, 1, 3).reshape(n, c * k * k)


def batch_from_case(data: dict, version: str, patch_bucket: int | None = None) -> dict:
    """A ProcessorOutput-like dict for one fixture case (see INTERFACES.md)."""
    proc = data["processor"]
    ids = proc["input_ids"].reshape(-1)
    tgt = proc["tgt_sizes"].reshape(-1, 2).astype(np.int64)
    n = tgt.shape[0]
    mask = proc.get("attention_mask")
    out = {
        "input_ids": ids,
        "attention_mask": np.ones(ids.shape, bool)
        if mask is None
        else mask.reshape(-1).astype(bool),
        "image_bound": proc["image_bound"].reshape(-1, 2),
        "tgt_sizes": tgt,
        "temporal_ids": proc.get("temporal_ids", np.full((n,), -1, np.int64)).reshape(-1),
        "group_sizes": proc.get("group_sizes", np.ones((n,), np.int64)).reshape(-1),
        "version": version,
    }
    if n == 0:
        out.update(
            pixel_patches=np.zeros((0, 0, 588), np.float32),
            patch_valid=np.zeros((0, 0), bool),
            vision_mask=np.zeros((0, 0), bool),
            position_ids=np.zeros((0, 0), np.int32),
        )
        return out
    lens = tgt[:, 0] * tgt[:, 1]
    max_l = int(lens.max())
    p = patch_bucket or next(b for b in PATCH_BUCKETS if b >= max_l)
    patches = np.zeros((n, p, 588), np.float32)
    for i in range(n):
        patches[i, : lens[i]] = strip_to_patches(proc[f"pixel_values_{i:02d}"])
    ar = np.arange(p)[None, :]
    valid = ar < lens[:, None]
    pos = np.zeros((n, p), np.int32)
    vis_pos = data["vision"]["position_ids"]
    pos[:, : vis_pos.shape[1]] = vis_pos
    pos[~valid if version != "2.5" else ~(ar < max_l).repeat(n, 0)] = 0
    # 2.5 quirk: the tower attends every key up to maxL (the official all-True mask).
    vmask = np.broadcast_to(ar < max_l, (n, p)).copy() if version == "2.5" else valid
    out.update(pixel_patches=patches, patch_valid=valid, vision_mask=vmask, position_ids=pos)
    return out
