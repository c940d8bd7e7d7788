"""MiniCPM-V 4.6 processor in numpy/PIL (no torch): slicing, resize, patch packing, video frame
sampling and stacking, placeholders, chat template and tokenizer.

Geometry follows the released `MiniCPMV4_6ImageProcessor` / `MiniCPMV4_6VideoProcessor`
(spec §3-5). Grids are `(rows, cols)` and sizes `(height, width)` everywhere here; the only
(width, height) pair is PIL's `Image.size` / `resize` argument, read and written in `_resize`.
The released resize is torchvision's antialiased bicubic on uint8 (torch's separable uint8
kernel: Pillow's filter with a = -0.5, but int16 weights of a data-dependent precision, so
Pillow's own resize differs by a level here and there); `resize_u8` reproduces it exactly.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from minicpmv_jax.errors import ImageError, MessageError, MiniCPMVError, VideoError
from minicpmv_jax.processor import ProcessorOutput, load_tokenizer, render_chat_template
from minicpmv_jax.v46.config import MiniCPMV46Config, check_downsample_mode

PROCESSOR_KWARGS = (
    "downsample_mode",
    "max_slice_nums",
    "use_image_id",
    "stack_frames",
    "max_num_frames",
    "enable_thinking",
)


# ------------------------------------------------------------------------------ geometry
def ensure_divide(length: float, divisor: int) -> int:
    """max(round(length / divisor) * divisor, divisor), Python's round (half to even)."""
    return max(round(length / divisor) * divisor, divisor)


def find_best_resize(
    size_hw: tuple[float, float], scale: int, patch: int, mode: str, allow_upscale: bool
) -> tuple[int, int]:
    """(height, width) of a unit: area capped at scale^2 (or fitted to it when upscaling is
    allowed), then multiples of 4 (16x) or 2 (4x) patches."""
    height, width = size_hw
    if height * width > scale * scale or allow_upscale:
        ratio = width / height
        height = int(scale / math.sqrt(ratio))
        width = int(height * ratio)  # from the truncated height, as released
    m = 2 if mode == "4x" else 4
    return ensure_divide(height, patch * m), ensure_divide(width, patch * m)


