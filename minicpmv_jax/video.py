"""Video frame sampling as the official MiniCPM-V 2.6 and 4.5 examples do it (PyAV decoding).

The official examples decode with decord; here PyAV (the ``video`` extra) decodes the same frames:
frame ``k`` is the k-th decoded frame of the first video stream and the frame rate is the
stream's average rate (decord's ``get_avg_fps``). The index arithmetic is reproduced exactly:

* 2.6 (``sample_frames_26``): one frame per ``round(fps)`` frames (~1 fps), uniformly subsampled
  to at most 64 frames; every frame is an image of the prompt (``use_image_id=False``,
  ``max_slice_nums=2``).
* 4.5 (``sample_frames_45``): ``choose_fps`` frames per second, packed by up to 3 frames per
  resampler group when the video is long; ``temporal_ids`` = time of each frame in units of
  0.1 s, grouped by ``packing`` (``use_image_id=False``, ``max_slice_nums=1``).

``load_video(path, version)`` returns the frames plus everything ``processor(...)`` needs.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from minicpmv_jax import versions
from minicpmv_jax.errors import MiniCPMVError, VideoError

__all__ = [
    "VideoSample",
    "load_video",
    "read_video_frames",
    "sample_frames_26",
    "sample_frames_45",
    "temporal_ids_45",
    "uniform_sample",
    "video_info",
]

logger = logging.getLogger(__name__)

# Official example constants.
MAX_NUM_FRAMES_26 = 64
MAX_NUM_FRAMES_45 = 180  # frames after packing (= resampler groups)
MAX_NUM_PACKING_45 = 3  # frames per group at most (the example says valid range 1..6)
TIME_SCALE_45 = 0.1  # seconds per temporal id


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError(
            "reading videos needs PyAV: pip install 'minicpmv-jax[video]' (or pip install av)"
        ) from None
    return av


def uniform_sample(n_items: int, n: int) -> np.ndarray:
    """Official ``uniform_sample(range(n_items), n)``: indices ``int(i*gap + gap/2)``, gap = len/n."""
    gap = n_items / n
    return np.array([int(i * gap + gap / 2) for i in range(n)], dtype=np.int64)


def sample_frames_26(
    num_frames: int, fps: float, max_num_frames: int = MAX_NUM_FRAMES_26
) -> np.ndarray:
    """2.6 example: every ``round(fps)``-th frame (~1 fps), at most ``max_num_frames`` of them.

    Returns:
      int64 [n] source frame indices.
    """
    _check_counts(num_frames, fps)
    step = max(round(fps), 1)  # official: round(vr.get_avg_fps() / 1)
    frame_idx = np.arange(0, num_frames, step, dtype=np.int64)
    if len(frame_idx) > max_num_frames:
        frame_idx = frame_idx[uniform_sample(len(frame_idx), max_num_frames)]
    return frame_idx


def sample_frames_45(
    num_frames: int,
    fps: float,
    choose_fps: float = 5,
    force_packing: int | None = None,
    max_num_frames: int = MAX_NUM_FRAMES_45,
    max_num_packing: int = MAX_NUM_PACKING_45,
) -> tuple[np.ndarray, int]:
    """4.5 example ``encode_video`` frame choice.

    Args:
      num_frames, fps: length and average frame rate of the source video.
      choose_fps: frames per second to sample (the model card example uses 5).
      force_packing: if given, frames per group = min(force_packing, max_num_packing).

    Returns:
      (int64 [n] source frame indices, packing = frames per temporal group).
    """
    _check_counts(num_frames, fps)
    if isinstance(choose_fps, bool) or not (
        isinstance(choose_fps, numbers.Real) and math.isfinite(choose_fps) and choose_fps > 0
    ):
        raise VideoError(
            f"choose_fps must be a number of frames per second > 0, got {choose_fps!r}"
        )
    if force_packing is not None and (
        isinstance(force_packing, bool)
        or not isinstance(force_packing, numbers.Integral)
        or force_packing < 1
    ):
        raise VideoError(f"force_packing must be an integer >= 1, got {force_packing!r}")
    duration = num_frames / fps
    if choose_fps * int(duration) <= max_num_frames:
        packing = 1
        n = round(min(choose_fps, round(fps)) * min(max_num_frames, duration))
    else:
        packing = math.ceil(duration * choose_fps / max_num_frames)
        if packing <= max_num_packing:
            n = round(duration * choose_fps)
        else:
            n = round(max_num_frames * max_num_packing)
            packing = max_num_packing
    n = max(int(n), 1)  # official would divide by zero for clips shorter than one sample
    frame_idx = uniform_sample(num_frames, n)
    if force_packing:
        packing = min(int(force_packing), max_num_packing)
    return frame_idx, packing


def _nearest(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Official ``map_to_nearest_scale`` (scipy cKDTree nearest neighbour)."""
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        cKDTree = None
    if cKDTree is not None:
        _, idx = cKDTree(scale[:, None]).query(values[:, None])
        return scale[idx]
    # Without scipy: nearest value, lower one on exact ties. cKDTree's tie-breaking depends on
    # its tree layout, so frames exactly halfway between two 0.1 s steps (e.g. 20/40/60 fps) may
    # get the other neighbour than the official code; install scipy for bit-exact ids.
    if len(scale) == 1:
        return np.full_like(values, scale[0])
    i = np.clip(np.searchsorted(scale, values), 1, len(scale) - 1)
    lo, hi = scale[i - 1], scale[i]
    return np.where(np.abs(hi - values) < np.abs(values - lo), hi, lo)


