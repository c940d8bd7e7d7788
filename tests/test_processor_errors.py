"""Bad input -> a clear MiniCPMVError (a ValueError) naming the problem, never garbage."""

import io
import struct
import zlib

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from minicpmv_jax.errors import (
    ImageError,
    MessageError,
    MiniCPMVError,
    PromptTooLongError,
)
from minicpmv_jax.image import load_image
from minicpmv_jax.processor import MiniCPMVProcessor


@pytest.fixture(scope="module")
def proc26():
    return MiniCPMVProcessor.from_pretrained(FIXTURES / "minicpm-v-2_6" / "checkpoint")


@pytest.fixture(scope="module")
def proc45():
    return MiniCPMVProcessor.from_pretrained(FIXTURES / "minicpm-v-4_5" / "checkpoint")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def user(*content):
    return [{"role": "user", "content": list(content)}]


def test_all_errors_are_value_errors():
    assert issubclass(MiniCPMVError, ValueError)
    for cls in (ImageError, MessageError, PromptTooLongError):
        assert issubclass(cls, MiniCPMVError)


# -- image files -------------------------------------------------------------------------------


def test_accepts_paths_bytes_and_file_objects(tmp_path, proc26):
    img = Image.new("RGB", (300, 200), (200, 10, 10))
    path = tmp_path / "a.png"
    img.save(path)
    data = png_bytes(img)
    for src in (path, str(path), data, io.BytesIO(data), img):
        loaded = load_image(src)
        assert loaded.mode == "RGB" and loaded.size == (300, 200)
    ref = proc26(user(img, "q"))
    for src in (path, data):
        out = proc26(user(src, "q"))
        np.testing.assert_array_equal(out.pixel_patches, ref.pixel_patches)


def test_unreadable_file(tmp_path, proc26):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(bad)
    with pytest.raises(ImageError, match="message 0 item 0"):
        proc26(user(bad, "q"))
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"\x89PNG garbage")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="expected a PIL image"):
        load_image(12345)


def test_truncated_file(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
    data = png_bytes(img)
    with pytest.raises(ImageError, match="could not decode"):
        load_image(data[: len(data) // 2])
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    jpeg = buf.getvalue()
    with pytest.raises(ImageError):
        load_image(jpeg[: len(jpeg) // 3])


def test_zero_sized_image(proc26):
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 10)))
    with pytest.raises(ImageError, match="zero size"):
        proc26(user(Image.new("RGB", (10, 0)), "q"))


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims width x height (a decompression bomb header)."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_pixel_limit(tmp_path):
    img = Image.new("RGB", (100, 100))
    with pytest.raises(ImageError, match="above the limit of 5000"):
        load_image(img, max_pixels=5000)
    path = tmp_path / "big.png"
    img.save(path)
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(path, max_pixels=5000)
    assert load_image(path, max_pixels=None).size == (100, 100)
    for w, h in ((9000, 9000), (30000, 30000)):  # above our 64 MP default / above PIL's own guard
        with pytest.raises(ImageError, match="decompression-bomb"):
            load_image(_png_with_declared_size(w, h))


def test_pixel_limit_configurable_on_processor(proc26):
    proc = MiniCPMVProcessor.from_pretrained(
        FIXTURES / "minicpm-v-2_6" / "checkpoint", max_pixels=1000
    )
    with pytest.raises(ImageError, match="limit of 1000"):
        proc(user(Image.new("RGB", (100, 100)), "q"))
    proc26(user(Image.new("RGB", (100, 100)), "q"))  # default limit is far larger


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "1", "L", "PA", "YCbCr"])
def test_non_rgb_modes_are_converted_like_official(mode, proc26):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    out = proc26(user(img, "q"))
    ref = proc26(user(img.convert("RGB"), "q"))  # what the official .convert("RGB") feeds
    np.testing.assert_array_equal(out.pixel_patches, ref.pixel_patches)
    assert load_image(png_bytes(img) if mode not in ("CMYK", "YCbCr", "PA") else img).mode == "RGB"


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_modes_rejected(mode):
    img = Image.new(mode, (20, 20))
    with pytest.raises(ImageError, match="8-bit"):
        load_image(img)


def test_unconvertible_mode_rejected():
    img = Image.new("La", (8, 8))  # PIL cannot convert premultiplied La to RGB
    with pytest.raises(ImageError, match="convert to RGB"):
        load_image(img)


# -- messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msgs,match",
    [
        ([], "empty conversation"),
        ("hello", "list of"),
        (None, "list of"),
        ([{"content": "hi"}], "'role' and 'content'"),
        (["hi"], "'role' and 'content'"),
        ([{"role": "robot", "content": "hi"}], "unknown role"),
        ([{"role": "assistant", "content": "hi"}], "first"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message"),
        ([{"role": "system", "content": "b"}], "only a system message"),
        ([{"role": "user", "content": None}], "content items"),
        ([{"role": "user", "content": ["a", 3]}], "got int"),
        ([{"role": "user", "content": [{"img": "x"}]}], "dict items"),
        (
            [
                {"role": "system", "content": [Image.new("RGB", (8, 8))]},
                {"role": "user", "content": "q"},
            ],
            "system message",
        ),
    ],
)
def test_malformed_messages(proc26, msgs, match):
    with pytest.raises(MessageError, match=match):
        proc26(msgs)


def test_more_placeholders_than_images(proc26):
    with pytest.raises(MessageError, match="more placeholders than images"):
        proc26(user("look: (<image>./</image>)"))