def sliced_grid(
    size_hw: tuple[int, int], max_slice_nums: int, scale: int
) -> tuple[int, int] | None:
    """(rows, cols) of the slices, None when the image is not sliced."""
    height, width = size_hw
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale * scale)), max_slice_nums)
    if multiple <= 1:
        return None
    best, best_err = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slice_nums:
            continue
        for rows in range(1, n + 1):
            if n % rows:
                continue
            err = abs(log_ratio - math.log((n // rows) / rows))
            if err < best_err or (err == best_err and rows > best[0]):
                best, best_err = (rows, n // rows), err
    return best


def refine_size(
    size_hw: tuple[int, int], grid: tuple[int, int], scale: int, patch: int, mode: str
) -> tuple[int, int]:
    """(height, width) of the image the slices are cut from."""
    rows, cols = grid
    height = ensure_divide(size_hw[0], rows)
    width = ensure_divide(size_hw[1], cols)
    h, w = find_best_resize((height / rows, width / cols), scale, patch, mode, True)
    return h * rows, w * cols


def _cubic(x: np.ndarray) -> np.ndarray:
    """Bicubic convolution kernel with a = -0.5 (torch's `aa_filter`, Pillow's)."""
    a, x = -0.5, np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Fixed-point taps of one axis (torch's `compute_index_ranges_int16_weights`): float64
    filter taps normalised per output, scaled by the largest power of two that keeps the largest
    weight inside int16, rounded half away from zero.

    Returns: first input index [out], int64 weights [out, taps] (0 past each range), precision.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    max_taps = math.ceil(support) * 2 + 1
    first = np.zeros(out_size, np.int64)
    taps = np.zeros((out_size, max_taps))
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(max(min(int(center + support + 0.5), in_size) - xmin, 0), max_taps)
        w = _cubic((np.arange(xsize) + xmin - center + 0.5) * invscale)
        total = w.sum()
        first[i] = xmin
        taps[i, :xsize] = w / total if total != 0.0 else w
    precision = 0
    while precision < 22 and int(0.5 + taps.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = taps * (1 << precision)
    return (
        first,
        np.where(v < 0, (-0.5 + v).astype(np.int64), (0.5 + v).astype(np.int64)),
        precision,
    )


def _resample_axis(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass over `axis` (0 = rows, 1 = columns) of uint8 [H, W, C], in exact
    integer arithmetic: (2^(p-1) + sum w * x) >> p, clamped to uint8."""
    src = np.moveaxis(img, axis, 0).astype(np.int64)  # [in, other, C]
    first, w, precision = _aa_weights(src.shape[0], out_size)
    acc = np.full((out_size, *src.shape[1:]), 1 << (precision - 1), np.int64)
    for k in range(w.shape[1]):
        rows = np.minimum(first + k, src.shape[0] - 1)  # weights past the range are 0
        acc += w[:, k, None, None] * src[rows]
    return np.moveaxis(np.clip(acc >> precision, 0, 255).astype(np.uint8), 0, axis)


def resize_u8(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3]: torchvision v2 `resize` (bicubic, antialias) on a
    uint8 tensor, bit for bit: horizontal pass, then vertical, each rounded to uint8."""
    h, w = size_hw
    if img.shape[1] != w:
        img = _resample_axis(img, w, 1)
    if img.shape[0] != h:
        img = _resample_axis(img, h, 0)
    return img


_resize = resize_u8


def units_of(img: np.ndarray, settings: dict, slicing: bool = True):
    """Source + slices of one uint8 [H, W, 3] image: (list of uint8 [h, w, 3], (rows, cols))."""
    scale, patch, mode = settings["scale_resolution"], settings["patch_size"], settings["mode"]
    hw = img.shape[:2]
    grid = sliced_grid(hw, settings["max_slice_nums"], scale) if slicing else None
    units = [_resize(img, find_best_resize(hw, scale, patch, mode, grid is None))]
    if grid is not None:
        refined = _resize(img, refine_size(hw, grid, scale, patch, mode))
        rows, cols = grid
        sh, sw = refined.shape[0] // rows, refined.shape[1] // cols
        units += [
            refined[r * sh : (r + 1) * sh, c * sw : (c + 1) * sw]
            for r in range(rows)
            for c in range(cols)
        ]
    return units, grid or (0, 0)


def pack(units: list[np.ndarray], patch: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 units -> (float32 [1, 3, p, p*N] NaViT strip, int32 [U, 2] patch grids (h, w)).

    Each unit [h*p, w*p, 3] becomes [3, p, h*w*p] with patch r*w + q at columns
    [(r*w + q)*p, ...): the layout `reshape_by_patch` produces."""
    strips, sizes = [], []
    for u in units:
        h, w = u.shape[0] // patch, u.shape[1] // patch
        x = u.astype(np.float32).transpose(2, 0, 1).reshape(3, h, patch, w, patch)
        strips.append(x.transpose(0, 2, 1, 3, 4).reshape(3, patch, h * w * patch))
        sizes.append((h, w))
    strip = (np.concatenate(strips, axis=-1) - 127.5) / 127.5  # fused rescale + normalise
    return strip[None].astype(np.float32), np.asarray(sizes, np.int32).reshape(-1, 2)


# ------------------------------------------------------------------------------ video
def sample_frames(n: int, fps: float, max_num_frames: int, stack_frames: int):
    """(main frame indices, sub-frame timestamps, sub-frame indices) of a clip (`sample_frames`)."""
    duration = n / fps
    seconds = math.ceil(duration)
    if duration > max_num_frames:
        stamps = [round(i * 0.1, 1) for i in range(int(duration / 0.1))]
        main = [min(int(t * fps), n - 1) for t in stamps]
        if len(main) > max_num_frames:
            main = [main[i] for i in np.linspace(0, len(main) - 1, max_num_frames, dtype=int)]
    else:
        main = [int(i * fps) for i in range(seconds)]
    subs: list[float] = []
    if stack_frames > 1:
        subs = [
            s + j / stack_frames
            for s in range(seconds)
            for j in range(1, stack_frames)
            if s + j / stack_frames < duration
        ]
        cap = max_num_frames * (stack_frames - 1)
        if len(subs) > cap:
            subs = [subs[int(i)] for i in np.linspace(0, len(subs) - 1, cap, dtype=int)]
    return main, subs, [min(int(t * fps), n - 1) for t in subs]


def composite(frames: list[np.ndarray]) -> np.ndarray:
    """Sub-frames of one second on one canvas (`concat_frames_as_image`): 4 -> 2x2, 3 / 2 -> the
    row or column whose canvas is closer to square, else one row; 6-px black separators."""
    line = 6
    n, (height, width) = len(frames), frames[0].shape[:2]

    def ratio(rows, cols):
        return (cols * width + (cols - 1) * line) / max(1, rows * height + (rows - 1) * line)

    if n == 4:
        rows, cols = 2, 2
    elif n in (2, 3):
        cands = [(1, n), (n, 1)]
        errs = [abs(ratio(r, c) - 1.0) for r, c in cands]
        if n == 2 and errs[0] == errs[1]:
            rows, cols = (1, 2) if width / height >= 1.0 else (2, 1)
        else:
            rows, cols = cands[int(np.argmin(errs))]
    else:
        rows, cols = 1, n
    canvas = np.zeros(
        (rows * height + (rows - 1) * line, cols * width + (cols - 1) * line, 3), np.uint8
    )
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        canvas[
            r * (height + line) : r * (height + line) + height,
            c * (width + line) : c * (width + line) + width,
        ] = f
    return canvas


def video_units(frames: list[np.ndarray], fps: float, max_num_frames: int, stack_frames: int):
    """Visual units of a clip: main frames interleaved with each second's composite."""
    main, subs, sub_idx = sample_frames(len(frames), fps, max_num_frames, stack_frames)
    units = []
    cursor = 0
    for sec, m in enumerate(main):
        units.append(frames[m])
        start = cursor
        while cursor < len(subs) and subs[cursor] < sec + 1:
            cursor += 1
        if cursor > start:
            units.append(composite([frames[i] for i in sub_idx[start:cursor]]))
    return units, main + sub_idx


# ------------------------------------------------------------------------------ processor
def _rgb(img: Any, what: str) -> np.ndarray:
    if not isinstance(img, Image.Image):
        raise ImageError(f"{what} must be a PIL.Image, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{what} is empty ({img.width}x{img.height})")
    return np.asarray(img.convert("RGB"))


def to_chat_format(messages: list) -> list[dict]:
    """Messages in transformers' chat format; the official `content: [PIL.Image, "text"]` form
    is converted (a PIL image -> {"type": "image", "image": img}, str -> {"type": "text"})."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MessageError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MessageError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise MessageError(f"messages[{i}]: unknown role {m['role']!r}")
        content = m["content"]
        if isinstance(content, (list, tuple)):
            items = []
            for j, it in enumerate(content):
                if isinstance(it, str):
                    it = {"type": "text", "text": it}
                elif isinstance(it, Image.Image):
                    it = {"type": "image", "image": it}
                elif not isinstance(it, dict) or it.get("type") not in ("text", "image", "video"):
                    raise MessageError(
                        f"messages[{i}].content[{j}]: expected str, PIL.Image or a dict with "
                        f"type 'text' / 'image' / 'video', got {type(it).__name__}"
                    )
                items.append(it)
            content = items
        elif not isinstance(content, str):
            raise MessageError(f"messages[{i}].content must be a str or a list")
        out.append({"role": m["role"], "content": content})
    return out


class MiniCPMV46Processor:
    """`processor(messages, **kwargs)` -> ProcessorOutput for one conversation (numpy)."""

    def __init__(self, tokenizer, chat_template: str, settings: dict, config: MiniCPMV46Config):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.settings = settings  # image processor settings + video defaults
        self.config = config
        self.eos_ids = tuple(config.eos_ids)

    @classmethod
    def from_folder(cls, folder) -> MiniCPMV46Processor:
        """From a checkpoint folder alone (config.json and generation_config.json read here)."""
        import json

        folder = pathlib.Path(folder)
        gen = folder / "generation_config.json"
        config = MiniCPMV46Config.from_hf(
            json.loads((folder / "config.json").read_text()),
            generation=json.loads(gen.read_text()) if gen.exists() else None,
        )
        return cls.from_pretrained(folder, config)

    @classmethod
    def from_pretrained(cls, folder, config: MiniCPMV46Config) -> MiniCPMV46Processor:
        import json

        folder = pathlib.Path(folder)
        tok = load_tokenizer(folder, "4.6")
        template_file = folder / "chat_template.jinja"
        if template_file.exists():
            template = template_file.read_text()
        else:
            template = getattr(tok, "chat_template", None)
            if not template:
                raise MiniCPMVError(f"{folder}: no chat_template.jinja")
        settings = {
            "scale_resolution": 448,
            "patch_size": 14,
            "max_slice_nums": 9,
            "slice_mode": True,
            "use_image_id": True,
            "max_num_frames": 128,
            "stack_frames": 1,
            "video_slice_mode": True,
        }
        pc = folder / "processor_config.json"
        pp = folder / "preprocessor_config.json"
        if pc.exists():
            data = json.loads(pc.read_text())
            img, vid = data.get("image_processor", {}), data.get("video_processor", {})
        elif pp.exists():
            img, vid = json.loads(pp.read_text()), {}
        else:
            img, vid = {}, {}
        for k in ("scale_resolution", "patch_size", "max_slice_nums", "slice_mode", "use_image_id"):
            settings[k] = img.get(k, settings[k])
        for k in ("max_num_frames", "stack_frames"):
            settings[k] = vid.get(k, settings[k])
        settings["video_slice_mode"] = vid.get("slice_mode", True)
        return cls(tok, template, settings, config)

    def __call__(self, messages, **kwargs) -> ProcessorOutput:
        unknown = sorted(set(kwargs) - set(PROCESSOR_KWARGS))
        if unknown:
            raise MiniCPMVError(
                f"unknown processor argument(s) {unknown}; supported: {PROCESSOR_KWARGS}"
            )
        s = dict(self.settings)
        mode = check_downsample_mode(kwargs.get("downsample_mode") or self.config.downsample_mode)
        s["mode"] = mode
        for k in ("max_slice_nums", "stack_frames", "max_num_frames"):
            if kwargs.get(k) is not None:
                v = kwargs[k]
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise MiniCPMVError(f"{k} must be a positive int, got {v!r}")
                s[k] = v
        use_image_id = kwargs.get("use_image_id")
        use_image_id = s["use_image_id"] if use_image_id is None else bool(use_image_id)
        messages = to_chat_format(messages)
        images, videos = [], []
        for i, m in enumerate(messages):
            if isinstance(m["content"], str):
                continue
            for j, it in enumerate(m["content"]):
                if it["type"] == "image":
                    images.append(_rgb(it.get("image"), f"messages[{i}].content[{j}].image"))
                elif it["type"] == "video":
                    videos.append(self._video(it, f"messages[{i}].content[{j}]", s))
        text = render_chat_template(
            self.chat_template, messages, enable_thinking=bool(kwargs.get("enable_thinking", False))
        )
        div = 16 if mode == "16x" else 4
        out = ProcessorOutput(version="4.6", downsample_mode=mode)
        repl_img, repl_vid = [], []
        if images:
            units, grids, counts = [], [], []
            for img in images:
                u, grid = units_of(img, s, s["slice_mode"])
                units += u
                grids.append(grid)
                counts.append(len(u))
            out["pixel_values"], out["target_sizes"] = pack(units, s["patch_size"])
            out["grids"] = np.asarray(grids, np.int32)
            out["num_patches_per_image"] = np.asarray(counts, np.int32)
            ts = np.split(out["target_sizes"], np.cumsum(counts)[:-1])
            repl_img = [self._image_text(t, g, div, "<|image_pad|>") for t, g in zip(ts, grids)]
        if videos:
            units, grids, per_frame, per_video, sampled = [], [], [], [], []
            texts = []
            for vunits, idx in videos:
                vtext = ""
                for unit in vunits:
                    u, grid = units_of(unit, s, s["video_slice_mode"])
                    units += u
                    grids.append(grid)
                    per_frame.append(len(u))
                    sizes = np.asarray([(x.shape[0] // 14, x.shape[1] // 14) for x in u])
                    vtext += self._image_text(sizes, grid, div, "<|video_pad|>", first_slice=True)
                texts.append(vtext)
                per_video.append(len(vunits))
                sampled += idx
            out["pixel_values_videos"], out["target_sizes_videos"] = pack(units, s["patch_size"])
            out["grids_videos"] = np.asarray(grids, np.int32)
            out["num_patches_per_frame"] = np.asarray(per_frame, np.int32)
            out["num_frames_per_video"] = np.asarray(per_video, np.int32)
            out["sampled_frame_indices"] = np.asarray(sampled, np.int32)
            repl_vid = texts
        prompt = self._expand(text, repl_img, repl_vid, use_image_id)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out["input_ids"] = np.asarray(ids, np.int64)
        out["attention_mask"] = np.ones(len(ids), bool)
        out["prompt"] = prompt
        return out

    def _video(self, item: dict, what: str, s: dict):
        frames = item.get("video")
        if not isinstance(frames, (list, tuple)) or not frames:
            raise VideoError(f"{what}.video must be a non-empty list of PIL frames")
        fps = item.get("fps")
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0:
            raise VideoError(
                f"{what}.fps must be a positive number (frames per second), got {fps!r}"
            )
        arrays = [_rgb(f, f"{what}.video[{k}]") for k, f in enumerate(frames)]
        if len({a.shape for a in arrays}) != 1:
            raise VideoError(f"{what}.video: frames differ in size")
        return video_units(arrays, float(fps), s["max_num_frames"], s["stack_frames"])

    @staticmethod
    def _image_text(sizes, grid, div: int, pad: str, first_slice: bool = False) -> str:
        """`<image>pads</image>` then the slice rows (`<slice>pads</slice>` x cols, rows joined by
        a newline). Videos give every slice the first slice's count (as released)."""
        counts = [int(h) * int(w) // div for h, w in np.asarray(sizes).reshape(-1, 2)]
        text = "<image>" + pad * counts[0] + "</image>"
        rows, cols = grid
        if rows > 0 and cols > 0:
            sl = counts[1:] if not first_slice else [counts[1]] * (rows * cols)
            text += "\n".join(
                "".join("<slice>" + pad * n + "</slice>" for n in sl[r * cols : (r + 1) * cols])
                for r in range(rows)
            )
        return text

    @staticmethod
    def _expand(text: str, images: list[str], videos: list[str], use_image_id: bool) -> str:
        """Replace the k-th <|image_pad|> / <|video_pad|> of the rendered template by its
        expansion (with `<image_id>k</image_id>` first, counted per kind, when asked)."""
        for pad, repl, kind in (
            ("<|image_pad|>", images, "image"),
            ("<|video_pad|>", videos, "video"),
        ):
            parts = text.split(pad)
            if len(parts) - 1 != len(repl):
                raise MessageError(
                    f"the conversation has {len(parts) - 1} {kind} placeholders for {len(repl)} {kind}s"
                )
            out = parts[0]
            for k, (r, rest) in enumerate(zip(repl, parts[1:])):
                prefix = f"<image_id>{k}</image_id>" if use_image_id else ""
                out += prefix + r + rest
            text = out
        return text
