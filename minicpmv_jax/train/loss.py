"""The training forward, the official loss, trainable sets and gradients under official names.

Official semantics (finetune/trainer.py CPMTrainer.compute_loss + the model's training forward):

* the LLM gets `inputs_embeds` and `position_ids` (a plain arange per row) and NO attention mask:
  causal attention only, so right padding leaves real tokens exact (padded positions attend to
  everything before them);
* vision features of every slice in the batch (rows' pixel_values in order) are scattered into
  each row's image_bound positions; rows without images get none;
* loss = `CrossEntropyLoss()` over `logits.view(-1, V)` and `labels.view(-1)`, with NO shift (the
  dataset already shifted the labels): the mean over every non -100 label of the whole batch.

Trainable sets (finetune.py): `full` = everything; `freeze_vision` = all but `vpm.*`; `lora` =
LoRA A/B on the target Linears plus the `modules_to_save` (embed_tokens, resampler, vpm) in full.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpmv_jax.batching import VisionBatch, image_slot_from_bounds
from minicpmv_jax.errors import MiniCPMVError
from minicpmv_jax.model import merge_embeds
from minicpmv_jax.processor import patch_bucket_size, vision_mask, vision_position_ids
from minicpmv_jax.train.data import IGNORE_INDEX
from minicpmv_jax.train.lora import LoraConfig, Target, apply_lora, init_lora, peft_name
from minicpmv_jax.weights import path_name, to_hf_state_dict

MODES = ("full", "freeze_vision", "lora")
# How many times each training program was traced, by name (compile-count tests).
TRACE_COUNTS: collections.Counter = collections.Counter()


# ---------------------------------------------------------------------------------------------
# Batch: collated official batch -> static-shape arrays
# ---------------------------------------------------------------------------------------------


def _bucket(n: int, buckets) -> int:
    for b in buckets:
        if b >= n:
            return int(b)
    return -(-n // buckets[-1]) * int(buckets[-1])


def strip_to_patches(strip: np.ndarray, patch_size: int = 14) -> np.ndarray:
    """Official reshape_by_patch strip [3, p, n*p] -> patch vectors [n, 3*p*p] (c, kh, kw)."""
    c, p, width = strip.shape
    x = np.asarray(strip, np.float32).reshape(c, p, width // p, p)  # [c, kh, n, kw]
    return x.transpose(2, 0, 1, 3).reshape(width // p, c * p * p)


def prepare_batch(
    model,
    batch: Mapping[str, Any],
    *,
    token_buckets=None,
    slice_buckets=None,
    patch_buckets=None,
) -> dict[str, Any]:
    """Host-side arrays of one collated batch, padded to buckets (None: no padding).

    Returns a dict of numpy arrays: input_ids, labels, positions, image_slot [B, Tb]; and, when
    the batch has images (or buckets are given), the slice arrays of a `batching.VisionBatch`
    ([Ib, Pb, ...]); plus the static `num_groups` (0 = no vision input) and `length` (the T).
    """
    cfg, proc = model.config, model.processor
    q, p = cfg.query_num, proc.patch_size
    ids = np.asarray(batch["input_ids"], np.int32)
    b, t = ids.shape
    tb = t if token_buckets is None else _bucket(t, token_buckets)

    def pad_t(a, value, dtype):
        out = np.full((b, tb), value, dtype)
        out[:, :t] = a
        return out

    slot = np.full((b, tb), -1, np.int32)
    strips, tgt = [], []
    for row in range(b):
        sizes = np.asarray(batch["tgt_sizes"][row], np.int64).reshape(-1, 2)
        bound = np.asarray(batch["image_bound"][row], np.int64).reshape(-1, 2)
        if len(bound) != len(sizes) or len(batch["pixel_values"][row]) != len(sizes):
            raise MiniCPMVError(
                f"batch row {row}: {len(bound)} image bounds, {len(sizes)} tgt_sizes and "
                f"{len(batch['pixel_values'][row])} pixel_values must agree"
            )
        row_slot = image_slot_from_bounds(bound, t, q)
        slot[row, :t] = np.where(row_slot >= 0, row_slot + len(strips) * q, -1)
        strips += list(batch["pixel_values"][row])
        tgt += [tuple(s) for s in sizes]
    out = {
        "input_ids": pad_t(ids, 0, np.int32),
        "labels": pad_t(np.asarray(batch["labels"], np.int32), IGNORE_INDEX, np.int32),
        "positions": pad_t(np.asarray(batch["position_ids"], np.int32), 0, np.int32),
        "image_slot": slot,
        "num_groups": 0,
        "length": t,
    }
    if not strips and slice_buckets is None:
        return out  # unbucketed text-only batch: no vision program at all
    # (bucketed, a text-only batch runs one all-padding slice: one program shape for all batches)
    tgt = np.array(tgt, np.int64).reshape(-1, 2)
    longest = int((tgt[:, 0] * tgt[:, 1]).max()) if strips else 1
    pb = longest if patch_buckets is None else patch_bucket_size(longest, patch_buckets)
    patches = np.zeros((len(strips), pb, 3 * p * p), np.float32)
    for i, s in enumerate(strips):
        patches[i, : tgt[i, 0] * tgt[i, 1]] = strip_to_patches(s, p)
    version = cfg.version
    # 2.5 quirk as in inference: one mask / position row over maxL of the whole vision call
    # (here: every slice of the batch, as the official training forward batches them).
    slices = {
        "pixel_patches": patches,
        "position_ids": vision_position_ids(tgt, pb, version, proc.num_patches_per_side),
        "vision_mask": vision_mask(tgt, pb, version),
        "patch_valid": np.arange(pb)[None, :] < (tgt[:, 0] * tgt[:, 1])[:, None],
        "tgt_sizes": tgt,
    }
    ib = _bucket(max(len(strips), 1), slice_buckets or (len(strips),))
    if strips:
        vision = VisionBatch.stack([slices]).pad_to(ib)
    else:
        vision = VisionBatch.placeholder(ib, pb, 3 * p * p)
    for field in dataclasses.fields(vision):
        out[field.name] = getattr(vision, field.name)
    # Every slice its own group, padding slices included (image_slot never reads theirs): an
    # empty resampler group has max -inf, which the forward masks but the backward turns into
    # NaN gradients.
    out["group_index"] = np.arange(vision.num_groups, dtype=np.int32)
    out["num_groups"] = vision.num_groups
    return out


ARRAY_KEYS = (
    "input_ids",
    "labels",
    "positions",
    "image_slot",
    "pixel_patches",
    "position_ids",
    "vision_mask",
    "patch_valid",
    "tgt_sizes",
    "temporal_ids",
    "group_index",
)


def device_arrays(prepared: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: prepared[k] for k in ARRAY_KEYS if k in prepared}


# ---------------------------------------------------------------------------------------------
# Traced pieces
# ---------------------------------------------------------------------------------------------


def train_logits(module, arrays: Mapping[str, jax.Array], num_groups: int) -> jax.Array:
    """The official training forward: float32 logits [B, T, V] (causal only, no mask)."""
    d = module.llm.cfg.hidden_size
    if num_groups:
        feats = module.vpm(arrays["pixel_patches"], arrays["position_ids"], arrays["vision_mask"])
        feats = module.resampler(
            feats,
            arrays["tgt_sizes"],
            arrays["patch_valid"],
            arrays["group_index"],
            num_groups,
            arrays["temporal_ids"],
        ).reshape(-1, d)  # [G*Q, D]
    else:  # no image in the batch: the vision tower gets zero gradients (official: 0 * mean)
        feats = jnp.zeros((1, d), module.llm.cfg.dtype)
    x = merge_embeds(module, arrays["input_ids"], arrays["image_slot"], feats)
    logits, _ = module.llm(x, arrays["positions"], None, None)
    return logits


def masked_xent(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies over labels != -100, their count); float32."""
    valid = labels != IGNORE_INDEX
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, lse - target, 0.0).sum(), valid.sum()


