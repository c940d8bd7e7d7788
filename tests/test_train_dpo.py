"""Preference alignment (RLAIF-V) against the official code (train fixtures' dpo/, float32).

Tolerances (the issue's): per-sample summed label log-probs of the policy (the fixture
checkpoint) and the reference (dpo/reference_checkpoint) within 1e-4 relative; per-token
log-probs within 1e-4 absolute where the official loss_mask is set (the mask itself exact);
DPO losses, rewards and reward accuracies for beta 0.5 and 0.1 within 1e-5 (from our log-probs;
with the official log-probs as inputs, 1e-6); the train step's objective on the bucketed batch
within 2e-5. The collated pair batch (ids, labels, image bounds, slice sizes) is exact.

Training checks run on the 2.6 checkpoint at 112 px (one 64-patch slice per image) with LoRA on
the LLM only, so each step is a small program: it learns (40 steps), the reference cache, the
LoRA reference, and `minicpmv-jax dpo` end to end (text-only pairs).
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
    processor,
)

from minicpmv_jax import train
from minicpmv_jax.errors import DataError


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
    np.testing.assert_allclose(per[mask], want[f"{which}_per_token_logps"][mask], atol=1e-4, rtol=0)
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
    # -log sigmoid(beta * (pc - rc - pr + rr)) moves by at most beta * |change of its argument|
    # (its slope is below 1), so our log-probs' own distance from the official ones bounds the
    # loss error they can cause: summed float32 log-probs differ across CPUs in the last digits
    off = [np.asarray(x, np.float64) for x in official]
    drift = sum(np.abs(np.asarray(a, np.float64) - b) for a, b in zip(ours, off))
    bound = float(beta) * float(np.max(drift)) + 1e-6
    for inputs, atol in ((official, 1e-6), (ours, bound)):
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


def test_training_objective_matches_official():
    """The objective the DPO train step differentiates, on the fixture pair batch (bucketed and
    placed as the trainer does) with the reference's log-probs: its loss is RLAIF-V's
    trainer loss for beta 0.5, with summed and with averaged (dpo_use_average) log-probs, and its
    reward metrics the means of the official per-pair rewards and accuracies, within 2e-5 (the
    bucketed, padded batch is a different float32 program from the unpadded one: ~2e-5 in the
    summed log-probs, times beta)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minicpmv_jax.train.dpo import DpoObjective
    from minicpmv_jax.train.loop import device_batch

    version = "minicpm-v-2_6"
    meta, _ = fixture(version)
    model, pairs = load_train_model(version), fixture_pairs(version)
    per, mask = logps(version, "reference")  # ours (the official ones: test_logps_match_official)
    total, average = per.sum(-1), per.sum(-1) / mask.sum(-1)
    cfg = train.TrainConfig(batch_size=3, token_buckets=(96,))
    arrays, groups = device_batch(model, train.collate_pairs(pairs), cfg)
    settings = [(False, total[:3], total[3:]), (True, average[:3], average[3:])]

    @jax.jit
    def objectives(state, arrays):
        module = nnx.merge(model.graphdef, state)
        out = []
        for average, chosen, rejected in settings:
            extra = {
                "ref_chosen": jnp.asarray(chosen, jnp.float32),
                "ref_rejected": jnp.asarray(rejected, jnp.float32),
                "pair_valid": jnp.ones(3, bool),
            }
            objective = DpoObjective(train.DpoConfig(beta=0.5, average=average))
            out.append(objective(module, {**arrays, **extra}, groups))
        return out

    with model._precision():
        (loss, metrics), (avg_loss, _) = jax.device_get(objectives(model.state, arrays))
    want = meta["dpo"]["0.5"]
    np.testing.assert_allclose(loss, want["loss"], atol=2e-5)
    np.testing.assert_allclose(avg_loss, want["loss_dpo_use_average"], atol=2e-5)
    np.testing.assert_allclose(
        metrics["rewards/chosen"], np.mean(want["chosen_rewards"]), atol=2e-5
    )
    np.testing.assert_allclose(
        metrics["rewards/rejected"], np.mean(want["rejected_rewards"]), atol=2e-5
    )
    assert metrics["rewards/accuracies"] == np.float32(np.mean(want["reward_accuracies"]))
    assert int(metrics["tokens"]) == sum(meta["n_label_tokens"])


# ---------------------------------------------------------------------------------------------
# Preference data: formats and bad records
# ---------------------------------------------------------------------------------------------


def records(version="minicpm-v-2_6"):
    return json.loads((dpo_dir(version) / "data.json").read_text())


