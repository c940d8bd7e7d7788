"""Converters: official -> orbax -> official is bit-identical (every tensor: same bytes, same
dtype, same name) for every fixture version; sharded export writes a valid index; the
command-line entry points print a summary."""

from __future__ import annotations

import json

import ml_dtypes  # noqa: F401  (numpy learns bfloat16 for safetensors' numpy reader)
import numpy as np
import pytest
from conftest import FIXTURES, VERSIONS
from safetensors import safe_open

from convert import to_orbax, to_safetensors
from minicpmv_jax import checkpoint


def _tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as r:
            for k in r.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[k] = r.get_tensor(k)
    return out


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, x in a.items():
        assert x.dtype == b[k].dtype, k
        assert x.shape == b[k].shape, k
        assert x.tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_is_bit_identical(version, tmp_path):
    src = FIXTURES / version / "checkpoint"
    summary = to_orbax.convert(src, tmp_path / "orbax", progress=False)
    # "auto" keeps the source dtype (2.5 ships float16, 2.6 / 4.5 bfloat16)
    assert summary["dtype"] == {"minicpm-llama3-v-2_5": "float16"}.get(version, "bfloat16")
    assert checkpoint.is_orbax_checkpoint(tmp_path / "orbax")
    # small shards: exercises the multi-file layout + index
    s = to_safetensors.convert(
        tmp_path / "orbax", tmp_path / "back", max_shard_size="1MB", progress=False
    )
    back = tmp_path / "back"
    _assert_identical(_tensors(src), _tensors(back))
    index = json.loads((back / "model.safetensors.index.json").read_text())
    files = {p.name for p in back.glob("model-*.safetensors")}
    assert len(files) > 1 and set(index["weight_map"].values()) == files
    assert index["weight_map"].keys() == _tensors(src).keys()
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in _tensors(src).values())
    for f in src.iterdir():  # config, tokenizer, processor files come back unchanged
        if f.suffix != ".safetensors":
            assert (back / f.name).read_bytes() == f.read_bytes(), f.name
    assert s["num_tensors"] == len(index["weight_map"])


def test_float32_orbax_round_trip_single_file(tmp_path):
    """bf16 -> float32 orbax -> bf16 is exact too; one shard -> plain model.safetensors."""
    src = FIXTURES / "minicpm-v-2_6" / "checkpoint"
    to_orbax.convert(src, tmp_path / "o32", dtype="float32", progress=False)
    meta = checkpoint.read_metadata(tmp_path / "o32")
    assert meta["dtype"] == "float32" and meta["tensors"]["llm.lm_head.weight"]["dtype"] == (
        "bfloat16"
    )
    to_safetensors.convert(tmp_path / "o32", tmp_path / "back", progress=False)
    assert not (tmp_path / "back" / "model.safetensors.index.json").exists()
    _assert_identical(_tensors(src), _tensors(tmp_path / "back"))