def temporal_ids_45(
    frame_idx: np.ndarray,
    fps: float,
    num_frames: int,
    packing: int,
    time_scale: float = TIME_SCALE_45,
) -> list[list[int]]:
    """4.5 ``temporal_ids``: time of each frame in ``time_scale`` units, grouped by ``packing``.

    Official arithmetic: nearest value of ``np.arange(0, duration, 0.1)`` to ``idx / fps``,
    divided by 0.1 and truncated to int32 (so 0.7 s can become id 6 or 7 depending on rounding).
    """
    duration = num_frames / fps
    scale = np.arange(0, duration, time_scale)
    ts = np.asarray(frame_idx, dtype=np.float64) / fps
    ids = (_nearest(ts, scale) / time_scale).astype(np.int32)
    return [[int(x) for x in ids[i : i + packing]] for i in range(0, len(ids), packing)]


def _check_counts(num_frames: int, fps: float) -> None:
    if num_frames < 1:
        raise VideoError(f"the video has no frames (num_frames={num_frames})")
    if not fps or not math.isfinite(fps) or fps <= 0:
        raise VideoError(f"the video has no usable frame rate (fps={fps})")


# ---------------------------------------------------------------------------------------------
# Decoding (PyAV)
# ---------------------------------------------------------------------------------------------


def _open(path: str | os.PathLike):
    av = _import_av()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoError(f"no such video file {path!r}")
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise VideoError(f"{path!r}: not a readable video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path!r}: has no video stream")
    return av, container


def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return 0.0


def _count_frames(av, container, stream, path) -> int:
    try:
        return sum(1 for _ in container.decode(stream))
    except av.error.FFmpegError as e:
        raise VideoError(f"{path!r}: decoding failed ({e})") from None


def video_info(path: str | os.PathLike) -> tuple[int, float]:
    """(number of frames, average fps) of the first video stream."""
    av, container = _open(path)
    with container:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        n = stream.frames or _count_frames(av, container, stream, path)
    return int(n), fps


def read_video_frames(path: str | os.PathLike, frame_idx: np.ndarray) -> list[Image.Image]:
    """Decode the frames at the given (decode-order) indices as RGB PIL images.

    Decodes sequentially and converts only the requested frames, so memory stays at the size
    of the selected frames.
    """
    av, container = _open(path)
    wanted = np.asarray(frame_idx, dtype=np.int64)
    if wanted.size and wanted.min() < 0:
        raise VideoError(f"negative frame index {wanted.min()}")
    targets = {int(k): [] for k in wanted}  # index -> positions in the output
    for pos, k in enumerate(wanted):
        targets[int(k)].append(pos)
    out: list[Image.Image | None] = [None] * len(wanted)
    last = int(wanted.max()) if wanted.size else -1
    k = -1
    with container:
        stream = container.streams.video[0]
        try:
            for k, frame in enumerate(container.decode(stream)):
                if k in targets:
                    img = frame.to_image()  # RGB (rgb24) PIL image, as decord's asnumpy + fromarray
                    for pos in targets[k]:
                        out[pos] = img if img.mode == "RGB" else img.convert("RGB")
                if k >= last:
                    break
        except av.error.FFmpegError as e:
            raise VideoError(f"{os.fspath(path)!r}: decoding failed at frame {k} ({e})") from None
    missing = [int(wanted[i]) for i, x in enumerate(out) if x is None]
    if missing:
        raise VideoError(f"{os.fspath(path)!r}: frames {missing[:5]} not found (video too short)")
    return out


@dataclass(frozen=True)
class VideoSample:
    """Sampled frames of one video and the processor settings the official examples use.

    Attributes:
      frames: RGB PIL images, in time order; put them (then the question) in a user message.
      frame_idx: int64 [n] source frame indices; num_frames / fps: source length and rate.
      temporal_ids: 4.5 groups of time ids (pass as ``temporal_ids=``), None for 2.6.
      packing: frames per group (4.5; 1 for 2.6).
      processor_kwargs: the keyword arguments for ``processor(...)`` / chat().
    """

    frames: list[Image.Image]
    frame_idx: np.ndarray
    num_frames: int
    fps: float
    temporal_ids: list[list[int]] | None
    packing: int
    processor_kwargs: dict = field(default_factory=dict)

    def message(self, question: str) -> dict:
        """The user message ``{"role": "user", "content": frames + [question]}``."""
        return {"role": "user", "content": [*self.frames, question]}


def load_video(
    path: str | os.PathLike,
    version: str = "4.5",
    *,
    choose_fps: float = 5,
    force_packing: int | None = None,
    max_num_frames: int | None = None,
) -> VideoSample:
    """Sample a video file as the official example of ``version`` ("2.6" or "4.5") does.

    Args:
      choose_fps, force_packing: 4.5 sampling options (see ``sample_frames_45``).
      max_num_frames: override the example's frame cap (2.6: 64 frames; 4.5: 180 groups).
    """
    try:
        recipe = versions.spec(str(version)).video
    except MiniCPMVError:
        recipe = None
    if recipe is None:
        raise VideoError(f"video sampling recipes exist for versions 2.6 and 4.5, not {version!r}")
    num_frames, fps = video_info(path)
    if recipe == "2.6":
        frame_idx = sample_frames_26(num_frames, fps, max_num_frames or MAX_NUM_FRAMES_26)
        tids, packing = None, 1
        kwargs = {"use_image_id": False, "max_slice_nums": 2}
    else:  # "4.5"
        frame_idx, packing = sample_frames_45(
            num_frames, fps, choose_fps, force_packing, max_num_frames or MAX_NUM_FRAMES_45
        )
        tids = temporal_ids_45(frame_idx, fps, num_frames, packing)
        kwargs = {"use_image_id": False, "max_slice_nums": 1, "temporal_ids": tids}
    frames = read_video_frames(path, frame_idx)
    return VideoSample(frames, frame_idx, num_frames, fps, tids, packing, kwargs)