def test_jsonl_and_image_bytes_give_the_same_pairs(tmp_path):
    """JSONL records, and images given as Parquet-style {"bytes", "path"} dicts, build the same
    pairs as the JSON file with image paths; RLAIF-V's extra fields are ignored."""
    version = "minicpm-v-2_6"
    proc = processor(version)
    want, _ = train.load_preferences(proc, dpo_dir(version) / "data.json")
    lines = []
    for r in records(version):
        data = (dpo_dir(version) / r["image"]).read_bytes()
        extra = {"ds_name": "RLAIF-V", "origin_dataset": "x", "origin_split": "{}", "idx": 7}
        lines.append(json.dumps({**r, **extra, "image": r["image"]}))
        r = {**r, "image": {"bytes": data, "path": None}}
        got = train.preference_pair(proc, r)
        pair = want[len(lines) - 1]
        for side in ("chosen", "rejected"):
            for key in ("input_ids", "labels", "image_bound", "tgt_sizes"):
                np.testing.assert_array_equal(got[side][key], pair[side][key])
            for a, b in zip(got[side]["pixel_values"], pair[side]["pixel_values"], strict=True):
                np.testing.assert_array_equal(a, b)
    (tmp_path / "images").symlink_to(dpo_dir(version) / "images")
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    got, _ = train.load_preferences(proc, tmp_path / "prefs.jsonl")
    assert [p["id"] for p in got] == ["0", "1", "2"]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a["rejected"]["input_ids"], b["rejected"]["input_ids"])


def test_parquet_file_gives_the_same_pairs(tmp_path, monkeypatch):
    """An RLAIF-V style Parquet file (image structs with the bytes inline, the dataset's extra
    columns) builds the same pairs as the JSON file with image paths; without pyarrow, or with
    a broken file, a clear error names the file."""
    import pyarrow as pa  # the test extra installs it
    import pyarrow.parquet as pq

    version = "minicpm-v-2_6"
    proc = processor(version)
    want, _ = train.load_preferences(proc, dpo_dir(version) / "data.json")
    rows = [
        {
            **r,
            "image": {"bytes": (dpo_dir(version) / r["image"]).read_bytes(), "path": None},
            "ds_name": "RLAIF-V",
            "origin_split": "{}",
            "idx": k,
        }
        for k, r in enumerate(records(version))
    ]
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    got, skipped = train.load_preferences(proc, path)
    assert not skipped and [p["id"] for p in got] == [p["id"] for p in want]
    for a, b in zip(got, want, strict=True):
        for side in ("chosen", "rejected"):
            for key in ("input_ids", "labels", "image_bound", "tgt_sizes"):
                np.testing.assert_array_equal(a[side][key], b[side][key])
            for x, y in zip(a[side]["pixel_values"], b[side]["pixel_values"], strict=True):
                np.testing.assert_array_equal(x, y)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="cannot read the Parquet file"):
        train.read_preferences(broken)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="reading Parquet needs pyarrow"):
        train.read_preferences(path)


def bad_records():
    good = records()
    long_answer = " ".join(["stripes"] * 80)
    return [
        good[0],
        {**good[1], "id": "e1", "chosen": "  "},
        {**good[1], "id": "e2", "rejected": ""},
        {**good[1], "id": "s1", "rejected": good[1]["chosen"]},
        {**good[1], "id": "m1", "image": "images/does_not_exist.png"},
        {**good[2], "id": "l1", "rejected": long_answer},
        good[2],
    ]


WANT_ERRORS = [
    ("e1", "chosen", "empty answer"),
    ("e2", "rejected", "empty answer"),
    ("s1", "rejected", "identical to chosen"),
    ("m1", "image", "does_not_exist.png"),
    ("l1", "rejected", "longer than max_length=120"),
]


def test_bad_pairs_are_named_or_skipped():
    proc = processor("minicpm-v-2_6")
    root = dpo_dir("minicpm-v-2_6")
    for record, (sid, field, message) in zip(bad_records()[1:-1], WANT_ERRORS, strict=True):
        with pytest.raises(DataError, match=message) as e:
            train.load_preferences(proc, [record], image_root=root, max_length=120)
        assert (e.value.sample_id, e.value.field) == (sid, field)
        assert f"sample {sid!r}, field {field!r}" in str(e.value)
    pairs, skipped = train.load_preferences(
        proc, bad_records(), image_root=root, max_length=120, skip_bad_samples=True
    )
    assert [p["id"] for p in pairs] == ["0", "2"]
    assert [(e.sample_id, e.field) for e in skipped] == [(s, f) for s, f, _ in WANT_ERRORS]


