"""Orbax checkpoints: save on one mesh, restore straight into another mesh's shardings;
from_pretrained(orbax folder); atomic, resumable writes; clear errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import FIXTURES, load_case
from flax import nnx
from model_inputs import batch_from_case

from minicpmv_jax import checkpoint, sharding
from minicpmv_jax.errors import CheckpointError
from minicpmv_jax.sharding import make_mesh

CKPT = FIXTURES / "minicpm-v-2_6" / "checkpoint"
CASE = FIXTURES / "minicpm-v-2_6" / "cases" / "single_100x90"


def _load(path, mesh, dtype="float32"):
    from minicpmv_jax.model import MiniCPMV

    return MiniCPMV.from_pretrained(
        path, dtype=dtype, mesh=mesh, progress=False, load_processor=False
    )


def _flat(model) -> dict:
    return {
        ".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(model.state)
    }


# With the slow tests (.ci/run): test_previous_lm_head_layout_restores_transposed keeps a restore
# onto another mesh (1 device -> (1, 2, 4), float32 and int8) in the default suite.
@pytest.mark.slow
def test_save_on_one_mesh_restore_on_another(tmp_path):
    src = _load(CKPT, make_mesh((1, 2, 4)))
    out = checkpoint.save(tmp_path / "ft", src, side_files_from=CKPT, progress=False)
    assert checkpoint.is_orbax_checkpoint(out)
    assert not checkpoint.partial_dir(out).exists()

    mesh = make_mesh((2, 2, 2))
    dst = _load(out, mesh)
    a, b = _flat(src), _flat(dst)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # every restored array already has the target mesh's rule sharding
    rules = sharding.rules_for(dst.config, mesh)
    for path, var in nnx.to_flat_state(dst.state):
        value = var.get_value()
        assert value.sharding.mesh == mesh
        want = sharding.named(mesh, sharding.logical_names(var), value.shape, rules)
        assert value.sharding.is_equivalent_to(want, value.ndim), path
    batch = batch_from_case(load_case(CASE), "2.6")
    np.testing.assert_allclose(
        dst.prompt_logits(batch), src.prompt_logits(batch), rtol=0, atol=1e-4
    )


def test_restore_casts_dtype_and_checks_shapes(tmp_path):
    src = _load(CKPT, None)
    out = checkpoint.save(tmp_path / "f32", src, side_files_from=CKPT, progress=False)
    half = _load(out, make_mesh((1, 1, 8)), dtype="bfloat16")
    leaf = half.state["llm"]["lm_head"]["weight"].get_value()
    assert leaf.dtype == jax.numpy.bfloat16
    # a config that does not match the stored parameters: one clear error
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 384
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match the model config"):
        _load(out, None)


def test_interrupted_save_leaves_nothing_loadable_and_resumes(tmp_path, monkeypatch):
    from convert import to_orbax

    out = tmp_path / "orbax"
    calls = {"n": 0}
    real = checkpoint.CheckpointWriter.write_group

    def flaky(self, group, items):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # as if the process were stopped mid-conversion
        return real(self, group, items)

    monkeypatch.setattr(checkpoint.CheckpointWriter, "write_group", flaky)
    with pytest.raises(KeyboardInterrupt):
        to_orbax.convert(CKPT, out, progress=False)
    assert not out.exists()
    partial = checkpoint.partial_dir(out)
    assert partial.exists() and not checkpoint.is_orbax_checkpoint(partial)
    with pytest.raises(CheckpointError):
        checkpoint.read_metadata(out)

    monkeypatch.setattr(checkpoint.CheckpointWriter, "write_group", real)
    summary = to_orbax.convert(CKPT, out, progress=False)
    assert summary["resumed"]
    assert checkpoint.is_orbax_checkpoint(out) and not partial.exists()
    ref = _flat(_load(CKPT, None))
    got = _flat(_load(out, None))
    for k in ref:
        np.testing.assert_array_equal(ref[k], got[k], err_msg=k)


def test_refuses_to_overwrite(tmp_path):
    from convert import to_orbax

    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(CheckpointError, match="exists"):
        to_orbax.convert(CKPT, out, progress=False)


def _in_previous_layout(state: nnx.State) -> nnx.State:
    """A parameter state as checkpoints stored it before the torch-layout lm_head: the
    weight [V, D] as an nnx.Linear's `kernel` [D, V] (an int8 scale as `kernel_scale`)."""
    leaves = []
    for path, var in nnx.to_flat_state(state):
        leaf = str(path[-1])
        if path[:2] == ("llm", "lm_head") and leaf in checkpoint.OTHER_LAYOUT:
            value = np.asarray(var.get_value())
            path = path[:-1] + (checkpoint.OTHER_LAYOUT[leaf],)
            var = nnx.Param(value.T if leaf == "weight" else value)
        leaves.append((path, var))
    return nnx.from_flat_state(leaves)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_previous_lm_head_layout_restores_transposed(tmp_path, quant):
    """An orbax folder written when the lm_head was stored [D, V] (`llm.lm_head.kernel`, int8:
    plus `kernel_scale`) restores into today's [V, D] weight, on another mesh: every array equal
    to the source model's, with the rule sharding."""
    from minicpmv_jax.model import MiniCPMV

    kw = {"dtype": "float32", "progress": False, "load_processor": False, "quant": quant}
    src = MiniCPMV.from_pretrained(CKPT, mesh=make_mesh((1, 1, 1)), **kw)
    old = _in_previous_layout(src.state)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(old)}
    assert "llm.lm_head.kernel" in names and "llm.lm_head.weight" not in names
    out = checkpoint.save(tmp_path / "old", old, side_files_from=CKPT, progress=False)
    mesh = make_mesh((1, 2, 4))
    dst = MiniCPMV.from_pretrained(out, mesh=mesh, **kw)
    a, b = _flat(src), _flat(dst)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    rules = sharding.rules_for(dst.config, mesh)
    head = dst.state["llm"]["lm_head"]["weight"]
    want = sharding.named(mesh, sharding.logical_names(head), head.get_value().shape, rules)
    assert head.get_value().sharding.is_equivalent_to(want, 2)
    # a stored shape that fits neither layout is still reported, naming the parameter
    broken = _in_previous_layout(src.state)
    kernel = broken["llm"]["lm_head"]["kernel"]
    kernel.set_value(np.asarray(kernel.get_value())[:, :-1])
    out = checkpoint.save(tmp_path / "broken", broken, side_files_from=CKPT, progress=False)
    shape = r"\(\d+, \d+\)"
    with pytest.raises(CheckpointError, match=rf"llm\.lm_head\.weight: .*kernel has shape {shape}"):
        MiniCPMV.from_pretrained(out, mesh=mesh, **kw)


