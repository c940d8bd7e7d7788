"""Preference alignment (RLAIF-V) against the official code (train fixtures' dpo/, float32).

Tolerances (the issue's): per-sample summed label log-probs of the policy (the fixture
checkpoint) and the reference (dpo/reference_checkpoint) within 1e-4 relative; per-token
log-probs within 1e-4 absolute where the official loss_mask is set (the mask itself exact);
DPO losses, rewards and reward accuracies for beta 0.5 and 0.1 within 1e-5 (from our log-probs;
with the official log-probs as inputs, 1e-6). The collated pair batch (ids, labels, image bounds,
slice sizes) is exact.
"""

import functools
import json

import numpy as np
import pytest
from train_helpers import (
    TRAIN_VERSIONS,
    dpo_dir,
    load_reference_model,
    load_train_model,
)

from minicpmv_jax import train


def fixture(version):
    meta = json.loads((dpo_dir(version) / "dpo.json").read_text())
    with np.load(dpo_dir(version) / "dpo.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


@functools.cache
def fixture_pairs(version):
    model = load_train_model(version)
    pairs, skipped = train.load_preferences(model, dpo_dir(version) / "data.json")
    assert not skipped
    return pairs


@functools.cache
def logps(version, which):
    model = load_train_model(version) if which == "policy" else load_reference_model(version)
    return train.token_logps(model, train.collate_pairs(fixture_pairs(version)))


@pytest.mark.parametrize("version", TRAIN_VERSIONS)
def test_pair_batch_matches_official(version):
    _, want = fixture(version)
    batch = train.collate_pairs(fixture_pairs(version))
    for key in ("input_ids", "labels", "attention_mask"):
        np.testing.assert_array_equal(batch[key], want[key], err_msg=key)
    np.testing.assert_array_equal(batch["position_ids"], want["position_ids"])
    for row in range(len(batch["input_ids"])):
        np.testing.assert_array_equal(batch["image_bound"][row], want[f"image_bound_{row}"])
        np.testing.assert_array_equal(batch["tgt_sizes"][row], want[f"tgt_sizes_{row}"])


@pytest.mark.parametrize("version", TRAIN_VERSIONS)
@pytest.mark.parametrize("which", ["policy", "reference"])
def test_logps_match_official(version, which):
    meta, want = fixture(version)
    per, mask = logps(version, which)
    np.testing.assert_array_equal(mask, want["loss_mask"])
    np.testing.assert_allclose(
        per[mask], want[f"{which}_per_token_logps"][mask], atol=1e-4, rtol=0
    )
    official = meta["logps"][which]
    p = len(meta["samples"])
    total = per.sum(-1)
    np.testing.assert_allclose(total[:p], official["chosen"], rtol=1e-4)
    np.testing.assert_allclose(total[p:], official["rejected"], rtol=1e-4)
    average = total / mask.sum(-1)
    np.testing.assert_allclose(average[:p], official["chosen_avg"], rtol=1e-4)
    np.testing.assert_allclose(average[p:], official["rejected_avg"], rtol=1e-4)
    assert mask.sum(-1).tolist() == meta["n_label_tokens"]


def test_sequence_logps_is_the_token_sum():
    """The public [B] function equals the per-token sum (and the mean with average=True)."""
    version = "minicpm-v-2_6"
    batch = train.collate_pairs(fixture_pairs(version))
    per, mask = logps(version, "policy")
    model = load_train_model(version)
    np.testing.assert_allclose(train.sequence_logps(model, batch), per.sum(-1), rtol=1e-6)
    np.testing.assert_allclose(
        train.sequence_logps(model, batch, average=True), per.sum(-1) / mask.sum(-1), rtol=1e-6
    )


@pytest.mark.parametrize("version", TRAIN_VERSIONS)
@pytest.mark.parametrize("beta", ["0.5", "0.1"])
def test_dpo_loss_matches_official(version, beta):
    meta, _ = fixture(version)
    want = meta["dpo"][beta]
    p = len(meta["samples"])
    (pol, _), (ref, _) = logps(version, "policy"), logps(version, "reference")
    ours = [pol.sum(-1)[:p], pol.sum(-1)[p:], ref.sum(-1)[:p], ref.sum(-1)[p:]]
    o = meta["logps"]
    official = [o["policy"]["chosen"], o["policy"]["rejected"]]
    official += [o["reference"]["chosen"], o["reference"]["rejected"]]
    for inputs, atol in ((official, 1e-6), (ours, 1e-5)):
        inputs = [np.asarray(x, np.float32) for x in inputs]
        losses = np.asarray(train.dpo_loss(*inputs, float(beta)))
        np.testing.assert_allclose(losses, want["losses"], atol=atol)
        stats = {k: np.asarray(v) for k, v in train.dpo_rewards(*inputs, float(beta)).items()}
        np.testing.assert_allclose(stats["losses"], want["losses"], atol=atol)
        np.testing.assert_allclose(losses.mean(), want["loss"], atol=atol)
        np.testing.assert_allclose(stats["chosen_rewards"], want["chosen_rewards"], atol=atol)
        np.testing.assert_allclose(stats["rejected_rewards"], want["rejected_rewards"], atol=atol)
        np.testing.assert_array_equal(stats["reward_accuracies"], want["reward_accuracies"])
        np.testing.assert_allclose(
            stats["margins"],
            np.subtract(want["chosen_rewards"], want["rejected_rewards"]),
            atol=2 * atol,
        )
    # --dpo_use_average: the same loss of the averaged log-probs
    avg = [o["policy"]["chosen_avg"], o["policy"]["rejected_avg"]]
    avg += [o["reference"]["chosen_avg"], o["reference"]["rejected_avg"]]
    avg = [np.asarray(x, np.float32) for x in avg]
    np.testing.assert_allclose(
        np.asarray(train.dpo_loss(*avg, float(beta))), want["losses_dpo_use_average"], atol=1e-6
    )