# ---------------------------------------------------------------------------------------------
# Training: it learns, reference cache, LoRA reference, the command line
# ---------------------------------------------------------------------------------------------

VERSION = "minicpm-v-2_6"
# LoRA on every LLM Linear, nothing trained in full: the step never differentiates the vision
# tower (a cheap program on CPU)
ALL_LLM = r"llm\..*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LEARN = train.TrainConfig(
    mode="lora",
    steps=40,
    learning_rate=2e-2,
    batch_size=3,
    weight_decay=0.0,
    token_buckets=(96,),
    lora=train.LoraConfig(r=8, alpha=16, target_modules=ALL_LLM, modules_to_save=()),
)


@functools.cache
def small_model():
    """The fixture policy whose processor resizes images to 112 px, unsliced (one 64-patch slice
    per image): cheap steps."""
    from train_helpers import train_checkpoint

    from minicpmv_jax import MiniCPMV, MiniCPMVProcessor

    folder = train_checkpoint(VERSION)
    model = MiniCPMV.from_pretrained(folder, dtype="float32", progress=False)
    model.processor = MiniCPMVProcessor.from_pretrained(
        folder, scale_resolution=112, max_slice_nums=1, patch_buckets=(64,)
    )
    return model


@functools.cache
def small_pairs():
    pairs, _ = train.load_preferences(small_model(), dpo_dir(VERSION) / "data.json")
    return pairs


def greedy_answer(model, record, max_new_tokens):
    from PIL import Image

    with Image.open(dpo_dir(VERSION) / record["image"]) as im:
        content = [im.convert("RGB"), record["question"].removeprefix("<image>\n")]
    msgs = [{"role": "user", "content": content}]
    return model.chat(msgs, max_new_tokens=max_new_tokens, sampling=False, num_beams=1)


# End to end (40 steps, then chat): marked slow. The default suite checks its parts against the
# official RLAIF-V code: log-probs, losses, rewards and the training objective (tests above), the
# reference cache, the LoRA reference and the CLI's resume (tests below).
@pytest.mark.slow
def test_dpo_learns():
    """40 DPO steps (beta 0.1, RLAIF-V's SFT term at weight 1) on the fixture pairs: the first
    step's loss is log 2 with zero rewards (reference = the starting policy, LoRA B = 0); the
    reward accuracy reaches 1.0, every pair's chosen-minus-rejected log-prob margin grows by more
    than 50 nats (their mean by more than 10x), and greedy chat starts with the chosen answer."""
    model, pairs = small_model(), small_pairs()
    # log-probs before / after by the reference pass (the run's own program: one compilation)
    ref = train.reference_logps(model, pairs, LEARN)
    before = np.r_[ref.chosen, ref.rejected]
    dpo = train.DpoConfig(beta=0.1, sft_weight=1.0)
    trained, history = train.dpo_finetune(model, pairs, LEARN, dpo, progress=False)
    first, last = history[0], history[-1]
    dpo_part = first["loss"] + dpo.sft_weight * first["logps/chosen"]
    np.testing.assert_allclose(dpo_part, np.log(2), rtol=1e-4)
    assert abs(first["rewards/margins"]) < 1e-4 and abs(first["rewards/chosen"]) < 1e-4
    assert last["rewards/accuracies"] == 1.0, [h["rewards/accuracies"] for h in history]
    assert last["rewards/margins"] > 1.0
    ref = train.reference_logps(trained, pairs, LEARN)
    after = np.r_[ref.chosen, ref.rejected]
    p = len(pairs)
    margin_before, margin_after = before[:p] - before[p:], after[:p] - after[p:]
    assert np.all(margin_after - margin_before > 50), (margin_before, margin_after)
    assert margin_after.mean() > 10 * abs(margin_before.mean()), (margin_before, margin_after)
    for record in records(VERSION):
        answer = greedy_answer(trained, record, 4)
        assert answer and record["chosen"].startswith(answer), (answer, record["chosen"])
        assert not record["rejected"].startswith(answer)


