"""Processor parity with the golden fixtures (official processor outputs) and unit tests.

Every case of every fixture folder (including the processor-only real-tokenizer folders of 2.6 and 4.5)
is replayed: input ids, image bounds, tgt sizes, pixel values, temporal groups, and, where the
official vision tower ran, its position ids and patch attention mask.
"""

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, case_pil_messages, load_case
from PIL import Image

from minicpmv_jax.errors import CheckpointError, MessageError, UnsupportedVersionError
from minicpmv_jax.image import find_best_resize, get_refine_size, get_sliced_grid
from minicpmv_jax.processor import (
    MiniCPMVProcessor,
    ProcessorOutput,
    bucket_coords,
    patch_bucket_size,
    vision_mask,
    vision_position_ids,
)

FOLDERS = {
    "minicpm-llama3-v-2_5": FIXTURES / "minicpm-llama3-v-2_5" / "checkpoint",
    "minicpm-v-2_6": FIXTURES / "minicpm-v-2_6" / "checkpoint",
    "minicpm-v-4_5": FIXTURES / "minicpm-v-4_5" / "checkpoint",
    "minicpm-v-4_5-real-tokenizer": FIXTURES / "minicpm-v-4_5-real-tokenizer" / "processor",
    "minicpm-v-2_6-real-tokenizer": FIXTURES / "minicpm-v-2_6-real-tokenizer" / "processor",
}
CASES = [
    (name, case)
    for name in FOLDERS
    for case in sorted(p for p in (FIXTURES / name / "cases").iterdir() if p.is_dir())
]
CHAT_KWARGS = ("max_slice_nums", "use_image_id", "temporal_ids", "enable_thinking", "system_prompt")


@pytest.fixture(scope="module")
def processors():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = MiniCPMVProcessor.from_pretrained(FOLDERS[name])
        return cache[name]

    return get


def run_case(processors, name, case_dir):
    data = load_case(case_dir)
    cj = data["case"]
    kwargs = {k: cj["chat_kwargs"][k] for k in CHAT_KWARGS if k in cj["chat_kwargs"]}
    out = processors(name)(case_pil_messages(case_dir, cj), **kwargs)
    return data, out


def typed_markers(case_dir) -> bool:
    """The official processor turned typed marker text into control tokens / image bounds."""
    checks = json.loads((case_dir / "case.json").read_text()).get("checks", {})
    return "image_bound_rows_from_typed_tokens" in checks


@pytest.mark.parametrize("name,case_dir", CASES, ids=[f"{n}/{c.name}" for n, c in CASES])
def test_case_parity(processors, name, case_dir):
    if typed_markers(case_dir):  # refused with a clear error: the accepted deviation
        with pytest.raises(MessageError, match="chat-control token"):
            run_case(processors, name, case_dir)
        return
    data, out = run_case(processors, name, case_dir)
    cj, pz = data["case"], data["processor"]
    assert out.prompt == cj["expanded_prompt"]
    np.testing.assert_array_equal(out.input_ids, pz["input_ids"][0])
    assert out.input_ids.dtype == np.int64
    np.testing.assert_array_equal(out.image_bound, pz["image_bound"])
    np.testing.assert_array_equal(out.tgt_sizes, pz["tgt_sizes"])
    np.testing.assert_array_equal(out.image_sizes, pz["image_sizes"])
    if "attention_mask" in pz:
        np.testing.assert_array_equal(out.attention_mask, pz["attention_mask"][0])
    else:  # 2.5 passes no mask: everything attended
        assert out.attention_mask.all()
    n_slices = pz["tgt_sizes"].shape[0]
    assert len(out.pixel_values) == n_slices
    for i, pv in enumerate(out.pixel_values):
        ref = pz[f"pixel_values_{i:02d}"]
        assert pv.shape == ref.shape and pv.dtype == np.float32
        np.testing.assert_allclose(pv, ref, rtol=0, atol=1e-6)
    if "temporal_ids" in pz:
        np.testing.assert_array_equal(out.temporal_ids, pz["temporal_ids"])
        np.testing.assert_array_equal(out.group_sizes, pz["group_sizes"])
    else:
        np.testing.assert_array_equal(out.temporal_ids, -np.ones(n_slices))
        np.testing.assert_array_equal(out.group_sizes, np.ones(n_slices))
    assert out.group_sizes.sum() == n_slices
    assert len(out.image_bound) == len(out.group_sizes)


