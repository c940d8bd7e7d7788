"""Fine-tuning data against the official dataset / collator outputs (train fixtures).

Tolerances: ids, labels, position ids, image bounds and slice sizes exact; pixels within 1e-6
(the same PIL bicubic resize and float32 normalisation give bit-identical values).
"""

import json
import pathlib

import numpy as np
import pytest
from train_helpers import (
    TRAIN_VERSIONS,
    fixture_batch,
    processor,
    sample_arrays,
    sft_samples,
    train_dir,
)

from minicpmv_jax import train
from minicpmv_jax.errors import DataError, MiniCPMVError


def _example(version, index, **kw):
    sample, meta = sft_samples(version)[index]
    kw.setdefault("max_length", meta["max_length"])
    return train.training_example(
        processor(version), sample, image_root=train_dir(version) / "sft", **kw
    )


@pytest.mark.parametrize(
    "version,index", [(v, i) for v in TRAIN_VERSIONS for i in range(len(sft_samples(v)))]
)
def test_training_example_matches_official(version, index):
    meta = sft_samples(version)[index][1]
    want = sample_arrays(version, meta["npz"])
    got = _example(version, index)
    keys = ("input_ids", "labels", "position_ids", "attention_mask", "image_bound", "tgt_sizes")
    for key in keys:
        assert got[key].shape == want[key].shape, (meta["name"], key)
        assert got[key].dtype == want[key].dtype, (meta["name"], key)
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{meta['name']}: {key}")
    n = sum(k.startswith("pixel_values_") for k in want)
    assert len(got["pixel_values"]) == n
    for k in range(n):
        np.testing.assert_allclose(got["pixel_values"][k], want[f"pixel_values_{k}"], atol=1e-6)
    assert processor(version).tokenizer.decode(got["input_ids"]) == meta["text"]


@pytest.mark.parametrize("version", TRAIN_VERSIONS)
def test_collate_matches_official(version):
    arrays, meta = fixture_batch(version)
    names = [m["name"] for _, m in sft_samples(version)]
    rows = [_example(version, names.index(n)) for n in meta["samples"]]
    batch = train.collate(rows)
    for key in ("input_ids", "labels", "position_ids", "attention_mask"):
        assert batch[key].dtype == arrays[key].dtype, key
        np.testing.assert_array_equal(batch[key], arrays[key], err_msg=key)
    for b in range(len(rows)):
        np.testing.assert_array_equal(batch["image_bound"][b], arrays[f"image_bound_{b}"])
        np.testing.assert_array_equal(batch["tgt_sizes"][b], arrays[f"tgt_sizes_{b}"])
        assert len(batch["pixel_values"][b]) == len(arrays[f"tgt_sizes_{b}"])


def test_collate_truncates_at_max_length():
    rows = [_example("minicpm-v-2_6", 0), _example("minicpm-v-2_6", 5)]
    batch = train.collate(rows, max_length=100)
    assert batch["input_ids"].shape == (2, 100)
    np.testing.assert_array_equal(batch["labels"][0], rows[0]["labels"][:100])


def test_truncation_without_answer_names_sample():
    # the truncated fixture keeps part of its answer at its max_length; 30 tokens keep none
    with pytest.raises(DataError, match=r"sample '4', field 'conversations'.*max_length=30"):
        _example("minicpm-v-2_6", 4, max_length=30)
    # 25 tokens cut the image placeholder itself (the official code raises on the bounds)
    with pytest.raises(DataError, match="sample '0'"):
        _example("minicpm-v-2_6", 0, max_length=25)


BAD_FIELDS = {
    "missing_image_file": "image",
    "placeholder_key_absent": "conversations[0].content",
    "empty_conversation": "conversations",
    "system_turn": "conversations[0].role",
    "system_turn_after_user": "conversations[1].role",
    "single_turn_user_only": "conversations",
    "no_image_key": "image",
}


@pytest.mark.parametrize("version", TRAIN_VERSIONS)
@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_bad_sample_names_id_and_field(version, case):
    bad = json.loads((train_dir(version) / "bad_data.json").read_text())["cases"][case]
    with pytest.raises(DataError) as e:
        train.training_example(
            processor(version), bad["item"], image_root=train_dir(version) / "sft"
        )
    assert e.value.sample_id == bad["item"]["id"]
    assert e.value.field == BAD_FIELDS[case]
    assert f"sample {bad['item']['id']!r}, field {BAD_FIELDS[case]!r}" in str(e.value)


def test_skip_bad_samples_counts(tmp_path):
    version = "minicpm-v-2_6"
    sft = train_dir(version) / "sft"
    bad = json.loads((train_dir(version) / "bad_data.json").read_text())["cases"]
    good = [s for s, _ in sft_samples(version)][:2]
    samples = [good[0], bad["missing_image_file"]["item"], good[1], bad["no_image_key"]["item"]]
    with pytest.raises(DataError):
        train.load_examples(processor(version), samples, image_root=sft)
    examples, skipped = train.load_examples(
        processor(version), samples, image_root=sft, skip_bad_samples=True
    )
    assert [e["id"] for e in examples] == [good[0]["id"], good[1]["id"]]
    want = [(bad[c]["item"]["id"], "image") for c in ("missing_image_file", "no_image_key")]
    assert [(e.sample_id, e.field) for e in skipped] == want


def test_data_file_errors(tmp_path):
    f = tmp_path / "train.json"
    f.write_bytes(b'[{"id": "0", "image": {}, "conversations": "\xff"}]')
    with pytest.raises(DataError, match="not UTF-8"):
        train.read_samples(f)
    f.write_text("[{")
    with pytest.raises(MiniCPMVError, match="not valid JSON"):
        train.read_samples(f)
    with pytest.raises(DataError, match="cannot read"):
        train.read_samples(tmp_path / "missing.json")


def test_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    sample = {
        "id": "b",
        "image": "broken.png",
        "conversations": [
            {"role": "user", "content": "<image>\nWhat?"},
            {"role": "assistant", "content": "A."},
        ],
    }
    with pytest.raises(DataError, match=r"sample 'b', field 'image'.*not a readable image"):
        train.training_example(processor("minicpm-v-2_6"), sample, image_root=tmp_path)


def test_relative_image_root_from_file(tmp_path):
    # load_examples(path) resolves image paths against the file's folder
    version = "minicpm-v-2_6"
    sft = train_dir(version) / "sft"
    sample = dict(sft_samples(version)[1][0], image=str(pathlib.Path(sft, "images/s01.png")))
    f = tmp_path / "data.json"
    f.write_text(json.dumps([sample]))
    examples, skipped = train.load_examples(processor(version), f)
    assert not skipped
    np.testing.assert_array_equal(
        examples[0]["input_ids"], sample_arrays(version, "01_no_placeholder.npz")["input_ids"]
    )