def test_checkpoint_restores_into_the_other_decoder_layout(tmp_path):
    """The decoder projections stored [out, in] (`weight`, a bf16 model on CPU) and [in, out]
    (`kernel`, float32 / GPU / checkpoints written before `LlmConfig.out_in`): an orbax folder
    written with either layout restores into a model of the other, every array equal to the
    source's (transposed) and the prompt logits equal to the same model loaded from safetensors
    in the target layout (same bits: same arithmetic)."""
    from minicpmv_jax.model import CPU_BF16_OUT_IN, MiniCPMV

    kw = {"dtype": "bfloat16", "progress": False, "load_processor": False}
    mesh = make_mesh((1, 1, 1))
    out_in = MiniCPMV.from_pretrained(CKPT, mesh=mesh, **kw)  # the CPU bf16 choice
    in_out = MiniCPMV.from_pretrained(CKPT, mesh=mesh, out_in=(), **kw)
    assert out_in.config.llm.out_in == CPU_BF16_OUT_IN and in_out.config.llm.out_in == ()
    batch = batch_from_case(load_case(CASE), "2.6")
    for src, dst in ((out_in, in_out), (in_out, out_in)):
        layout = src.config.llm.out_in
        out = checkpoint.save(tmp_path / f"saved{len(layout)}", src, side_files_from=CKPT,
                              progress=False)  # fmt: skip
        got = MiniCPMV.from_pretrained(out, mesh=mesh, out_in=dst.config.llm.out_in, **kw)
        a, b = _flat(got), _flat(dst)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_array_equal(got.prompt_logits(batch), dst.prompt_logits(batch))