@pytest.mark.parametrize(
    "name,case_dir",
    [(n, c) for n, c in CASES if (c / "vision.npz").exists()],
    ids=[f"{n}/{c.name}" for n, c in CASES if (c / "vision.npz").exists()],
)
def test_vision_inputs_match_official_tower(processors, name, case_dir):
    """position_ids / vision_mask reproduce what the official tower looked up / was given."""
    data, out = run_case(processors, name, case_dir)
    vz = data["vision"]
    max_len = vz["position_ids"].shape[1]
    assert out.position_ids.dtype == np.int32
    np.testing.assert_array_equal(out.position_ids[:, :max_len], vz["position_ids"])
    assert not out.position_ids[:, max_len:].any()
    official_mask = vz["patch_attention_mask"][:, 0, :]
    if name == "minicpm-llama3-v-2_5":
        assert official_mask.all()  # the all-True quirk the fixtures pin down
    np.testing.assert_array_equal(out.vision_mask[:, :max_len], official_mask)
    assert not out.vision_mask[:, max_len:].any()


@pytest.mark.parametrize(
    "name,case_dir",
    [(n, c) for n, c in CASES if not typed_markers(c)],
    ids=[f"{n}/{c.name}" for n, c in CASES if not typed_markers(c)],
)
def test_patches_consistent_with_strips(processors, name, case_dir):
    _, out = run_case(processors, name, case_dir)
    n_slices, num_patches = out.patch_valid.shape
    assert out.pixel_patches.shape == (n_slices, num_patches, 588)
    if n_slices:
        assert num_patches == patch_bucket_size(int(out.tgt_sizes.prod(1).max()))
    for i, (strip, (h, w)) in enumerate(zip(out.pixel_values, out.tgt_sizes)):
        n = h * w
        # strip [3, 14, n*14] -> [3, 14, n, 14] -> [n, 3, 14, 14] -> [n, 588]
        vectors = strip.reshape(3, 14, n, 14).transpose(2, 0, 1, 3).reshape(n, 588)
        np.testing.assert_array_equal(out.pixel_patches[i, :n], vectors)
        assert not out.pixel_patches[i, n:].any()
        np.testing.assert_array_equal(out.patch_valid[i], np.arange(num_patches) < n)
        if out.version != "2.5":
            np.testing.assert_array_equal(out.vision_mask[i], out.patch_valid[i])


# ---------------------------------------------------------------------------------------------
# Position-id bucketing (spec §3.1.2)
# ---------------------------------------------------------------------------------------------

# The spec's exception table, n <= 128: {n: {k: (official, exact)}}.
SPEC_EXCEPTIONS = {
    25: {5: (13, 14), 10: (27, 28), 15: (41, 42), 20: (55, 56)},
    49: {7: (9, 10), 14: (19, 20), 35: (49, 50), 42: (59, 60)},
    50: {5: (6, 7), 10: (13, 14), 15: (20, 21), 20: (27, 28), 30: (41, 42), 40: (55, 56)},
    55: {11: (13, 14), 22: (27, 28), 33: (41, 42), 44: (55, 56)},
    58: {29: (34, 35)},
    77: {55: (49, 50)},
    82: {41: (34, 35)},
    86: {43: (34, 35)},
    94: {47: (34, 35)},
    98: {
        7: (4, 5),
        14: (9, 10),
        35: (24, 25),
        42: (29, 30),
        56: (39, 40),
        70: (49, 50),
        84: (59, 60),
    },
    100: {10: (6, 7), 20: (13, 14), 30: (20, 21), 40: (27, 28), 80: (55, 56)},
    110: {11: (6, 7), 22: (13, 14), 33: (20, 21), 44: (27, 28), 66: (41, 42), 88: (55, 56)},
    115: {23: (13, 14), 46: (27, 28), 69: (41, 42), 92: (55, 56)},
}