def test_reference_cache_reuse_and_invalidation(tmp_path):
    """The reference log-probs equal sequence_logps of the reference; a rerun reads them back
    (no forward pass); a changed dataset or another reference recomputes them."""
    from train_helpers import reference_checkpoint

    from minicpmv_jax.train.loss import TRACE_COUNTS

    model, pairs = small_model(), small_pairs()
    batch = train.collate_pairs(pairs)
    cache = tmp_path / "reference_logps.npz"
    first = train.reference_logps(model, pairs, LEARN, cache=cache)
    assert not first.from_cache and cache.is_file()
    per, mask = train.token_logps(model, batch)
    np.testing.assert_allclose(np.r_[first.chosen, first.rejected], per.sum(-1), rtol=1e-5)
    assert np.r_[first.chosen_tokens, first.rejected_tokens].tolist() == mask.sum(-1).tolist()
    traces = TRACE_COUNTS["logps"]
    again = train.reference_logps(model, pairs, LEARN, cache=cache)
    assert again.from_cache and again.key == first.key
    np.testing.assert_array_equal(again.rejected, first.rejected)
    changed = [dict(records()[0], rejected="Another answer entirely."), *records()[1:]]
    changed, _ = train.load_preferences(model, changed, image_root=dpo_dir(VERSION))
    third = train.reference_logps(model, changed, LEARN, cache=cache)
    assert not third.from_cache and third.key != first.key
    np.testing.assert_allclose(third.chosen, first.chosen, rtol=1e-6)
    assert third.rejected[0] != first.rejected[0]
    folder = reference_checkpoint(VERSION)
    ref = train.reference_logps(model, pairs, LEARN, reference=folder, cache=cache)
    assert not ref.from_cache
    want = train.sequence_logps(load_reference_model(VERSION), batch)
    np.testing.assert_allclose(np.r_[ref.chosen, ref.rejected], want, rtol=1e-5)
    assert train.reference_logps(model, pairs, LEARN, reference=folder, cache=cache).from_cache
    assert TRACE_COUNTS["logps"] == traces  # every pass above reused one compiled program


def test_lora_reference_is_the_adapter_disabled_base():
    """With LoRA the reference is the base model with the adapter disabled: for the fixture's
    PEFT adapter (loaded and merged) the reference log-probs are the base checkpoint's, not the
    adapted policy's."""
    from train_helpers import adapter_model

    policy = adapter_model(VERSION)
    pairs = fixture_pairs(VERSION)
    cfg = train.TrainConfig(mode="lora", batch_size=3, token_buckets=(96,))
    ref = train.reference_logps(policy, pairs, cfg, disable_adapter=True)
    base = logps(VERSION, "policy")[0].sum(-1)
    np.testing.assert_allclose(np.r_[ref.chosen, ref.rejected], base, rtol=1e-5)
    adapted = train.sequence_logps(policy, train.collate_pairs(pairs))
    assert np.abs(adapted - base).max() > 1e-2  # the adapter does change the policy


# the DPO command line end to end (train, kill, resume, skip) runs with the slow tests; the DPO
# loss, log-probs and reference cache stay in the default run
@pytest.mark.slow
def test_dpo_cli_trains_resumes_and_skips(tmp_path, capsys, monkeypatch):
    """`minicpmv-jax dpo` (text-only pairs: cheap programs): a bad pair stops the run naming it;
    with --skip-bad-samples it is counted; the run writes the metrics, the cached reference
    log-probs of --reference and the adapter; the same command after a kill resumes and reuses
    the cache."""
    from train_helpers import Killed, reference_checkpoint, stop_after_step, train_checkpoint

    from minicpmv_jax.cli import main

    monkeypatch.chdir(tmp_path)
    good = [dict(r, image={}, question=r["question"].removeprefix("<image>\n")) for r in records()]
    lines = [good[0], good[1], dict(good[2], id="same", rejected=good[2]["chosen"])]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    argv = ["dpo", "--model", str(train_checkpoint(VERSION)), "--data", "prefs.jsonl"]
    argv += ["--output", "run", "--lora", "--lora-r", "4", "--lora-alpha", "8", "--beta", "0.5"]
    argv += ["--learning-rate", "1e-3", "--save-every", "1", "--no-progress", "--max-length", "96"]
    argv += ["--steps", "3"]
    assert main(argv) == 2
    assert "sample 'same', field 'rejected': identical to chosen" in capsys.readouterr().err
    argv += ["--skip-bad-samples", "--reference", str(reference_checkpoint(VERSION))]
    with monkeypatch.context() as m, pytest.raises(Killed):
        stop_after_step(m, 2)  # killed after step 2's save and metrics row
        main(argv)
    cache = tmp_path / "run" / "reference_logps.npz"
    written = cache.stat().st_mtime_ns
    assert main(argv) == 0  # the same command resumes at step 2
    assert cache.stat().st_mtime_ns == written  # reused
    out = capsys.readouterr().out
    assert "done: step 3" in out and "reward accuracy" in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    for key in keys:
        assert all(np.isfinite(r[key]) for r in rows), key
    assert all(r["skipped_samples"] == 1 for r in rows)
    # the reference is the other checkpoint: the first step's rewards are not zero
    assert abs(rows[0]["rewards/chosen"]) > 1e-3
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