def test_command_line(tmp_path, capsys):
    src = FIXTURES / "minicpm-v-4_5" / "checkpoint"
    assert to_orbax.main([str(src), str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "MiniCPM-V 4.5" in out and "tensors" in out and "peak RSS" in out
    assert to_orbax.main([str(src), str(tmp_path / "o"), "--no-progress"]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    args = [str(tmp_path / "o"), str(tmp_path / "s"), "--no-progress", "--max-shard-size", "2MB"]
    assert to_safetensors.main(args) == 0
    assert "model-00001-of-00002.safetensors" in capsys.readouterr().out
    assert to_safetensors.main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2


def test_parse_size():
    assert to_safetensors.parse_size("5GB") == 5 * 10**9
    assert to_safetensors.parse_size("500MiB") == 500 * 2**20
    with pytest.raises(ValueError):
        to_safetensors.parse_size("lots")
    for zero in ("0", "0GB", 0):
        with pytest.raises(ValueError, match="at least 1 byte"):
            to_safetensors.parse_size(zero)


def test_saved_model_exports_in_source_dtypes(tmp_path):
    """A float32 model saved with checkpoint.save (e.g. after fine-tuning) exports back in the
    source checkpoint's dtypes; untouched weights come back bit-identical."""
    from minicpmv_jax.model import MiniCPMV

    src = FIXTURES / "minicpm-v-2_6" / "checkpoint"
    model = MiniCPMV.from_pretrained(src, dtype="float32", progress=False, load_processor=False)
    checkpoint.save(tmp_path / "ft", model, side_files_from=src, progress=False)
    assert checkpoint.read_metadata(tmp_path / "ft")["dtype"] == "float32"
    to_safetensors.convert(tmp_path / "ft", tmp_path / "back", progress=False)
    _assert_identical(_tensors(src), _tensors(tmp_path / "back"))


def test_int8_conversion_loads_quantized_on_a_mesh_and_exports_float(tmp_path):
    from conftest import load_case
    from model_inputs import batch_from_case

    from minicpmv_jax.model import MiniCPMV
    from minicpmv_jax.sharding import make_mesh

    src = FIXTURES / "minicpm-v-2_6" / "checkpoint"
    s = to_orbax.convert(src, tmp_path / "q", quant="int8", progress=False)
    assert s["quant"] == "int8" and s["bytes"] < s["num_params"] * 2  # int8 kernels: 1 byte
    kw = {"dtype": "float32", "progress": False, "load_processor": False}
    got = MiniCPMV.from_pretrained(tmp_path / "q", mesh=make_mesh((1, 2, 4)), **kw)
    kernel = got.state["llm"]["model"]["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert kernel.dtype == np.int8
    want = MiniCPMV.from_pretrained(src, quant="int8", **kw)  # quantized while loading
    batch = batch_from_case(
        load_case(FIXTURES / "minicpm-v-2_6" / "cases" / "single_100x90"), "2.6"
    )
    np.testing.assert_allclose(got.prompt_logits(batch), want.prompt_logits(batch), atol=1e-4)
    # export: official names, shapes and dtypes; values dequantized (close, not identical)
    to_safetensors.convert(tmp_path / "q", tmp_path / "back", progress=False)
    a, b = _tensors(src), _tensors(tmp_path / "back")
    assert a.keys() == b.keys()
    for k, x in a.items():
        assert (x.dtype, x.shape) == (b[k].dtype, b[k].shape), k
        xf, yf = x.astype(np.float32), b[k].astype(np.float32)
        np.testing.assert_allclose(yf, xf, atol=0.02 * float(np.abs(xf).max()) + 1e-6, err_msg=k)


def test_readme_path_commands_with_relative_paths(tmp_path, monkeypatch, capsys):
    """Every README command that takes a path, with relative paths, run from a working
    directory that is neither the repository nor the folders' parent (orbax needs absolute
    paths: each entry point resolves them first)."""
    import shutil

    from minicpmv_jax import cli
    from minicpmv_jax.model import MiniCPMV

    src = FIXTURES / "minicpm-v-2_6" / "checkpoint"
    shutil.copytree(src, tmp_path / "MiniCPM-V-2_6")
    shutil.copy(src.parent / "cases" / "single_448x448" / "image_0.png", tmp_path / "cat.png")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    # minicpmv-to-orbax SRC ./minicpm-v-2_6-orbax; minicpmv-to-safetensors ./o ./h
    assert to_orbax.main(["../MiniCPM-V-2_6", "./orbax", "--no-progress"]) == 0
    assert to_safetensors.main(["./orbax", "./hf", "--no-progress"]) == 0
    _assert_identical(_tensors(src), _tensors(tmp_path / "run" / "hf"))
    # MiniCPMV.from_pretrained("./minicpm-v-2_6-orbax"); checkpoint.save("./finetuned", model)
    model = MiniCPMV.from_pretrained("./orbax", progress=False)
    checkpoint.save("./finetuned", model, side_files_from="./orbax", progress=False)
    assert MiniCPMV.from_pretrained("finetuned", progress=False).config == model.config
    # minicpmv-jax chat --model ./MiniCPM-V-2_6 --image cat.jpg "..."; minicpmv-jax layout ...
    capsys.readouterr()
    chat = ["chat", "--model", "../MiniCPM-V-2_6", "--image", "../cat.png", "--dtype", "float32"]
    assert cli.main([*chat, "--max-new-tokens", "2", "--seed", "0", "What is this?"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["layout", "--model", "../MiniCPM-V-2_6", "--image", "../cat.png", "Q?"]) == 0


def test_failed_conversion_names_the_hidden_partial_folder(tmp_path, monkeypatch, capsys):
    src = FIXTURES / "minicpm-v-2_6" / "checkpoint"
    calls = {"n": 0}
    real = checkpoint.CheckpointWriter.write_group

    def failing(self, group, items):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("No space left on device")
        return real(self, group, items)

    monkeypatch.setattr(checkpoint.CheckpointWriter, "write_group", failing)
    monkeypatch.chdir(tmp_path)
    assert to_orbax.main([str(src), "out", "--no-progress"]) == 2
    err = capsys.readouterr().err
    partial = tmp_path / ".out.partial"
    assert "No space left on device" in err and str(partial) in err and partial.is_dir()
    from minicpmv_jax.errors import CheckpointError
    from minicpmv_jax.model import MiniCPMV

    with pytest.raises(CheckpointError, match=r"\.out\.partial"):
        MiniCPMV.from_pretrained("out", progress=False)

    def interrupted(self, group, items):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.CheckpointWriter, "write_group", interrupted)
    assert to_orbax.main([str(src), "out", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and str(partial) in err
    # the exporter too: Ctrl-C while reading the orbax groups
    monkeypatch.setattr(checkpoint.CheckpointWriter, "write_group", real)
    assert to_orbax.main([str(src), "out", "--no-progress"]) == 0
    monkeypatch.setattr(checkpoint, "iter_group_arrays", lambda *a, **k: interrupted(None, 0, 0))
    capsys.readouterr()
    assert to_safetensors.main(["out", "hf", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / ".hf.partial") in err