def test_bucket_coords_exception_table():
    found = {}
    for n in range(1, 129):
        exact = (70 * np.arange(n)) // n
        got = bucket_coords(n)
        diff = np.flatnonzero(got != exact)
        if diff.size:
            found[n] = {int(k): (int(got[k]), int(exact[k])) for k in diff}
    assert found == SPEC_EXCEPTIONS


def test_bucket_coords_cached_and_read_only():
    a = bucket_coords(37)
    assert a is bucket_coords(37)
    assert not a.flags.writeable


def test_position_ids_spec_example():
    ids = vision_position_ids(np.array([[28, 37]]), 1036, "2.6")[0]
    np.testing.assert_array_equal(ids[:10], [0, 1, 3, 5, 7, 9, 11, 13, 15, 17])
    np.testing.assert_array_equal(ids[37:40], [140, 141, 143])
    assert ids[-1] == 4758


def test_position_ids_2_5_strip_quirk():
    tgt = np.array([[2, 5], [2, 3]])  # 10 and 6 patches
    ids = vision_position_ids(tgt, 16, "2.5")
    np.testing.assert_array_equal(ids[:, :10], [[0, 7, 14, 21, 28, 35, 42, 49, 56, 63]] * 2)
    assert not ids[:, 10:].any()
    mask = vision_mask(tgt, 16, "2.5")
    np.testing.assert_array_equal(mask, np.arange(16)[None] < np.array([[10], [10]]))
    mask26 = vision_mask(tgt, 16, "2.6")
    np.testing.assert_array_equal(mask26, np.arange(16)[None] < np.array([[10], [6]]))


def test_position_ids_empty_and_too_small_bucket():
    assert vision_position_ids(np.zeros((0, 2)), 0, "2.6").shape == (0, 0)
    with pytest.raises(ValueError):
        vision_position_ids(np.array([[10, 10]]), 64, "2.6")


def test_patch_bucket_size():
    assert patch_bucket_size(1) == 256
    assert patch_bucket_size(1036) == 1152
    assert patch_bucket_size(4096) == 4096
    assert patch_bucket_size(4097) == 4608
    assert patch_bucket_size(300, (100, 400)) == 400


