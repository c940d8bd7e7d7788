"""Preference alignment as in RLAIF-V: preference data, exact sequence log-probs, the DPO loss.

Official semantics (RLAIF-V `muffin/eval/muffin_inference_logp.py` get_batch_logps_minicpm and
`muffin/train/trainers.py` dpo_loss / LLaVA15DPOTrainer.compute_loss):

* each side of a pair is a fine-tuning example exactly as the official dataset builds it (user
  turn = the question with the image, assistant turn = the answer); a batch holds the chosen rows
  then the rejected rows (`collate_pairs`);
* the labels are the fine-tuning targets, ALREADY shifted (`labels[i]` is the target of position
  `i`), so nothing is shifted again: the LAST position is dropped (`labels[:, :-1]`,
  `logits[:, :-1]`), the log-softmax over the vocabulary is gathered at the label ids and SUMMED
  over the label tokens (`average=True`: divided by their count, RLAIF-V's `--dpo_use_average`);
* `dpo_loss` = -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))) per pair; rewards =
  beta * (pi - ref); the training loss is `mean(losses) - sft_weight * mean(pi_c)` (RLAIF-V's
  DPO_weight = 1, SFT_weight default 0).

Preference records are RLAIF-V's: `{"image", "question", "chosen", "rejected", ...}` (other fields,
such as `ds_name`, `origin_dataset`, `idx`, are ignored), read from JSON, JSONL or Parquet.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpmv_jax.errors import DataError, MiniCPMVError
from minicpmv_jax.train.data import (
    DEFAULT_MAX_LENGTH,
    IGNORE_INDEX,
    collate,
    read_json_list,
    read_text,
    training_example,
)
from minicpmv_jax.train.loop import _EMPTY_ROW, TrainConfig, Trainer, device_batch
from minicpmv_jax.train.lora import apply_lora, lora_targets
from minicpmv_jax.train.loss import TRACE_COUNTS, device_arrays, prepare_batch, train_logits

log = logging.getLogger(__name__)

PREFERENCE_FIELDS = ("image", "question", "chosen", "rejected")


# ---------------------------------------------------------------------------------------------
# Log-probs and the loss (traced pieces; they also run eagerly on numpy / jax arrays)
# ---------------------------------------------------------------------------------------------


def label_logps(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token label log-probs as RLAIF-V's get_batch_logps_minicpm.

    Args:
      logits: [B, T, V] training-forward logits.
      labels: int [B, T] already-shifted labels (-100 = ignored).

    Returns:
      (float32 [B, T-1] log p(label) at each position, 0 where ignored; bool [B, T-1] loss mask).
      The last position is dropped, as officially (its label is always -100).
    """
    labels = labels[:, :-1]
    mask = labels != IGNORE_INDEX
    logits = logits[:, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, target - lse, 0.0), mask


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair sigmoid DPO losses [P] (RLAIF-V dpo_loss):
    -logsigmoid(beta * ((policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)))."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    return -jax.nn.log_sigmoid(beta * logits)


def dpo_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO statistics as RLAIF-V logs them: a dict of [P] arrays `losses`,
    `chosen_rewards` = beta * (policy_chosen - ref_chosen), `rejected_rewards` (likewise),
    `reward_accuracies` = float(chosen_rewards > rejected_rewards) and `margins` =
    chosen_rewards - rejected_rewards (rewards are detached: no gradient flows through them)."""
    sg = jax.lax.stop_gradient
    chosen = beta * sg(policy_chosen - ref_chosen)
    rejected = beta * sg(policy_rejected - ref_rejected)
    return {
        "losses": dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta),
        "chosen_rewards": chosen,
        "rejected_rewards": rejected,
        "reward_accuracies": (chosen > rejected).astype(jnp.float32),
        "margins": chosen - rejected,
    }


@functools.partial(jax.jit, static_argnames=("graphdef", "num_groups"))
def _logps_jit(graphdef, state, arrays, num_groups):
    """(per-token log-probs [B, T-1], loss mask [B, T-1]) of one batch: the inference pass."""
    TRACE_COUNTS["logps"] += 1
    logits = train_logits(nnx.merge(graphdef, state), arrays, num_groups)
    return label_logps(logits, arrays["labels"])


def token_logps(model, batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-token label log-probs of a collated batch (`collate` / `collate_pairs`).

    Returns (float32 [B, T-1], bool loss mask [B, T-1]): position i holds log p(labels[i]) under
    the model's training forward (labels already shifted; the last position dropped).
    """
    prepared = prepare_batch(model, batch)
    with model._precision():
        per, mask = _logps_jit(
            model.graphdef, model.state, device_arrays(prepared), prepared["num_groups"]
        )
    t = prepared["length"] - 1
    return np.asarray(per)[:, :t], np.asarray(mask)[:, :t]


