"""safetensors loading: sharded folders, storage dtypes, one error for every mismatch, corrupt
files, the round trip model -> checkpoint names, and hub ids offline."""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES
from flax import nnx
from safetensors.numpy import load_file, save_file

from minicpmv_jax import weights
from minicpmv_jax.errors import CheckpointError
from minicpmv_jax.model import MiniCPMV
from minicpmv_jax.weights import (
    ALIGN,
    BLOCK,
    MAPPED_BYTES,
    PARALLEL_BYTES,
    MappedFile,
    aligned_empty,
    copy_into,
    path_name,
    to_hf_state_dict,
)

SRC = FIXTURES / "minicpm-v-2_6" / "checkpoint"  # bf16 storage


def _load(folder, dtype="float32"):
    return MiniCPMV.from_pretrained(folder, dtype=dtype, load_processor=False, progress=False)


@functools.cache
def reference():
    return {path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(_load(SRC).state)}


def _folder_with(tmp_path, tensors: dict, shards: int = 1):
    """A checkpoint folder with SRC's json files and `tensors` (sharded when shards > 1)."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for f in SRC.glob("*.json"):
        shutil.copy(f, out / f.name)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"))
        return out
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / fname))
        weight_map.update({n: fname for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def _src_tensors():
    return load_file(str(SRC / "model.safetensors"))


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_sharded_folder_any_storage_dtype(tmp_path, storage):
    dt = ml_dtypes.bfloat16 if storage == "bfloat16" else np.dtype(storage)
    tensors = {k: v.astype(np.float32).astype(dt) for k, v in _src_tensors().items()}
    folder = _folder_with(tmp_path, tensors, shards=3)
    got = {
        path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(_load(folder).state)
    }
    ref = reference()
    assert got.keys() == ref.keys()
    # fp32 / bf16 hold the bf16 values exactly; fp16 rounds some of them
    atol = 0 if storage != "float16" else 1e-2
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=atol, rtol=1e-2 if atol else 0, err_msg=k)


def test_load_bf16_params_from_bf16_storage():
    m = _load(SRC, "bfloat16")
    leaves = [v.get_value() for _, v in nnx.to_flat_state(m.state)]
    assert {x.dtype for x in leaves} == {np.dtype(ml_dtypes.bfloat16)}


def test_blocked_transposed_copy_into_an_aligned_buffer():
    # a transposed bf16 checkpoint tensor crossing block boundaries (2.5 blocks of rows), large
    # enough to be copied by the thread pool as float32 (PARALLEL_BYTES), and a small one
    for cols in (PARALLEL_BYTES // 4 // (BLOCK * 2) + 1, 7):
        src = np.random.default_rng(0).standard_normal((BLOCK * 5 // 2, cols), np.float32)
        src = src.astype(ml_dtypes.bfloat16)
        dst = aligned_empty((cols, src.shape[0]), np.float32)
        assert dst.ctypes.data % ALIGN == 0
        copy_into(dst, src.T)
        np.testing.assert_array_equal(dst, src.T.astype(np.float32))
        stacked = aligned_empty((2, cols, src.shape[0]), ml_dtypes.bfloat16)
        copy_into(stacked[1], src.T)  # one layer of a stacked parameter
        np.testing.assert_array_equal(stacked[1], src.T)
        rows = aligned_empty(src.shape, np.float32)  # untransposed: split into row pieces
        copy_into(rows, src)
        np.testing.assert_array_equal(rows, src.astype(np.float32))
    if jax.default_backend() == "cpu":  # the loader relies on this: no second copy of a weight
        assert jax.device_put(dst).unsafe_buffer_pointer() == dst.ctypes.data


@pytest.mark.parametrize("src_dtype", [ml_dtypes.bfloat16, np.float32])
def test_copy_into_pieces_equal_numpy(monkeypatch, src_dtype):
    # untransposed row pieces of PIECE_BYTES (here 3 rows and a bit: uneven, with a remainder)
    # and transposed BLOCKs, both through the thread pool; odd shapes, one row, one column
    monkeypatch.setattr(weights, "PIECE_BYTES", 3 * 1001 * 4 + 8)
    rng = np.random.default_rng(1)
    for shape in [(1061, 1001), (BLOCK * 2 + 5, 1001), (1, 3001), (3001, 1), (7, 3)]:
        src = rng.standard_normal(shape, np.float32).astype(src_dtype)
        straight = aligned_empty(shape, np.float32)
        copy_into(straight, src)
        np.testing.assert_array_equal(straight, np.asarray(src, np.float32))
        transposed = aligned_empty(shape[::-1], np.float32)
        copy_into(transposed, src.T)
        np.testing.assert_array_equal(transposed, np.asarray(src.T, np.float32))
    assert weights.PARALLEL_BYTES <= 1061 * 1001 * 4  # the first shape takes the parallel path


def test_mapped_reader_matches_safetensors(tmp_path):
    """MappedFile's views hold what safetensors reads, for every dtype it maps, at offsets that
    are not 64-byte aligned; the views are read-only and `release` leaves them readable."""
    rng = np.random.default_rng(0)
    tensors = {
        "bf16": rng.standard_normal((5, 7), np.float32).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((3,), np.float32).astype(np.float16),
        "f32": rng.standard_normal((2, 3, 5), np.float32),
        "f64": rng.standard_normal((1,)),
        "i8": rng.integers(-128, 128, (9,), dtype=np.int8),
        "u8": rng.integers(0, 256, (3, 1), dtype=np.uint8),
        "i64": rng.integers(-(2**40), 2**40, (2,)),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 4), np.float32),
    }
    f = tmp_path / "t.safetensors"
    save_file(tensors, str(f))
    mapped = MappedFile(f)
    offsets = {n: e[2] for n, e in mapped.entries.items()}
    assert any(o % ALIGN for o in offsets.values())  # the reader does not rely on alignment
    for name, want in load_file(str(f)).items():
        got = mapped.tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert not got.flags.writeable
        mapped.release(name)
        np.testing.assert_array_equal(got, want, err_msg=name)  # pages come back on read
    assert mapped.tensor("not there") is None


def test_mapped_reader_reports_truncated_data(tmp_path):
    f = tmp_path / "t.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(f))
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*w: bytes"):
        MappedFile(f)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt or truncated.*not JSON"):
        MappedFile(f)


def test_large_staging_buffer_is_a_mapping_that_device_put_aliases():
    a = aligned_empty((MAPPED_BYTES // 4 + 3,), np.float32)
    assert a.ctypes.data % ALIGN == 0
    a[...] = np.arange(a.size, dtype=np.float32)
    if jax.default_backend() == "cpu":
        x = jax.device_put(a)
        assert x.unsafe_buffer_pointer() == a.ctypes.data
        del a  # the device array keeps the mapping alive
        np.testing.assert_array_equal(np.asarray(x), np.arange(x.size, dtype=np.float32))


def test_one_error_lists_missing_unexpected_and_mismatched(tmp_path):
    tensors = _src_tensors()
    del tensors["llm.model.layers.1.mlp.up_proj.weight"]
    tensors["vpm.encoder.layers.7.mlp.fc9.weight"] = np.zeros((2, 2), np.float32)
    tensors["resampler.query"] = np.zeros((3, 256), ml_dtypes.bfloat16)
    folder = _folder_with(tmp_path, tensors)
    with pytest.raises(CheckpointError) as e:
        _load(folder)
    msg = str(e.value)
    assert "missing" in msg and "llm.model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected" in msg and "vpm.encoder.layers.7.mlp.fc9.weight" in msg
    assert "shape" in msg and "resampler.query" in msg and "(3, 256)" in msg


def test_many_unexpected_tensors_are_counted_not_all_listed(tmp_path):
    tensors = _src_tensors()
    for i in range(20):  # e.g. a config with fewer layers than the checkpoint
        tensors[f"llm.model.layers.{100 + i}.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(CheckpointError) as e:
        _load(_folder_with(tmp_path, tensors))
    msg = str(e.value)
    assert "20 unexpected tensor(s)" in msg and "... and 12 more" in msg
    assert msg.count("llm.model.layers.1") == 8


def test_truncated_file_is_reported(tmp_path):
    folder = _folder_with(tmp_path, _src_tensors())
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        _load(folder)


def test_garbage_header_is_reported(tmp_path):
    folder = _folder_with(tmp_path, _src_tensors())
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        _load(folder)


def test_missing_shard_and_config(tmp_path):
    folder = _folder_with(tmp_path, _src_tensors(), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        _load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        _load(folder)


def test_round_trip_to_checkpoint_names():
    """checkpoint -> model -> checkpoint layout is the identity (names, shapes, values)."""
    src = {k: v.astype(np.float32) for k, v in _src_tensors().items()}
    back = to_hf_state_dict(_load(SRC).state)
    assert back.keys() == src.keys()
    for k, want in src.items():
        np.testing.assert_array_equal(back[k], want, err_msg=k)


def test_round_trip_bf16_is_bit_exact():
    """bf16 storage loaded as bf16 keeps every bit (views of the file or copies alike)."""
    src = _src_tensors()
    back = to_hf_state_dict(_load(SRC, "bfloat16").state)
    assert back.keys() == src.keys()
    for k, want in src.items():
        assert back[k].dtype == want.dtype, k
        np.testing.assert_array_equal(back[k].view(np.uint16), want.view(np.uint16), err_msg=k)


def test_lm_head_is_the_checkpoint_tensor_as_stored():
    """The lm_head keeps torch's layout: `llm.lm_head.weight` [V, D] is the checkpoint tensor
    itself (no transpose), and the logits are h W^T (numpy reference, float32)."""
    want = _src_tensors()["llm.lm_head.weight"].astype(np.float32)
    ref = reference()
    assert "llm.lm_head.kernel" not in ref
    np.testing.assert_array_equal(ref["llm.lm_head.weight"], want)
    model = _load(SRC)
    h = np.random.default_rng(0).normal(size=(2, 3, want.shape[1])).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got = model.module.llm.logits(jnp.asarray(h))
    np.testing.assert_allclose(np.asarray(got), h @ want.T, rtol=1e-5, atol=1e-5)


def test_gradients_under_official_names():
    """to_hf_state_dict maps a gradient tree of the stacked layout to the official per-layer
    tensors: loss = sum_l (l + 1) * sum(q_proj kernel of layer l) has gradient l + 1 in
    `llm.model.layers.{l}.self_attn.q_proj.weight` (and in no other layer's tensor)."""
    model = _load(SRC)
    params = nnx.state(model.module, nnx.Param)

    def loss(p):
        k = p["llm"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"][...]  # [L, D, N*H]
        return jnp.sum(k * (jnp.arange(k.shape[0]) + 1.0)[:, None, None])

    grads = to_hf_state_dict(jax.grad(loss)(params))
    names = to_hf_state_dict(params)
    assert grads.keys() == names.keys() == _src_tensors().keys()
    for name, g in grads.items():
        assert g.shape == names[name].shape, name
        want = 0.0
        if name.startswith("llm.") and name.endswith("self_attn.q_proj.weight"):
            want = int(name.split(".")[3]) + 1.0
        np.testing.assert_array_equal(g, np.full_like(g, want), err_msg=name)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="hub"):
        _load("openbmb/this-model-does-not-exist-here")


def test_not_a_folder():
    with pytest.raises(CheckpointError):
        _load("/nonexistent/dir/for/sure")
