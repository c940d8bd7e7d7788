"""Float32 parity of every stage with the official code's golden fixtures, for every case of
every version: vision tower, resampler, merged input embeddings, prompt logits."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from conftest import (
    FIXTURES,
    VERSIONS,
    all_cases,
    case_id,
    case_pil_messages,
    case_tgt_sizes,
    load_case,
)
from model_inputs import PATCH_BUCKETS, batch_from_case

from minicpmv_jax.batching import Buckets, prompt_positions
from minicpmv_jax.versions import parse as parse_version

TOL = {"vision": 1e-4, "resampler": 1e-4, "embeds": 1e-4, "logits": 5e-4}
STAGES = tuple(TOL)
CASES = all_cases()
CHAT_KWARGS = ("max_slice_nums", "use_image_id", "temporal_ids", "enable_thinking", "system_prompt")
BF16_CASES = 5  # single-image cases per version in the bf16 agreement test
LOGITS_F32: dict = {}  # float32 prompt logits of each case, filled by stage_errors


def _version(folder: str) -> str:
    import json

    cfg = json.loads((FIXTURES / folder / "checkpoint" / "config.json").read_text())
    return parse_version(cfg["version"])


@functools.cache
def model_for(folder: str, dtype: str = "float32"):
    from minicpmv_jax.model import MiniCPMV

    model = MiniCPMV.from_pretrained(FIXTURES / folder / "checkpoint", dtype=dtype, progress=False)
    # one token bucket for all fixture prompts and few slice buckets: the multi-slice cases hold 2
    # to 8 slices, two of them 10 and 12 (padded slices change no result: test_model_static), so
    # each version compiles its prompt and stage programs for 1, 8 and (2.6, 4.5) 12 slices only,
    # and no case runs the vision tower on more than 6 padding slices (test speed)
    model.configure_generation(Buckets(tokens=(256,), slices=(1, 8, 12)))
    return model


@functools.cache
def patch_bucket(folder: str) -> int:
    """One patch bucket per fixture folder (its largest slice) so cases share compilations."""
    most = max(int(case_tgt_sizes(c).prod(-1).max(initial=1)) for _, c in all_cases((folder,)))
    return next(b for b in PATCH_BUCKETS if b >= most)


def batch_for(folder: str, case) -> tuple[dict, dict]:
    """(fixture data, ProcessorOutput of the case's messages through `model.processor`)."""
    data = load_case(case)
    cj = data["case"]
    kwargs = {k: cj["chat_kwargs"][k] for k in CHAT_KWARGS if k in cj["chat_kwargs"]}
    proc = model_for(folder).processor
    return data, proc(case_pil_messages(case, cj), patch_bucket=patch_bucket(folder), **kwargs)


@functools.cache
def stage_errors(folder: str, case) -> dict[str, float]:
    """Max abs error per stage of one case (None where the case has no such stage)."""
    model = model_for(folder)
    data, batch = batch_for(folder, case)
    version = _version(folder)
    errs: dict[str, float | None] = {"vision": None, "resampler": None}
    logits, mid = model.prompt_logits(batch, return_intermediates=True)
    LOGITS_F32[(folder, case)] = logits
    if "vision" in data:
        got, want = mid["vision"], data["vision"]["last_hidden_state"]
        err = 0.0
        for i, (h, w) in enumerate(batch["tgt_sizes"]):
            # 2.5 quirk: every row up to maxL is attended (all-True mask), so all are meaningful.
            n = want.shape[1] if version == "2.5" else h * w
            err = max(err, float(np.abs(got[i, :n] - want[i, :n]).max()))
        errs["vision"] = err
        errs["resampler"] = float(np.abs(mid["resampler"] - data["resampler"]["output"]).max())
    errs["embeds"] = float(np.abs(mid["embeds"] - data["llm"]["inputs_embeds"][0]).max())
    errs["logits"] = float(np.abs(logits - data["llm"]["prompt_logits"][0]).max())
    return errs


# Text-only cases have no vision/resampler outputs, so those stages are not generated for them.
STAGE_CASES = [
    pytest.param(case, stage, id=f"{case_id(case)}-{stage}")
    for case in CASES
    for stage in STAGES
    if stage not in ("vision", "resampler") or (case[1] / "vision.npz").exists()
]


@pytest.mark.parametrize(("case", "stage"), STAGE_CASES)
def test_stage_parity(case, stage):
    """Per stage and case; tolerances: vision/resampler/embeds 1e-4, logits 5e-4 (abs)."""
    folder, case_dir = case
    err = stage_errors(folder, case_dir)[stage]
    assert err is not None, f"{folder}/{case_dir.name}: the {stage} stage did not run"
    assert err <= TOL[stage], f"{folder}/{case_dir.name} stage {stage}: max abs err {err:.3e}"


def test_parity_table():
    """Print the max error per stage per version (run with -s to see it)."""
    rows = []
    for folder in VERSIONS:
        worst = {s: 0.0 for s in STAGES}
        for f, c in all_cases((folder,)):
            for s, e in stage_errors(f, c).items():
                if e is not None:
                    worst[s] = max(worst[s], e)
        rows.append((folder, worst))
    print("\nmax abs error per stage (float32, all cases)")
    for folder, worst in rows:
        print(f"  {folder:24s} " + "  ".join(f"{s}={worst[s]:.2e}" for s in STAGES))
    for folder, worst in rows:
        for s in STAGES:
            assert worst[s] <= TOL[s], f"{folder} stage {s}: {worst[s]:.3e} > {TOL[s]}"


def test_prompt_logits_shape_and_type():
    folder, case = CASES[0]
    _, batch = batch_for(folder, case)
    out = model_for(folder).prompt_logits(batch)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (len(batch["input_ids"]), model_for(folder).config.llm.vocab_size)


def test_bf16_top1_agreement():
    """bf16 prompt logits pick the float32 top-1 at >= 95% of positions (the first
    BF16_CASES cases of each version with one unsliced image, ~300 positions per version: bf16
    programs are their own, so one slice bucket, one program per version, and not all cases)."""
    agree = total = 0
    per_version = {}
    for folder in VERSIONS:
        a = t = 0
        cases = [(f, c) for f, c in all_cases((folder,)) if len(case_tgt_sizes(c)) == 1]
        assert len(cases) >= BF16_CASES, folder
        for f, c in cases[:BF16_CASES]:
            _, batch = batch_for(f, c)
            stage_errors(f, c)
            ref = LOGITS_F32[(f, c)].argmax(-1)
            got = model_for(f, "bfloat16").prompt_logits(batch).argmax(-1)
            a, t = a + int((ref == got).sum()), t + ref.size
        per_version[folder] = a / t
        agree, total = agree + a, total + t
    print("\nbf16 vs float32 top-1 agreement:", per_version, f"overall {agree / total:.4f}")
    for folder, frac in per_version.items():
        assert frac >= 0.95, f"{folder}: bf16 top-1 agreement {frac:.4f} < 0.95"


def test_bf16_params_are_bf16():
    m = model_for(VERSIONS[1], "bfloat16")
    dtypes = {x.dtype for x in jax.tree.leaves(m.state)}
    assert dtypes == {np.dtype(jax.numpy.bfloat16)}


def test_cpu_bf16_decoder_mlp_in_torch_layout():
    """from_pretrained picks the decoder layout per dtype and backend (`model.decoder_layout`):
    a bf16 model on CPU stores gate / up / down_proj as `weight` [L, out, in], float32 (and GPU
    / TPU) keep every `kernel` [L, in, out]; the bf16 prompt logits equal those of the same bf16
    model in the [in, out] layout within a few bf16 ulps (the bound of the split-layer test
    below: only the dots' summation order differs) with the same top-1 at >= 95% of positions."""
    from flax import nnx

    from minicpmv_jax.model import CPU_BF16_OUT_IN, MiniCPMV
    from minicpmv_jax.sharding import path_name

    folder = VERSIONS[1]
    model = model_for(folder, "bfloat16")
    names = {path_name(p) for p, _ in nnx.to_flat_state(model.state)}
    mlp = {f"llm.model.layers.mlp.{p}.weight" for p in CPU_BF16_OUT_IN}
    if jax.default_backend() == "cpu":
        assert model.config.llm.out_in == CPU_BF16_OUT_IN and mlp <= names
    else:
        assert model.config.llm.out_in == ()
    assert model_for(folder).config.llm.out_in == ()  # float32
    ref = MiniCPMV.from_pretrained(
        FIXTURES / folder / "checkpoint", dtype="bfloat16", progress=False, out_in=()
    )
    ref.configure_generation(model.sampler.buckets)
    assert ref.config.llm.out_in == ()
    case = next(c for _, c in all_cases((folder,)) if len(case_tgt_sizes(c)) == 1)
    _, batch = batch_for(folder, case)
    want = np.asarray(ref.prompt_logits(batch), np.float32)
    got = np.asarray(model.prompt_logits(batch), np.float32)
    np.testing.assert_array_less(np.abs(got - want), 4 * 2.0**-7 * np.maximum(np.abs(want), 1))
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


# runs with the slow tests; test_generate.py's test_cpu_decoder_reads_layer_weights_in_place
# checks the same samplers' bf16 layer views in the default run
@pytest.mark.slow
def test_cpu_bf16_weights_enter_the_programs_packed(monkeypatch):
    """CPU backend, bf16: the sampler passes the layer stacks and the embedding table as
    uint16 views of their memory (`generate.pack_weights`), the decoder stack as its per-layer
    bf16 views (`generate.split_layers`) and the lm_head as bf16 row tiles, views as well
    (`generate.split_head`; in every sampler below). Packing changes no logit bit; the compiled
    decode program holds no float32 copies of the weights (XLA:CPU widens every bf16 loop operand
    that a dot would convert before the loop)."""
    from flax import nnx

    from minicpmv_jax import generate
    from minicpmv_jax.layers import LayerParts
    from minicpmv_jax.sharding import path_name

    folder = VERSIONS[1]
    model = model_for(folder, "bfloat16")
    _, batch = batch_for(folder, next(c for _, c in all_cases((folder,))))
    packed = generate.Sampler(model, buckets=model.sampler.buckets)
    monkeypatch.setattr(generate, "SPLIT_LAYERS", False)
    packed_stacked = generate.Sampler(model, buckets=model.sampler.buckets)
    monkeypatch.setattr(generate, "pack_weights", lambda state: (state, []))
    plain = generate.Sampler(model, buckets=model.sampler.buckets)

    def arrays(value):  # a decoder-stack parameter comes as its per-layer views
        return value.parts if isinstance(value, LayerParts) else (value,)

    views = {
        path_name(p): v.get_value()
        for p, v in nnx.to_flat_state(packed.state)
        if all(x.dtype == np.uint16 for x in arrays(v.get_value()))
    }
    if jax.default_backend() != "cpu":  # bf16-native backends take the weights as they are
        assert not views
        return
    assert set(generate.PACKED_TABLES) - set(generate.SPLIT_HEAD_TABLES) <= views.keys()
    assert all(n.startswith(generate.PACKED_STACKS + generate.PACKED_TABLES) for n in views)
    # the lm_head is not packed but read tile by tile in place, as bf16 views of its rows
    # (`generate.split_head`)
    head = {
        path_name(p): v.get_value()
        for p, v in nnx.to_flat_state(packed.state)
        if path_name(p) in generate.SPLIT_HEAD_TABLES
    }
    assert head and not head.keys() & views.keys()
    for value in head.values():
        assert isinstance(value, LayerParts)
        assert all(x.dtype == jax.numpy.bfloat16 for x in value.parts)
    # the decoder stack is not packed but read layer by layer in place, as bf16 views of the
    # stack (`generate.split_layers`): its dots take bf16 weights as they are
    decoder = {
        path_name(p): v.get_value()
        for p, v in nnx.to_flat_state(packed.state)
        if path_name(p).startswith(generate.SPLIT_STACKS)
    }
    assert decoder and not decoder.keys() & views.keys()
    for value in decoder.values():
        assert isinstance(value, LayerParts)
        assert all(x.dtype == jax.numpy.bfloat16 for x in value.parts)
    # packing alone changes no bit; run unrolled (split) XLA fuses the layers differently, so
    # bf16 intermediates may round the other way: a few bf16 ulps (2^-7 relative) apart
    want = np.asarray(plain.prompt_logits(batch, False), np.float32)
    np.testing.assert_array_equal(np.asarray(packed_stacked.prompt_logits(batch, False)), want)
    got = np.asarray(packed.prompt_logits(batch, False), np.float32)
    np.testing.assert_array_less(np.abs(got - want), 4 * 2.0**-7 * np.maximum(np.abs(want), 1))
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    packed_bytes = sum(x.nbytes for v in [*views.values(), *decoder.values()] for x in arrays(v))
    temp = {
        name: s.memory_report(batch=1, prompt_len=32, max_new_tokens=8)["decode"]["temp_bytes"]
        for name, s in (("packed", packed), ("plain", plain))
    }
    # the float32 copies (2x the packed and split bytes) are gone, save one tile of lm_head
    assert temp["plain"] - temp["packed"] > 1.5 * packed_bytes, (temp, packed_bytes)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_processor_output_equals_fixture_inputs(case):
    """The processor feeds the model exactly the arrays the fixtures imply (isolates failures)."""
    folder, case_dir = case
    data, out = batch_for(folder, case_dir)
    ref = batch_from_case(data, _version(folder), patch_bucket(folder))
    keys = [
        "input_ids",
        "attention_mask",
        "image_bound",
        "tgt_sizes",
        "temporal_ids",
        "group_sizes",
    ]
    if len(ref["tgt_sizes"]):  # with no image the patch arrays are empty (any P)
        keys += ["pixel_patches", "patch_valid", "vision_mask", "position_ids"]
    for k in keys:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]), err_msg=k)


ID0_CASES = [c for c in CASES if c[1].name.startswith("mask_id0_")]


@pytest.mark.parametrize("case", ID0_CASES, ids=case_id)
def test_id0_prompt_positions_are_the_official_prefill_positions(case):
    """2.6/4.5: `!` (id 0) is masked and shifts later positions (generate()'s prefill ids)."""
    folder, case_dir = case
    data, batch = batch_for(folder, case_dir)
    mask = np.asarray(batch["attention_mask"])
    assert not mask.all()  # the case has id 0 in its prompt
    want = data["llm"]["prompt_position_ids"][0]
    np.testing.assert_array_equal(prompt_positions(mask), want)


def test_v25_attends_id0():
    """2.5 passes no attention mask: a prompt `!` (id 0 in Llama 3 too) is attended."""
    proc = model_for(VERSIONS[0]).processor
    batch = proc([{"role": "user", "content": ["! hi ! there"]}])
    assert (batch["input_ids"] == 0).sum() == 2 and batch["attention_mask"].all()