def sequence_logps(model, batch: Mapping[str, Any], *, average: bool = False) -> np.ndarray:
    """float32 [B]: each row's summed label log-probs (RLAIF-V `log_prob`), or with `average`
    their mean over the row's label tokens (`average_log_prob`, `--dpo_use_average`)."""
    per, mask = token_logps(model, batch)
    total = per.sum(-1, dtype=np.float32)
    return total / mask.sum(-1) if average else total


# ---------------------------------------------------------------------------------------------
# Preference data
# ---------------------------------------------------------------------------------------------


def _record_id(record: Any, index: int) -> str:
    if isinstance(record, Mapping):
        for key in ("id", "idx"):
            if record.get(key) is not None:
                return str(record[key])
    return str(index)


def _image_field(value: Any) -> Any:
    """A record's image as training_example takes it: Parquet / HF datasets store images as
    {"bytes": ..., "path": ...}; bytes win, a path is used when no bytes are stored."""
    if isinstance(value, Mapping) and set(value) <= {"bytes", "path"} and value:
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return value["path"]
        return None
    return value


def read_preferences(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Preference records of a `.json` (a list), `.jsonl` (one record a line) or `.parquet` file
    (needs `pyarrow`). Raises DataError naming the file (and line) when it cannot be read."""
    path = pathlib.Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                "-", str(path), "reading Parquet needs pyarrow (pip install pyarrow)"
            ) from None
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:
            raise DataError("-", str(path), f"cannot read the Parquet file ({e})") from None
    text = read_text(path)
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise DataError("-", f"{path}:{n}", f"not valid JSON ({e})") from None
        return records
    return read_json_list(path, text, "preference records")


def preference_pair(
    model,
    record: Mapping[str, Any],
    *,
    image_root: str | os.PathLike = ".",
    max_length: int = DEFAULT_MAX_LENGTH,
    index: int = 0,
) -> dict[str, Any]:
    """One RLAIF-V preference record -> {"id", "chosen": example, "rejected": example}.

    Each side is `training_example` of `{"image", "conversations": [user: question, assistant:
    answer]}`, as the official dataset builds it.

    Raises:
      DataError naming the sample and field: a missing field, an empty answer, identical
      answers, a missing / unreadable image, or a side longer than `max_length` tokens (a cut
      answer would compare truncated log-probs, so the pair is refused rather than cut).
    """
    sid = _record_id(record, index)
    if not isinstance(record, Mapping):
        raise DataError(sid, "sample", f"must be a dict, got {type(record).__name__}")
    for field in PREFERENCE_FIELDS:
        if field not in record:
            raise DataError(
                sid, field, "missing (a preference record has image, question, chosen, rejected)"
            )
    for field in ("question", "chosen", "rejected"):
        if not isinstance(record[field], str):
            raise DataError(sid, field, f"must be a string, got {type(record[field]).__name__}")
    for field in ("chosen", "rejected"):
        if not record[field].strip():
            raise DataError(sid, field, "empty answer")
    if record["chosen"].strip() == record["rejected"].strip():
        raise DataError(sid, "rejected", "identical to chosen (the pair carries no preference)")
    image = _image_field(record["image"])
    if image is None:
        raise DataError(sid, "image", "missing (no bytes and no path)")
    out = {"id": sid}
    for side in ("chosen", "rejected"):
        sample = {
            "id": sid,
            "image": image,
            "conversations": [
                {"role": "user", "content": record["question"]},
                {"role": "assistant", "content": record[side]},
            ],
        }
        example = training_example(model, sample, image_root=image_root, max_length=sys.maxsize)
        n = len(example["input_ids"])
        if n > max_length:
            raise DataError(
                sid, side, f"{n} tokens, longer than max_length={max_length} (pair refused)"
            )
        out[side] = example
    return out


def load_preferences(
    model,
    records: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    image_root: str | os.PathLike | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    skip_bad_samples: bool = False,
) -> tuple[list[dict[str, Any]], list[DataError]]:
    """Preference pairs of a file (image paths relative to its folder) or a list of records.

    Returns (pairs, skipped): with `skip_bad_samples` every bad record's DataError is in `skipped`
    (counted in the metrics) instead of raised.
    """
    if isinstance(records, (str, os.PathLike)):
        image_root = image_root if image_root is not None else pathlib.Path(records).parent
        records = read_preferences(records)
    pairs, skipped = [], []
    for i, record in enumerate(records):
        try:
            pairs.append(
                preference_pair(
                    model, record, image_root=image_root or ".", max_length=max_length, index=i
                )
            )
        except DataError as e:
            if not skip_bad_samples:
                raise
            skipped.append(e)
    return pairs, skipped


def collate_pairs(
    pairs: Sequence[Mapping[str, Any]], max_length: int = DEFAULT_MAX_LENGTH
) -> dict[str, Any]:
    """The collated batch of P pairs: rows [chosen_0..P-1, rejected_0..P-1] (RLAIF-V's order)."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    return collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], max_length)


# ---------------------------------------------------------------------------------------------
# Training: the DPO objective, reference log-probs (computed once, cached), the trainer
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpoConfig:
    """DPO settings. beta: RLAIF-V's training scripts use 0.1 (its code default is 0.5);
    sft_weight: RLAIF-V's SFT_weight (loss -= sft_weight * mean policy chosen log-prob);
    average: `--dpo_use_average` (per-token mean log-probs instead of sums)."""

    beta: float = 0.1
    sft_weight: float = 0.0
    average: bool = False

    def __post_init__(self):
        if not self.beta > 0:
            raise MiniCPMVError(f"beta must be > 0, got {self.beta!r}")
        if not self.sft_weight >= 0:
            raise MiniCPMVError(f"sft_weight must be >= 0, got {self.sft_weight!r}")


@dataclasses.dataclass(frozen=True)
class DpoObjective:
    """The RLAIF-V training loss of a pair batch (rows: chosen then rejected; `ref_chosen`,
    `ref_rejected` [P] precomputed; `pair_valid` [P] False for padding pairs), a `loop`
    objective: mean(DPO losses) - sft_weight * mean(policy chosen log-probs), plus the
    rewards, accuracies, margins and log-probs as metrics (means over the valid pairs)."""

    config: DpoConfig

    def __call__(self, module, arrays, num_groups):
        cfg = self.config
        logits = train_logits(module, arrays, num_groups)
        per, mask = label_logps(logits, arrays["labels"])
        total, count = per.sum(-1), mask.sum(-1)
        logp = total / jnp.maximum(count, 1) if cfg.average else total
        p = logp.shape[0] // 2
        chosen, rejected = logp[:p], logp[p:]
        ref_chosen, ref_rejected = arrays["ref_chosen"], arrays["ref_rejected"]
        stats = dpo_rewards(chosen, rejected, ref_chosen, ref_rejected, cfg.beta)
        valid = arrays["pair_valid"].astype(jnp.float32)
        n = jnp.maximum(valid.sum(), 1.0)

        def mean(x):
            return (x * valid).sum() / n

        loss = mean(stats["losses"]) - cfg.sft_weight * mean(chosen)
        sg = jax.lax.stop_gradient
        return loss, {
            "tokens": count.sum(),
            "rewards/chosen": mean(stats["chosen_rewards"]),
            "rewards/rejected": mean(stats["rejected_rewards"]),
            "rewards/accuracies": mean(stats["reward_accuracies"]),
            "rewards/margins": mean(stats["margins"]),
            "logps/chosen": mean(sg(chosen)),
            "logps/rejected": mean(sg(rejected)),
        }


@dataclasses.dataclass
class ReferenceLogps:
    """The reference model's summed label log-probs [P] of each pair's sides and their label
    token counts; `key` identifies dataset + reference weights; `from_cache` says whether they
    were read from disk instead of computed."""

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray
    key: str
    from_cache: bool = False

    def values(self, average: bool) -> tuple[np.ndarray, np.ndarray]:
        """(chosen, rejected) sums, or per-token means with `average`."""
        if not average:
            return self.chosen, self.rejected
        return self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens


def dataset_hash(pairs: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of every pair's id, token ids, labels, image bounds, slice sizes and pixels."""
    h = hashlib.sha256(b"minicpmv-jax dpo pairs v1")
    for pair in pairs:
        h.update(str(pair["id"]).encode() + b"\0")
        for side in ("chosen", "rejected"):
            e = pair[side]
            for key in ("input_ids", "labels", "image_bound", "tgt_sizes"):
                a = np.ascontiguousarray(e[key])
                h.update(f"{key}{a.dtype}{a.shape}".encode() + a.tobytes())
            for x in e["pixel_values"]:
                a = np.ascontiguousarray(x, np.float32)
                h.update(f"px{a.shape}".encode() + a.tobytes())
    return h.hexdigest()


@jax.jit
def _leaf_stats(leaves):
    def stats(x):
        x = x.astype(jnp.float32).reshape(-1)
        w = (jnp.arange(x.shape[0]) % 7 - 3).astype(jnp.float32)  # position-sensitive
        return jnp.stack([x.sum(), (x * x).sum(), (x * w).sum()])

    return [stats(x) for x in leaves]


def weights_fingerprint(state) -> str:
    """sha256 of each weight's path, shape, dtype and (sum, sum of squares, a position-weighted
    sum): one pass over the weights on their devices; equal weights give equal fingerprints."""
    flat = nnx.to_flat_state(state)
    leaves = [v.get_value() for _, v in flat]
    stats = np.asarray(jax.device_get(_leaf_stats(leaves)), np.float32)
    h = hashlib.sha256(b"minicpmv-jax weights v1")
    for (path, _), x, s in zip(flat, leaves, stats, strict=True):
        h.update(f"{path}{x.shape}{x.dtype}".encode() + s.tobytes())
    return h.hexdigest()


def folder_identity(folder: str | os.PathLike) -> str:
    """Identity of a checkpoint folder without loading it: its resolved path and every file's
    name, size and modification time (a rewritten checkpoint gets a new identity)."""
    from minicpmv_jax.model import resolve_checkpoint

    root = resolve_checkpoint(folder).resolve()
    parts = [str(root)]
    for f in sorted(root.rglob("*")):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _without_adapter(model):
    """The model's weights with its loaded LoRA adapter's delta removed (the targets' kernels
    are W - s * B0 A0; modules_to_save tensors stay as loaded): the 'adapter disabled' base."""
    adapter = getattr(model, "adapter", None)
    if adapter is None:
        return model.state
    targets = lora_targets(model.state, adapter.config)
    zero = {m: {"A": ab["A"], "B": jnp.zeros_like(ab["B"])} for m, ab in adapter.lora.items()}
    with model._precision():
        return apply_lora(model.state, targets, zero, adapter.config.scaling, adapter.lora)


def _reference_pass(model, graphdef, state, pairs, config) -> tuple[np.ndarray, np.ndarray]:
    """(sums [2, P], counts [2, P]) of the label log-probs: one jitted inference program per
    bucketed batch shape, `config.batch_size` pairs per batch."""
    b = config.batch_size
    sums, counts = np.zeros((2, len(pairs)), np.float32), np.zeros((2, len(pairs)), np.int64)
    with model._precision():
        for i in range(0, len(pairs), b):
            chunk = list(pairs[i : i + b])
            rows = chunk + [DpoTrainer.empty_row] * (b - len(chunk))
            arrays, groups = device_batch(model, collate_pairs(rows, config.max_length), config)
            per, mask = jax.device_get(_logps_jit(graphdef, state, arrays, groups))
            n = len(chunk)
            sums[0, i : i + n], sums[1, i : i + n] = per.sum(-1)[:n], per.sum(-1)[b : b + n]
            counts[0, i : i + n] = mask.sum(-1)[:n]
            counts[1, i : i + n] = mask.sum(-1)[b : b + n]
    return sums, counts


def reference_logps(
    model,
    pairs: Sequence[Mapping[str, Any]],
    config: TrainConfig,
    *,
    reference=None,
    disable_adapter: bool = False,
    cache: str | os.PathLike | None = None,
) -> ReferenceLogps:
    """The reference log-probs of every pair, computed once by a jitted inference pass.

    Args:
      model: the policy at its start (its processor, mesh and precision are used).
      pairs: `load_preferences` pairs.
      config: batch size, max_length and buckets of the pass.
      reference: None (the starting policy; with `disable_adapter`, its LoRA adapter removed),
        a loaded MiniCPMV, or a checkpoint folder (loaded like `model`, only on a cache miss).
      cache: an .npz file: reused when its key (dataset hash + reference identity) matches,
        else (re)written.
    """
    if reference is None:
        state = _without_adapter(model) if disable_adapter else model.state
        identity = "weights:" + weights_fingerprint(state)
    elif isinstance(reference, (str, os.PathLike)):
        identity = "folder:" + folder_identity(reference)
    else:
        identity = "weights:" + weights_fingerprint(reference.state)
    key = hashlib.sha256(f"{dataset_hash(pairs)}|{identity}".encode()).hexdigest()
    cache = pathlib.Path(cache) if cache is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                log.info("reference log-probs: reusing %s", cache)
                return ReferenceLogps(
                    z["chosen"], z["rejected"], z["chosen_tokens"], z["rejected_tokens"], key, True
                )
        log.info("reference log-probs: %s is stale (dataset or reference changed)", cache)
    if reference is None:
        graphdef = model.graphdef
    else:
        if isinstance(reference, (str, os.PathLike)):
            from minicpmv_jax import MiniCPMV

            reference = MiniCPMV.from_pretrained(
                reference,
                dtype=model.config.llm.dtype,
                mesh=model.mesh,
                progress=False,
                load_processor=False,
            )
        graphdef, state = reference.graphdef, reference.state
    sums, counts = _reference_pass(model, graphdef, state, pairs, config)
    out = ReferenceLogps(sums[0], sums[1], counts[0], counts[1], key)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".partial.npz")
        np.savez(
            tmp,
            key=np.array(key),
            chosen=out.chosen,
            rejected=out.rejected,
            chosen_tokens=out.chosen_tokens,
            rejected_tokens=out.rejected_tokens,
        )
        os.replace(tmp, cache)
    return out


_EMPTY_PAIR = {"id": None, "chosen": _EMPTY_ROW, "rejected": _EMPTY_ROW}


class DpoTrainer(Trainer):
    """A DPO run: the fine-tuning Trainer (optimizer, LoRA / full, mesh, saves, resume, metrics)
    with pair batches and the `DpoObjective`.

    Args:
      model: the policy at its start.
      pairs: `load_preferences` pairs.
      config: TrainConfig (batch_size counts pairs: a micro-batch has 2 * batch_size rows).
      dpo: DpoConfig.
      reference: the pairs' ReferenceLogps (`reference_logps`).
      output_dir, skipped: as Trainer.
    """

    empty_row: Mapping[str, Any] = {**_EMPTY_PAIR, "ref_chosen": 0.0, "ref_rejected": 0.0}
    desc = "dpo"

    def __init__(
        self,
        model,
        pairs: Sequence[Mapping[str, Any]],
        config: TrainConfig,
        dpo: DpoConfig,
        reference: ReferenceLogps,
        *,
        output_dir: str | os.PathLike | None = None,
        skipped: int = 0,
    ):
        chosen, rejected = reference.values(dpo.average)
        if len(chosen) != len(pairs):
            raise MiniCPMVError(f"{len(chosen)} reference log-probs for {len(pairs)} pairs")
        rows = [
            {**p, "ref_chosen": float(c), "ref_rejected": float(r)}
            for p, c, r in zip(pairs, chosen, rejected, strict=True)
        ]
        self.dpo = dpo
        super().__init__(
            model,
            rows,
            config,
            output_dir=output_dir,
            skipped=skipped,
            objective=DpoObjective(dpo),
        )

    def _device_batch(self, rows) -> tuple[dict, int]:
        arrays, groups = device_batch(
            self.model, collate_pairs(rows, self.config.max_length), self.config
        )
        replicated = jax.sharding.NamedSharding(self.model.mesh, jax.sharding.PartitionSpec())
        extra = {
            "ref_chosen": np.array([r["ref_chosen"] for r in rows], np.float32),
            "ref_rejected": np.array([r["ref_rejected"] for r in rows], np.float32),
            "pair_valid": np.array([r["id"] is not None for r in rows]),
        }
        for k, a in extra.items():
            arrays[k] = jax.device_put(a, replicated)
        return arrays, groups

    def eval_loss(self) -> float:
        raise MiniCPMVError("DPO runs have no eval loss (watch rewards/accuracies instead)")

    def postfix(self, row: Mapping[str, Any]) -> dict[str, str]:
        return {
            "loss": f"{row['loss']:.4f}",
            "acc": f"{row['rewards/accuracies']:.2f}",
            "margin": f"{row['rewards/margins']:.3f}",
        }


REFERENCE_CACHE = "reference_logps.npz"


def dpo_finetune(
    model,
    pairs: Sequence[Mapping[str, Any]],
    config: TrainConfig | None = None,
    dpo: DpoConfig | None = None,
    *,
    reference=None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    skipped: int = 0,
):
    """DPO-train `model` on preference `pairs`; returns (trained MiniCPMV, metrics rows).

    The reference log-probs are computed once (`reference_logps`; reference None = the starting
    policy, with LoRA the base with the adapter disabled) and cached in
    `output_dir/reference_logps.npz`; with `output_dir` and `resume` a run continues from its
    newest save, as `finetune` does.
    """
    config = config or TrainConfig()
    dpo = dpo or DpoConfig()
    cache = pathlib.Path(output_dir) / REFERENCE_CACHE if output_dir is not None else None
    ref = reference_logps(
        model,
        pairs,
        config,
        reference=reference,
        disable_adapter=config.mode == "lora",
        cache=cache,
    )
    trainer = DpoTrainer(model, pairs, config, dpo, ref, output_dir=output_dir, skipped=skipped)
    if resume:
        trainer.restore_latest()
    history = trainer.run(progress=progress)
    return trainer.trained_model(), history
