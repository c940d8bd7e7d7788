"""MiniCPM-V 4.6 processor (numpy/PIL) against the released processor's outputs: token ids and
uint8-derived pixels exact (the float input is (u8 - 127.5) / 127.5), grids, target sizes and
sampled frames equal; plus the bad-input contract."""

import json

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from minicpmv_jax.errors import MiniCPMVError
from minicpmv_jax.v46 import processor as p46

F46 = FIXTURES / "minicpm-v-4_6"
CASES = sorted(p.name for p in (F46 / "cases").iterdir())


@pytest.fixture(scope="module")
def processor():
    from minicpmv_jax import MiniCPMVProcessor  # the public entry point dispatches on model_type

    proc = MiniCPMVProcessor.from_pretrained(F46 / "checkpoint")
    assert isinstance(proc, p46.MiniCPMV46Processor)
    return proc


def case_messages(name: str) -> tuple[list, dict, dict]:
    """(messages in transformers' chat format with PIL media, processor kwargs, processor.npz)."""
    d = F46 / "cases" / name
    case = json.loads((d / "case.json").read_text())
    images = iter(Image.open(d / im["file"]) for im in case["media"]["images"])
    vid = case["media"]["video"]
    msgs = []
    for m in case["messages"]:
        content = m["content"]
        if isinstance(content, list):
            items = []
            for it in content:
                if it["type"] == "image":
                    items.append({"type": "image", "image": next(images)})
                elif it["type"] == "video":
                    frames = [Image.open(d / f) for f in vid["frames"]]
                    items.append({"type": "video", "video": frames, "fps": vid["fps"]})
                else:
                    items.append(it)
            content = items
        msgs.append({"role": m["role"], "content": content})
    kw = dict(case["processor_kwargs"])
    kw.update(
        {k: v for k, v in case["chat_template_kwargs"].items() if k != "add_generation_prompt"}
    )
    with np.load(d / "processor.npz") as z:
        want = {k: z[k] for k in z.files}
    return msgs, kw, want


@pytest.mark.parametrize("name", CASES)
def test_processor_matches_released(processor, name):
    msgs, kw, want = case_messages(name)
    out = processor(msgs, **kw)
    np.testing.assert_array_equal(out.input_ids, want["input_ids"][0])
    for key, u8 in (
        ("pixel_values", "pixel_values_u8"),
        ("pixel_values_videos", "pixel_values_videos_u8"),
    ):
        if u8 in want:
            ref = (want[u8].astype(np.float32) - 127.5) / 127.5
            assert out[key].shape == ref.shape
            np.testing.assert_allclose(out[key], ref, atol=1e-5, rtol=0)
        else:
            assert key not in out
    for key in (
        "target_sizes",
        "grids",
        "target_sizes_videos",
        "grids_videos",
        "sampled_frame_indices",
    ):
        if key in want:
            np.testing.assert_array_equal(out[key].reshape(-1), want[key].reshape(-1))


def test_official_message_format_equals_chat_format(processor):
    msgs, kw, want = case_messages("multi_image")
    official = [
        {"role": m["role"], "content": [it.get("image", it.get("text")) for it in m["content"]]}
        for m in msgs
    ]
    np.testing.assert_array_equal(processor(official, **kw).input_ids, want["input_ids"][0])


def test_resize_reference_formula():
    """resize_u8 against a float64 evaluation of the same separable filter (Pillow a = -0.5,
    antialiased support): equal within one uint8 level (fixed-point weights, uint8 rounding)."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    got = p46.resize_u8(img, (20, 71)).astype(np.float64)

    def dense(n_in, n_out):
        scale = n_in / n_out
        sup, inv = (2 * scale, 1 / scale) if scale >= 1 else (2.0, 1.0)
        w = np.zeros((n_out, n_in))
        for i in range(n_out):
            c = scale * (i + 0.5)
            j = np.arange(max(int(c - sup + 0.5), 0), min(int(c + sup + 0.5), n_in))
            k = p46._cubic((j - c + 0.5) * inv)
            w[i, j] = k / k.sum()
        return w

    ref = np.einsum("ow,hwc->hoc", dense(53, 71), img.astype(np.float64))
    ref = np.clip(np.round(ref), 0, 255)
    ref = np.clip(np.einsum("oh,hwc->owc", dense(37, 20), ref), 0, 255)
    assert np.abs(got - ref).max() <= 1.0


def test_non_square_grid_is_rows_then_cols():
    """A wide image slices into more columns than rows, and its transpose the other way round:
    the (rows, cols) grid and the (h, w) sizes cannot be swapped without failing here."""
    wide = np.zeros((500, 1200, 3), np.uint8)
    settings = {"scale_resolution": 448, "patch_size": 14, "max_slice_nums": 9, "mode": "16x"}
    units, grid = p46.units_of(wide, settings)
    assert grid == (1, 2)  # as the released processor (slices_max4_1200x500: grids [[1, 2]])
    assert units[0].shape[1] > units[0].shape[0]  # the source keeps the landscape aspect
    tall_units, tall_grid = p46.units_of(wide.transpose(1, 0, 2), settings)
    assert tall_grid == (2, 1)
    assert [u.shape[:2] for u in tall_units] == [u.shape[1::-1] for u in units]
    _, sizes = p46.pack(units, 14)
    assert tuple(sizes[0]) == (units[0].shape[0] // 14, units[0].shape[1] // 14)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"downsample_mode": "8x"}, "downsample_mode"),
        ({"max_slice_nums": 0}, "max_slice_nums"),
        ({"stack_frames": "3"}, "stack_frames"),
        ({"slice_mode": True}, "unknown processor argument"),
    ],
)
def test_bad_arguments_name_the_input(processor, kwargs, match):
    msgs, _, _ = case_messages("single_448x448")
    with pytest.raises(MiniCPMVError, match=match):
        processor(msgs, **kwargs)


def test_bad_media_name_the_item(processor):
    with pytest.raises(MiniCPMVError, match=r"content\[0\]\.image"):
        processor([{"role": "user", "content": [{"type": "image", "image": "x.png"}, "hi"]}])
    frames = [Image.new("RGB", (64, 48))] * 4
    with pytest.raises(MiniCPMVError, match="fps"):
        processor([{"role": "user", "content": [{"type": "video", "video": frames}, "hi"]}])
    with pytest.raises(MiniCPMVError, match="role"):
        processor([{"content": "hi"}])