# ---------------------------------------------------------------------------------------------
# Slicing geometry (spec §11)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,grid,source,slice_size",
    [
        ((448, 448), None, (448, 448), None),
        ((300, 200), None, (546, 364), None),
        ((1000, 1000), (2, 2), (448, 448), (448, 448)),
        ((1920, 1080), (4, 2), (602, 336), (420, 476)),
        ((800, 1200), (2, 3), (364, 546), (448, 448)),
        ((500, 2000), (1, 4), (224, 896), (448, 448)),
        ((4000, 500), (8, 1), (1260, 154), (448, 448)),
        ((1024, 768), (2, 2), (518, 392), (518, 392)),
    ],
)
def test_slicing_geometry_spec_table(size, grid, source, slice_size):
    assert get_sliced_grid(size, 9) == grid
    assert find_best_resize(size, 448, 14, allow_upscale=grid is None) == source
    if grid is not None:
        refine = get_refine_size(size, grid, 448, 14, allow_upscale=True)
        assert (refine[0] // grid[0], refine[1] // grid[1]) == slice_size


# ---------------------------------------------------------------------------------------------
# Loading, attributes, behaviour
# ---------------------------------------------------------------------------------------------


def test_special_token_ids_from_tokenizer(processors):
    real = processors("minicpm-v-4_5-real-tokenizer")
    assert real.version == "4.5" and real.query_num == 64
    assert (real.unk_id, real.image_start_id, real.image_end_id) == (128244, 151669, 151670)
    assert (real.slice_start_id, real.slice_end_id) == (151679, 151680)
    assert (real.image_id_start_id, real.image_id_end_id) == (151681, 151682)
    assert real.terminators == [151645, 151643]
    assert real.tokenizer.convert_tokens_to_ids("!") == 0
    tiny25 = processors("minicpm-llama3-v-2_5")
    assert tiny25.version == "2.5" and tiny25.image_id_start_id is None
    assert tiny25.terminators == [401, 409] and not tiny25.use_image_id
    tiny26 = processors("minicpm-v-2_6")
    assert (tiny26.unk_id, tiny26.image_start_id, tiny26.terminators) == (417, 403, [402, 400])
    assert tiny26.patch_size == 14 and tiny26.scale_resolution == 448
    assert tiny26.max_slice_nums == 9 and tiny26.use_image_id and tiny26.pad_id == 0


def test_text_only_output_shapes(processors):
    out = processors("minicpm-v-2_6")([{"role": "user", "content": "Hello there"}])
    assert isinstance(out, ProcessorOutput) and out["input_ids"] is out.input_ids
    assert out.pixel_values == []
    assert out.pixel_patches.shape[0] == 0 and out.pixel_patches.shape[2] == 588
    for key in ("tgt_sizes", "image_bound", "image_sizes"):
        assert out[key].shape == (0, 2)
    for key in ("temporal_ids", "group_sizes"):
        assert out[key].shape == (0,)
    assert out.position_ids.shape == out.vision_mask.shape == out.patch_valid.shape == (0, 0)


def test_bang_is_masked_like_official(processors):
    proc = processors("minicpm-v-4_5-real-tokenizer")
    out = proc([{"role": "user", "content": "Hello! there"}])
    assert (out.input_ids == 0).sum() == 1
    np.testing.assert_array_equal(out.attention_mask, out.input_ids != 0)


def test_decode_roundtrip(processors):
    proc = processors("minicpm-v-4_5-real-tokenizer")
    out = proc([{"role": "user", "content": "Describe it."}])
    assert proc.decode(out.input_ids) == out.prompt


def test_overrides_and_call_options(processors):
    img = Image.new("RGB", (1024, 768), (10, 200, 30))
    proc = MiniCPMVProcessor.from_pretrained(FOLDERS["minicpm-v-2_6"], max_slice_nums=1)
    out = proc([{"role": "user", "content": [img, "q"]}])
    assert out.tgt_sizes.tolist() == [[28, 37]]
    out = proc([{"role": "user", "content": [img, "q"]}], max_slice_nums=9, use_image_id=False)
    assert len(out.tgt_sizes) == 5 and "<image_id>" not in out.prompt
    out = proc([{"role": "user", "content": [img, "q"]}], patch_bucket=2048)
    assert out.pixel_patches.shape[1] == 2048
    with pytest.raises(TypeError):
        MiniCPMVProcessor.from_pretrained(FOLDERS["minicpm-v-2_6"], bogus=1)


def test_fixture_dict_items_and_paths(processors):
    case = FIXTURES / "minicpm-v-2_6" / "cases" / "single_448x448"
    cj = json.loads((case / "case.json").read_text())
    proc = processors("minicpm-v-2_6")
    msgs = [
        {
            "role": m["role"],
            "content": [
                {k: (case / v if k == "image" else v) for k, v in it.items()} for it in m["content"]
            ],
        }
        for m in cj["messages"]
    ]
    out = proc(msgs)
    assert out.input_ids.tolist() == cj["input_ids"]


def test_truncation_of_text_follows_official(processors):
    proc = processors("minicpm-v-2_6")
    msgs = [{"role": "user", "content": [Image.new("RGB", (448, 448)), "word " * 50]}]
    full = proc(msgs)
    out = proc(msgs, max_inp_length=len(full.input_ids) - 5)
    np.testing.assert_array_equal(out.input_ids, full.input_ids[:-5])
    np.testing.assert_array_equal(out.image_bound, full.image_bound)


@pytest.mark.parametrize("version", ["2.0", "4.0", 4.0, 2.55, 3, "x", None])
def test_unknown_version(tmp_path, version):
    folder = tmp_path / "ckpt"
    shutil.copytree(
        FOLDERS["minicpm-v-2_6"], folder, ignore=shutil.ignore_patterns("*.safetensors")
    )
    config = json.loads((folder / "config.json").read_text())
    config.pop("version")
    if version is not None:
        config["version"] = version
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedVersionError, match=r"2\.5, 2\.6, 4\.5"):
        MiniCPMVProcessor.from_pretrained(folder)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        MiniCPMVProcessor.from_pretrained(tmp_path / "nope")
    folder = tmp_path / "ckpt"
    shutil.copytree(
        FOLDERS["minicpm-v-2_6"], folder, ignore=shutil.ignore_patterns("*.safetensors")
    )
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        MiniCPMVProcessor.from_pretrained(folder)
    shutil.copy(FOLDERS["minicpm-v-2_6"] / "preprocessor_config.json", folder)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (folder / name).unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        MiniCPMVProcessor.from_pretrained(folder)