def test_more_images_than_placeholders(proc45):
    # 4.5's template drops the <think> part of history assistant messages: an image placed
    # there would silently vanish from the prompt.
    img = Image.new("RGB", (64, 64))
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ["<think>", img, "</think>answer"]},
        {"role": "user", "content": "and now?"},
    ]
    with pytest.raises(MessageError, match="more images than placeholders"):
        proc45(msgs)


def test_image_tokens_written_in_text(proc26):
    with pytest.raises(MessageError, match="marker tokens"):
        proc26(user(Image.new("RGB", (64, 64)), "what is <image> here"))
    with pytest.raises(MessageError, match="marker tokens"):
        proc26(user("a <slice> b"))


def test_system_prompt_twice(proc26):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert proc26(msgs).prompt.startswith("<|im_start|>system\ns<|im_end|>")
    with pytest.raises(MessageError, match="both system_prompt"):
        proc26(msgs, system_prompt="other")


def test_enable_thinking_unsupported_version(proc26):
    with pytest.raises(MessageError, match="enable_thinking"):
        proc26(user("q"), enable_thinking=True)


@pytest.mark.parametrize("value", [0, -1, 1.5, "3", True])
def test_bad_max_slice_nums(proc26, value):
    with pytest.raises(MessageError, match="max_slice_nums"):
        proc26(user("q"), max_slice_nums=value)


def test_patch_bucket_too_small(proc26):
    with pytest.raises(MessageError, match="patch_bucket"):
        proc26(user(Image.new("RGB", (448, 448)), "q"), patch_bucket=256)


def test_prompt_too_long_cuts_image(proc26):
    msgs = user(Image.new("RGB", (448, 448)), "q")
    with pytest.raises(PromptTooLongError, match="max_inp_length=30"):
        proc26(msgs, max_inp_length=30)
    with pytest.raises(MessageError, match="max_inp_length must be"):
        proc26(msgs, max_inp_length=0)


# -- temporal ids ------------------------------------------------------------------------------


def test_temporal_ids_errors(proc26, proc45):
    frames = [Image.new("RGB", (320, 240), (i * 40, 0, 0)) for i in range(4)]
    msgs = user(*frames, "describe")
    with pytest.raises(MessageError, match="only supported by MiniCPM-V 4.5"):
        proc26(msgs, temporal_ids=[[0, 1], [2, 3]])
    with pytest.raises(MessageError, match="cover 3 frame"):
        proc45(msgs, max_slice_nums=1, temporal_ids=[[0, 1], [2]])
    with pytest.raises(MessageError, match="non-empty list of ints"):
        proc45(msgs, max_slice_nums=1, temporal_ids=[[0, 1], [], [2, 3]])
    with pytest.raises(MessageError, match="non-empty list of ints"):
        proc45(msgs, max_slice_nums=1, temporal_ids=[[0.5, 1], [2, 3]])
    with pytest.raises(MessageError, match=">= 0"):
        proc45(msgs, max_slice_nums=1, temporal_ids=[[-5, 1], [2, 3]])
    with pytest.raises(MessageError, match="list of groups"):
        proc45(msgs, max_slice_nums=1, temporal_ids="0123")
    mixed = user(Image.new("RGB", (1024, 768)), Image.new("RGB", (320, 240)), "q")
    with pytest.raises(MessageError, match="different numbers of pieces"):
        proc45(mixed, temporal_ids=[[0, 1]])
    out = proc45(
        msgs,
        max_slice_nums=1,
        use_image_id=False,
        temporal_ids=[np.array([0, 1], np.int32), np.array([2, 3], np.int32)],
    )
    assert out.group_sizes.tolist() == [2, 2] and out.temporal_ids.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("token", ["<|im_end|>", "<|endoftext|>", "<|im_start|>"])
def test_typed_control_tokens_are_refused(proc26, token):
    """The official tokenizer makes a typed `<|im_end|>` a real end of turn; here: an error."""
    with pytest.raises(MessageError, match=r"message 0 item 0: .*chat-control"):
        proc26(user(f"What about {token} here?"))
    with pytest.raises(MessageError, match="system_prompt"):
        proc26(user("hi"), system_prompt=f"be {token} brief")


def test_assistant_turns_may_hold_control_tokens(proc26):
    """An assistant turn is the model's own answer (it can contain any token): not refused."""
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "a<|endoftext|>b"},
        {"role": "user", "content": "and?"},
    ]
    assert "a<|endoftext|>b" in proc26(msgs).prompt


def test_grounding_tokens_stay_allowed(proc26):
    out = proc26(user("Where is <ref>the cat</ref>?"))
    assert proc26.tokenizer.convert_tokens_to_ids("<ref>") in out.input_ids


def test_lone_surrogate(proc26):
    with pytest.raises(MessageError, match=r"message 0 item 1: .*lone surrogate '\\ud83e'"):
        proc26(user("ok", "broken \ud83e emoji"))


def test_string_naming_an_image_or_video_file(tmp_path, monkeypatch, proc26):
    """A lone path string would be sent as text: the error says how to send the file."""
    Image.new("RGB", (20, 20)).save(tmp_path / "cat.png")
    (tmp_path / "clip.mp4").write_bytes(b"\0")
    with pytest.raises(MessageError, match=r"names an image file.*\{'image': "):
        proc26(user(str(tmp_path / "cat.png"), "What is this?"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MessageError, match=r"pathlib.Path\('cat.png'\)"):
        proc26(user(" cat.png\n"))
    with pytest.raises(MessageError, match=r"names a video file.*load_video\('clip.mp4'"):
        proc26(user("clip.mp4"))
    # words around the name, a missing file, or a non-media file: plain text
    (tmp_path / "notes.txt").write_text("x")
    for text in ("Describe cat.png please", "dog.png", "notes.txt"):
        assert f"user\n{text}<|im_end|>" in proc26(user(text)).prompt
