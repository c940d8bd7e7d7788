"""Video sampling recipes (official 2.6 / 4.5 examples) and PyAV decoding."""

import builtins
import json
import sys

import numpy as np
import pytest
from conftest import FIXTURES

from minicpmv_jax import video
from minicpmv_jax.errors import VideoError
from minicpmv_jax.processor import MiniCPMVProcessor
from minicpmv_jax.video import (
    load_video,
    read_video_frames,
    sample_frames_26,
    sample_frames_45,
    temporal_ids_45,
    video_info,
)

VIDEO_ENTRIES = [
    (case.name, entry)
    for folder in ("minicpm-v-4_5", "minicpm-v-4_5-real-tokenizer")
    for case in sorted((FIXTURES / folder / "cases").iterdir())
    for entry in json.loads((case / "case.json").read_text()).get("videos") or []
]


def colour(i: int) -> tuple[int, int, int]:
    """Frame i's solid colour (distinct for i < 51)."""
    return (i * 5, 255 - i * 5, (i * 37) % 256)


@pytest.fixture(scope="module")
def clip48(tmp_path_factory):
    """48 frames, 30 fps, 320x240, frame i filled with colour(i); lossless (PNG codec in AVI)."""
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "clip48.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "rgb24"
        for i in range(48):
            frame = np.empty((240, 320, 3), np.uint8)
            frame[...] = colour(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("case,entry", VIDEO_ENTRIES, ids=[c for c, _ in VIDEO_ENTRIES])
@pytest.mark.parametrize("with_scipy", [True, False])
def test_recipe_matches_fixture_videos(case, entry, with_scipy, monkeypatch):
    if with_scipy:
        pytest.importorskip("scipy")
    else:
        monkeypatch.setitem(sys.modules, "scipy.spatial", None)  # the numpy fallback
    idx, packing = sample_frames_45(
        entry["source_frames"],
        entry["source_fps"],
        entry["choose_fps"],
        entry["force_packing"],
        entry["max_num_frames"],
        entry["max_num_packing"],
    )
    assert idx.tolist() == entry["frame_idx"]
    assert packing == entry["packing"]
    np.testing.assert_allclose(idx / entry["source_fps"], entry["frame_times_s"])
    tids = temporal_ids_45(idx, entry["source_fps"], entry["source_frames"], packing)
    assert tids == entry["temporal_ids"]


@pytest.mark.parametrize("seconds,frames,packing", [(20, 100, 1), (60, 300, 2), (120, 540, 3)])
def test_45_spec_examples(seconds, frames, packing):
    idx, got_packing = sample_frames_45(seconds * 30, 30.0)
    assert len(idx) == frames and got_packing == packing
    groups = temporal_ids_45(idx, 30.0, seconds * 30, got_packing)
    assert len(groups) == -(-frames // packing)
    assert all(len(g) == packing for g in groups[:-1])


def test_45_force_packing_and_ids_increase():
    idx, packing = sample_frames_45(300, 30.0, force_packing=5)
    assert packing == 3  # capped at MAX_NUM_PACKING
    flat = [t for g in temporal_ids_45(idx, 30.0, 300, packing) for t in g]
    assert flat == sorted(flat) and flat[0] >= 0


def test_26_recipe():
    assert sample_frames_26(48, 30.0).tolist() == [0, 30]
    assert sample_frames_26(10, 29.97).tolist() == [0]
    # 300 s at 30 fps: 300 one-per-second candidates, uniformly subsampled to 64.
    idx = sample_frames_26(9000, 30.0)
    gap = 300 / 64
    assert idx.tolist() == [30 * int(i * gap + gap / 2) for i in range(64)]


def test_bad_counts():
    with pytest.raises(VideoError, match="no frames"):
        sample_frames_45(0, 30.0)
    with pytest.raises(VideoError, match="frame rate"):
        sample_frames_26(10, 0.0)
    for bad in (0, -5, float("nan"), "5"):
        with pytest.raises(VideoError, match=f"choose_fps must be .* > 0, got {bad!r}"):
            sample_frames_45(300, 30.0, choose_fps=bad)
    with pytest.raises(VideoError, match="force_packing must be an integer >= 1"):
        sample_frames_45(300, 30.0, force_packing=0)


def test_decode_clip(clip48):
    assert video_info(clip48) == (48, 30.0)
    frames = read_video_frames(clip48, np.array([0, 7, 7, 47]))
    for frame, i in zip(frames, [0, 7, 7, 47]):
        assert frame.mode == "RGB" and frame.size == (320, 240)
        assert np.asarray(frame)[120, 160].tolist() == list(colour(i))
    with pytest.raises(VideoError, match="not found"):
        read_video_frames(clip48, np.array([48]))


def test_load_video_45_matches_fixture_recipe(clip48):
    """The fixture video_8f_pack3 was sampled from exactly this kind of clip (48 f, 30 fps)."""
    entry = json.loads((FIXTURES / "minicpm-v-4_5/cases/video_8f_pack3/case.json").read_text())
    entry = entry["videos"][0]
    sample = load_video(clip48, "4.5", choose_fps=5, force_packing=3)
    assert sample.frame_idx.tolist() == entry["frame_idx"]
    assert sample.temporal_ids == entry["temporal_ids"]
    assert sample.packing == 3 and sample.fps == 30.0 and sample.num_frames == 48
    for frame, i in zip(sample.frames, sample.frame_idx):
        assert np.asarray(frame)[0, 0].tolist() == list(colour(int(i)))
    proc = MiniCPMVProcessor.from_pretrained(FIXTURES / "minicpm-v-4_5" / "checkpoint")
    out = proc([sample.message("Describe the video.")], **sample.processor_kwargs)
    assert out.group_sizes.tolist() == [3, 3, 2]
    assert out.temporal_ids.tolist() == [t for g in entry["temporal_ids"] for t in g]
    assert len(out.image_bound) == 3 and len(out.pixel_values) == 8


def test_load_video_26(clip48):
    sample = load_video(clip48, "2.6")
    assert sample.frame_idx.tolist() == [0, 30] and sample.temporal_ids is None
    assert sample.processor_kwargs == {"use_image_id": False, "max_slice_nums": 2}
    assert [np.asarray(f)[5, 5].tolist() for f in sample.frames] == [
        list(colour(0)),
        list(colour(30)),
    ]
    with pytest.raises(VideoError, match="2.6 and 4.5"):
        load_video(clip48, "2.5")


def test_unreadable_video(tmp_path):
    pytest.importorskip("av")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 10)
    with pytest.raises(VideoError, match="not a readable video"):
        video_info(bad)
    with pytest.raises(VideoError, match="no such video"):
        video_info(tmp_path / "missing.mp4")


def test_missing_pyav_message(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"minicpmv-jax\[video\]"):
        video.video_info(tmp_path / "x.mp4")