def test_temporal_groups_image_ids_count_all_images(processors):
    """4.5: a group's placeholder takes the image id of its first frame among ALL images."""
    proc = processors("minicpm-v-4_5")
    frames = [Image.new("RGB", (320, 240), (40 * i, 0, 0)) for i in range(5)]
    out = proc(
        [{"role": "user", "content": [*frames, "q"]}],
        max_slice_nums=1,
        use_image_id=True,
        temporal_ids=[[0, 1], [2, 3], [4]],
    )
    ids = [p.split("</image_id>")[0] for p in out.prompt.split("<image_id>")[1:]]
    assert ids == ["0", "2", "4"]
    assert out.group_sizes.tolist() == [2, 2, 1] and out.temporal_ids.tolist() == [0, 1, 2, 3, 4]
    assert "</image>\n<image_id>2" in out.prompt  # the skipped frames' "\\n" chunks vanish


def test_2_5_double_bos(processors):
    proc = processors("minicpm-llama3-v-2_5")
    out = proc([{"role": "user", "content": [Image.new("RGB", (64, 64)), "q"]}])
    assert out.input_ids[:3].tolist()[:2] == [proc.bos_id, proc.bos_id]
    assert out.input_ids[2] != proc.bos_id


def test_output_pickles(processors):
    import pickle

    out = processors("minicpm-v-2_6")([{"role": "user", "content": "hi"}])
    back = pickle.loads(pickle.dumps(out))
    assert isinstance(back, ProcessorOutput) and back.prompt == out.prompt
    with pytest.raises(AttributeError):
        _ = out.not_a_key


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_control_token_lookup_agrees_with_the_vocabulary(processors, name):
    """The control tokens are found by single-token lookups, not by building the vocabulary: the
    lookup answers as `token in tokenizer.get_vocab()` on every special token and on tokens
    that are not in the vocabulary."""
    from minicpmv_jax.processor import _vocabulary_test

    tokenizer = processors(name).tokenizer
    vocab, in_vocab = tokenizer.get_vocab(), _vocabulary_test(tokenizer)
    tokens = [*tokenizer.all_special_tokens, "<|not a token|>", "</nope>", "!", "hello"]
    assert [in_vocab(t) for t in tokens] == [t in vocab for t in tokens]
    assert not in_vocab("<|not a token|>")