# ---------------------------------------------------------------------------------------------
# Trainable sets
# ---------------------------------------------------------------------------------------------


def trainable_filter(mode: str, lora_config: LoraConfig | None = None):
    """nnx filter (path, value) -> bool of the parameters trained in full in `mode`."""
    if mode not in MODES:
        raise MiniCPMVError(f"mode must be one of {MODES}, got {mode!r}")

    def keep(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        name = path_name(path)
        if mode == "full":
            return True
        if mode == "freeze_vision":
            return not name.startswith("vpm.")
        return lora_config.saved_module(name) is not None

    return keep


@functools.partial(jax.jit, static_argnames=("graphdef", "num_groups"))
def _logits_jit(graphdef, state, arrays, num_groups):
    TRACE_COUNTS["forward"] += 1
    return train_logits(nnx.merge(graphdef, state), arrays, num_groups)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_groups", "targets", "scaling"))
def _loss_grads_jit(
    graphdef, trainable, lora, frozen, loaded, arrays, num_groups, targets, scaling
):
    TRACE_COUNTS["loss_and_grads"] += 1

    def loss_fn(trainable, lora):
        rest = apply_lora(frozen, targets, lora, scaling, loaded) if targets else frozen
        logits = train_logits(nnx.merge(graphdef, trainable, rest), arrays, num_groups)
        total, count = masked_xent(logits, arrays["labels"])
        return total / count

    return jax.value_and_grad(loss_fn, argnums=(0, 1))(trainable, lora)


def _lora_state(model, mode: str, lora_config: LoraConfig | None, seed: int):
    """(config, trainable LoRA tensors, loaded (merged) tensors or None) for `mode`."""
    if mode != "lora":
        return None, {}, None
    adapter = getattr(model, "adapter", None)
    if adapter is not None and lora_config is None:
        return adapter.config, adapter.lora, adapter.lora
    cfg = lora_config or LoraConfig()
    return cfg, init_lora(model.state, cfg, seed), None


def forward_logits(model, batch: Mapping[str, Any], *, mode: str = "full") -> np.ndarray:
    """float32 [B, T, V]: the training forward of a collated batch (the model's weights, with a
    loaded adapter merged; `mode` only matters for the trainable set, not the forward)."""
    del mode
    prepared = prepare_batch(model, batch)
    with model._precision():
        logits = _logits_jit(
            model.graphdef, model.state, device_arrays(prepared), prepared["num_groups"]
        )
    return np.asarray(logits)[:, : prepared["length"]]


def loss_and_grads(
    model,
    batch: Mapping[str, Any],
    mode: str = "full",
    *,
    lora_config: LoraConfig | None = None,
    seed: int = 0,
) -> tuple[float, dict[str, np.ndarray]]:
    """(loss, {tensor name: gradient}) of one collated batch, as the official trainer computes.

    Names are the official checkpoint names (`llm.model.layers.0.self_attn.q_proj.weight`,
    torch layout); in `lora` mode PEFT's parameter names (`base_model.model....lora_A.default.
    weight`, `...modules_to_save.default...`). In lora mode the model's adapter (loaded with
    `MiniCPMV.from_pretrained(..., adapter=...)`) is used, else a fresh one of `lora_config`
    (default: the official LoraConfig) initialised from `seed`.
    """
    cfg, lora, loaded = _lora_state(model, mode, lora_config, seed)
    keep = trainable_filter(mode, cfg)
    graphdef, trainable, frozen = nnx.split(model.module, keep, ...)
    targets: tuple[Target, ...] = ()
    if mode == "lora":
        from minicpmv_jax.train.lora import lora_targets

        targets = lora_targets(frozen, cfg)
    prepared = prepare_batch(model, batch)
    with model._precision():
        loss, (g_params, g_lora) = _loss_grads_jit(
            graphdef,
            trainable,
            lora,
            frozen,
            loaded,
            device_arrays(prepared),
            prepared["num_groups"],
            targets,
            cfg.scaling if cfg else 0.0,
        )
    grads = to_hf_state_dict(g_params)
    if mode == "lora":
        grads = {peft_name(n, cfg): g for n, g in grads.items()}
        for module, ab in g_lora.items():
            for kind in ("A", "B"):
                grads[peft_name(f"{module}.lora_{kind}", cfg)] = np.asarray(ab[kind])
    return float(loss), grads
