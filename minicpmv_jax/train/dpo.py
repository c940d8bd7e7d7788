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

import functools
import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpmv_jax.errors import DataError
from minicpmv_jax.train.data import DEFAULT_MAX_LENGTH, IGNORE_INDEX, collate, training_example
from minicpmv_jax.train.loss import TRACE_COUNTS, device_arrays, prepare_batch, train_logits

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
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise DataError("-", str(path), f"cannot read the file ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError("-", str(path), f"not UTF-8 text (byte {e.start}: {e.reason})") from None
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
    try:
        records = json.loads(text)
    except ValueError as e:
        raise DataError("-", str(path), f"not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise DataError("-", str(path), "must hold a JSON list of preference records")
    return records


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
