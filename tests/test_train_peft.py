"""PEFT interoperability: adapter export in PEFT's layout, merged full-model export.

The fixture adapter was written by peft's save_pretrained: an exported adapter must have its file
names, shapes and values (exact: a load / save round trip) and its config fields; a merged model
saved and exported must reproduce PEFT's merge_and_unload logits (5e-4) and the official tensor
names.
"""

import json

import numpy as np
from safetensors.numpy import load_file
from train_helpers import adapter_model, batch_rows, fixture_logits, train_checkpoint, train_dir

from minicpmv_jax import MiniCPMV, train

VERSION = "minicpm-v-2_6"


def test_export_adapter_round_trip(tmp_path):
    model = adapter_model(VERSION)
    out = train.export_adapter(model, tmp_path / "adapter")
    fixture = train_dir(VERSION) / "batch" / "lora" / "adapter"
    want = load_file(str(fixture / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for name, a in want.items():
        assert got[name].shape == a.shape, name
        np.testing.assert_array_equal(got[name], a, err_msg=name)
    want_cfg = json.loads((fixture / "adapter_config.json").read_text())
    got_cfg = json.loads((out / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "bias"):
        assert got_cfg[key] == want_cfg[key], key
    # and it loads back into the same model
    again = MiniCPMV.from_pretrained(
        train_checkpoint(VERSION), dtype="float32", progress=False, adapter=out
    )
    rows = batch_rows(VERSION, again)[:1]
    np.testing.assert_allclose(
        train.forward_logits(again, train.collate(rows)),
        fixture_logits(VERSION, "lora/merged_logits_sample0.npz"),
        atol=5e-4,
    )


def test_merged_model_exports(tmp_path):
    from convert.to_safetensors import convert

    model = adapter_model(VERSION)
    orbax = train.save_merged(model, tmp_path / "merged", progress=False)
    reloaded = MiniCPMV.from_pretrained(orbax, dtype="float32", progress=False)
    rows = batch_rows(VERSION, reloaded)[:1]
    np.testing.assert_allclose(
        train.forward_logits(reloaded, train.collate(rows)),
        fixture_logits(VERSION, "lora/merged_logits_sample0.npz"),
        atol=5e-4,
    )
    convert(orbax, tmp_path / "hf", dtype="float32", progress=False)
    names = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    base = set(load_file(str(train_checkpoint(VERSION) / "model.safetensors")))
    assert names == base
