"""MiniCPM-V processor: conversation -> prompt ids, image bounds and padded vision inputs.

numpy + PIL + a transformers *fast* tokenizer only (no torch, no remote code). Reproduces the
official ``chat()`` prompt path of MiniCPM-Llama3-V 2.5, MiniCPM-V 2.6 and MiniCPM-V 4.5:

1. content lists become ``"(<image>./</image>)"`` markers joined with ``"\\n"``;
2. the checkpoint's own ``chat_template`` is rendered with jinja2;
3. every marker is replaced by the image placeholder (``<image>`` + ``<unk>`` x query_num + ...);
4. the text is tokenised, truncated to ``max_inp_length`` and ``image_bound`` is read off the ids;
5. images are sliced, normalised and laid out both as official strips and as padded patch
   vectors with position ids / masks for a static-shape vision tower.

Shapes use: T tokens, n resampler groups (image_bound rows), I slices, P bucketed patch count,
G groups (= n), Q query_num.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from minicpmv_jax import versions
from minicpmv_jax.errors import (
    CheckpointError,
    MessageError,
    PromptTooLongError,
)
from minicpmv_jax.image import (
    DEFAULT_MAX_PIXELS,
    PixelStrips,
    SlicedImage,
    aligned_zeros,
    load_image,
    patchify,
    slice_image,
)

__all__ = [
    "DEFAULT_PATCH_BUCKETS",
    "IMAGE_MARKER",
    "SUPPORTED_VERSIONS",
    "MiniCPMVProcessor",
    "ProcessorOutput",
    "bucket_coords",
    "load_tokenizer",
    "patch_bucket_size",
    "render_chat_template",
    "vision_mask",
    "vision_position_ids",
]

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = versions.supported()
DEFAULT_PATCH_BUCKETS = (256, 512, 1024, 1152, 1280, 1536, 2048, 4096)
# The user-level image marker of every supported version's chat().
IMAGE_MARKER = "(<image>./</image>)"
_ROLES = ("system", "user", "assistant")
# Chat-control tokens that typed text must not spell (the official tokenizer would turn a typed
# `<|im_end|>` into a real end of turn); the version's terminators, bos and eos are added.
_CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>")  # fmt: skip
# File extensions of videos a lone path string may name (images: PIL's registered extensions).
_VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv",
                     ".flv")  # fmt: skip


# =============================================================================================
# Vision position ids (spec §3.1.2): bit-exact float32 "fractional coordinate bucketing"
# =============================================================================================


def _torch_arange_f32(start: float, end: float, step: float) -> np.ndarray:
    """float32 ``torch.arange(start, end, step)`` as PyTorch's CPU kernel computes it.

    The kernel accumulates in double (``acc_type<float>``): the scalar path writes
    ``float32(start + step*k)``; the vectorised path (blocks of 8 floats, used for the first
    ``16*floor(m/16)`` elements) writes ``float32(double(float32(start + step*b)) + i*step)``
    for block start ``b`` and lane ``i``. The two differ in the last bit for some k, which moves
    a value across a bucket boundary: this is where the official ids differ from floor(70k/n).
    """
    m = math.ceil((end - start) / step)
    k = np.arange(m, dtype=np.float64)
    out = (start + step * k).astype(np.float32)  # scalar tail
    n_vec = 16 * (m // 16)
    if n_vec:
        kv = np.arange(n_vec)
        block = (kv // 8) * 8
        base = (start + step * block).astype(np.float32).astype(np.float64)
        out[:n_vec] = (base + (kv - block) * step).astype(np.float32)
    return out


@functools.lru_cache(maxsize=8)
def _boundaries(num_patches_per_side: int) -> np.ndarray:
    # torch.arange(1/N, 1.0, 1/N) with Python-double start and step (float32 result).
    inv = 1.0 / num_patches_per_side
    return _torch_arange_f32(inv, 1.0, inv)


@functools.lru_cache(maxsize=4096)
def bucket_coords(n: int, num_patches_per_side: int = 70) -> np.ndarray:
    """Bucketed coordinate of each of ``n`` patches along one axis, as the official tower.

    ``bucketize(arange(0, 1 - 1e-6, 1/n), arange(1/N, 1, 1/N), right=True)`` where ``1/n`` is a
    float32 tensor division (``1 / tensor(n)``). Approximately floor(N*k/n), but not exactly:
    see the exception table of the spec.

    Returns:
      read-only int64 [n] with values in [0, N).
    """
    if n < 1:
        raise ValueError(f"patch count along an axis must be >= 1, got {n}")
    step = float(np.float32(1) / np.float32(n))
    frac = _torch_arange_f32(0.0, 1 - 1e-6, step)
    assert frac.shape == (n,), (n, frac.shape)
    out = np.searchsorted(_boundaries(num_patches_per_side), frac, side="right").astype(np.int64)
    out.flags.writeable = False
    return out


def _check_tgt(tgt_sizes: np.ndarray, num_patches: int) -> np.ndarray:
    tgt = np.asarray(tgt_sizes, dtype=np.int64).reshape(-1, 2)
    lengths = tgt[:, 0] * tgt[:, 1]
    if lengths.size and lengths.max() > num_patches:
        raise ValueError(f"patch bucket P={num_patches} < largest slice ({lengths.max()} patches)")
    return tgt


def vision_position_ids(
    tgt_sizes: np.ndarray, num_patches: int, version: str, num_patches_per_side: int = 70
) -> np.ndarray:
    """Position-table ids the official vision tower looks up, padded to ``num_patches``.

    Args:
      tgt_sizes: int [I, 2] (patch rows h, patch cols w) per slice.
      num_patches: P, the padded patch count (>= max h*w).
      version: "2.5" | "2.6" | "4.5".

    Returns:
      int32 [I, P]. 2.6/4.5: ``bucket_h[r] * N + bucket_w[c]`` row-major for p < h*w, 0 after.
      2.5 quirk (official Idefics2 tower called without tgt_sizes and with an all-True mask): every
      slice is treated as a 1 x maxL strip, maxL = max h*w over ALL slices passed here, so every
      row is ``bucket(k / maxL)`` for k < maxL (row 0 of the table) and 0 after.
    """
    tgt = _check_tgt(tgt_sizes, num_patches)
    out = np.zeros((tgt.shape[0], num_patches), dtype=np.int32)
    if tgt.shape[0] == 0:
        return out
    if versions.spec(version).vision_strip:
        max_len = int((tgt[:, 0] * tgt[:, 1]).max())
        out[:, :max_len] = bucket_coords(max_len, num_patches_per_side)[None, :]
        return out
    for i, (h, w) in enumerate(tgt):
        ids = bucket_coords(int(h), num_patches_per_side)[:, None] * num_patches_per_side
        ids = ids + bucket_coords(int(w), num_patches_per_side)[None, :]  # [h, w]
        out[i, : h * w] = ids.reshape(-1)
    return out


def vision_mask(tgt_sizes: np.ndarray, num_patches: int, version: str) -> np.ndarray:
    """Keys the vision tower attends to.

    Args:
      tgt_sizes: int [I, 2]; num_patches: P; version: "2.5" | "2.6" | "4.5".

    Returns:
      bool [I, P]: 2.6/4.5: ``p < h*w`` of the slice. 2.5 quirk (``patch_attn_mask[i, :n] = True``
      on a [B, 1, L] tensor sets the whole row): ``p < maxL`` for every slice, maxL = max h*w over
      all slices passed here, i.e. zero-padding patches of shorter slices ARE attended.
    """
    tgt = _check_tgt(tgt_sizes, num_patches)
    lengths = tgt[:, 0] * tgt[:, 1]
    if versions.spec(version).vision_strip and lengths.size:
        lengths = np.full_like(lengths, lengths.max())
    return np.arange(num_patches)[None, :] < lengths[:, None]


def patch_bucket_size(max_patches: int, buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS) -> int:
    """Smallest bucket >= ``max_patches``; beyond the largest, the next multiple of 512."""
    for b in sorted(buckets):
        if b >= max_patches:
            return int(b)
    return int(-(-max_patches // 512) * 512)


# =============================================================================================
# Output container
# =============================================================================================


class ProcessorOutput(dict):
    """Processor output for ONE conversation; a dict with attribute access.

    Keys (numpy arrays unless said otherwise):
      input_ids int64 [T]; attention_mask bool [T] (2.6/4.5: ``input_ids != 0``, so a genuine
      ``"!"`` (id 0 in Qwen vocabularies) is masked as officially; 2.5: all True);
      image_bound int64 [n, 2] ([start, end) of each placeholder's <unk> run);
      tgt_sizes int64 [I, 2] (h, w) per slice; image_sizes int64 [n_images, 2] (W, H);
      pixel_values I float32 [3, 14, h*w*14] (official strip layout; a read-only sequence
      rebuilt from pixel_patches on access, see ``image.PixelStrips``);
      pixel_patches float32 [I, P, 3*14*14] (inner order (c, kh, kw), zero rows past h*w);
      patch_valid bool [I, P]; vision_mask bool [I, P]; position_ids int32 [I, P];
      temporal_ids int64 [I] (-1 = no time); group_sizes int64 [G] (slices per resampler group);
      prompt str (expanded prompt text); version str.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __dir__(self):
        return list(super().__dir__()) + list(self.keys())


# =============================================================================================
# Tokenizer and chat template
# =============================================================================================


class _NoTorchAdvice(logging.Filter):
    """Drops transformers' "PyTorch was not found" advice, printed when it is imported: only its
    tokenizers are used here, and torch is never needed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "PyTorch was not found" not in record.getMessage()


logging.getLogger("transformers").addFilter(_NoTorchAdvice())


def load_tokenizer(folder: str | os.PathLike, version: str):
    """Fast tokenizer of a checkpoint folder, without remote code.

    ``tokenizer.json`` when present (``PreTrainedTokenizerFast``); otherwise, for the Qwen-based
    versions, a ``Qwen2TokenizerFast`` converted from ``vocab.json`` + ``merges.txt`` with the
    added tokens of ``tokenizer_config.json`` (what the released 4.5 folder needs). The
    ``auto_map`` entries naming the official ``tokenization_minicpmv_fast.py`` are ignored: that
    class only adds attributes on top of the stock fast tokenizer.
    """
    import transformers

    folder = pathlib.Path(folder)
    try:
        if (folder / "tokenizer.json").is_file():
            return transformers.PreTrainedTokenizerFast.from_pretrained(
                str(folder), local_files_only=True
            )
        if (
            versions.spec(version).qwen_tokenizer
            and (folder / "vocab.json").is_file()
            and (folder / "merges.txt").is_file()
        ):
            # transformers 4.x: Qwen2TokenizerFast; 5.x: Qwen2Tokenizer is the fast class.
            cls = getattr(transformers, "Qwen2TokenizerFast", None) or transformers.Qwen2Tokenizer
            return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: could not load the tokenizer ({e})") from None
    raise CheckpointError(
        f"{folder}: no tokenizer files (need tokenizer.json"
        + (", or vocab.json + merges.txt" if versions.spec(version).qwen_tokenizer else "")
        + ")"
    )


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    # Same environment as transformers' apply_chat_template: sandboxed, trim_blocks/lstrip_blocks.
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict[str, str]], **variables: Any) -> str:
    """Render a checkpoint's jinja2 ``chat_template`` with ``add_generation_prompt=True``."""
    import jinja2

    try:
        return _compile_template(template).render(
            messages=messages, add_generation_prompt=True, **variables
        )
    except jinja2.exceptions.TemplateError as e:
        raise MessageError(
            f"the checkpoint's chat template rejected the conversation: {e}"
        ) from None


# =============================================================================================
# Processor
# =============================================================================================


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing {path.name} in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _vocabulary_test(tokenizer) -> Callable[[str], bool]:
    """`token in vocabulary` without building the vocabulary: a fast tokenizer looks one token up
    (`get_vocab()` builds a 151k-entry dict for the real Qwen2 vocabulary, 0.16 s per load)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda token: backend.token_to_id(token) is not None
    return tokenizer.get_vocab().__contains__


class MiniCPMVProcessor:
    """Turns one conversation into model inputs exactly as the official processor does.

    Build it with ``MiniCPMVProcessor.from_pretrained(folder)``; call it with messages in the
    official ``chat()`` format::

        proc = MiniCPMVProcessor.from_pretrained("MiniCPM-V-4_5")
        out = proc([{"role": "user", "content": [Image.open("cat.jpg"), "What is this?"]}])
        out.input_ids, out.image_bound, out.pixel_patches, out.position_ids, ...
    """

    pad_id = 0  # chat() pads with id 0 and masks every id 0 (see ProcessorOutput.attention_mask)

    def __init__(
        self,
        tokenizer,
        *,
        version: str,
        chat_template: str,
        query_num: int,
        patch_size: int = 14,
        scale_resolution: int = 448,
        max_slice_nums: int = 9,
        use_image_id: bool = True,
        num_patches_per_side: int = 70,
        max_inp_length: int | None = None,
        patch_buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        tokens: Mapping[str, str] | None = None,
    ):
        """Args mirror preprocessor_config.json; ``tokens`` maps role -> token string
        (keys im_start, im_end, slice_start, slice_end, unk, im_id_start, im_id_end)."""
        spec = versions.spec(version)  # raises UnsupportedVersionError
        self.version = version
        self.spec = spec
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.query_num = int(query_num)
        self.patch_size = int(patch_size)
        self.scale_resolution = int(scale_resolution)
        self.max_slice_nums = self._check_max_slice_nums(max_slice_nums)
        self.use_image_id = bool(use_image_id) and spec.image_ids
        self.num_patches_per_side = int(num_patches_per_side)
        self.max_inp_length = int(max_inp_length or spec.max_inp_length)
        self.patch_buckets = tuple(int(b) for b in patch_buckets)
        self.max_pixels = max_pixels
        self.folder: pathlib.Path | None = None
        tokens = {
            "im_start": "<image>",
            "im_end": "</image>",
            "slice_start": "<slice>",
            "slice_end": "</slice>",
            "unk": "<unk>",
            "im_id_start": "<image_id>",
            "im_id_end": "</image_id>",
            **(tokens or {}),
        }
        self.tokens = tokens
        # Special-token ids are always read from the tokenizer, never assumed.
        self.unk_id = self._token_id(tokens["unk"])
        self.image_start_id = self._token_id(tokens["im_start"])
        self.image_end_id = self._token_id(tokens["im_end"])
        self.slice_start_id = self._token_id(tokens["slice_start"])
        self.slice_end_id = self._token_id(tokens["slice_end"])
        self.image_id_start_id = self.image_id_end_id = None
        if spec.image_ids:
            self.image_id_start_id = self._token_id(tokens["im_id_start"])
            self.image_id_end_id = self._token_id(tokens["im_id_end"])
        eos = tokenizer.eos_token or "<|end_of_text|>"
        self.terminators = [self._token_id(t.replace("{eos}", eos)) for t in spec.terminators]
        self.bos_id = tokenizer.bos_token_id
        in_vocab = _vocabulary_test(tokenizer)
        self._control_tokens = tuple(
            t
            for t in dict.fromkeys(
                [*_CONTROL_TOKENS, tokenizer.bos_token, tokenizer.eos_token]
                + tokenizer.convert_ids_to_tokens(self.terminators)
            )
            if t and in_vocab(t) and t in tokenizer.all_special_tokens
        )
        # image_bound start/end tokens (2.5 counts only <image>: its slices are wrapped in
        # <image>...</image> inside one <slice>...</slice>)
        self._bound_start = np.array([self._token_id(tokens[k]) for k in spec.bound_start])
        self._bound_end = np.array([self._token_id(tokens[k]) for k in spec.bound_end])

    # -- construction ------------------------------------------------------------------------

    _OVERRIDES = (
        "max_slice_nums",
        "use_image_id",
        "max_inp_length",
        "patch_buckets",
        "max_pixels",
        "scale_resolution",
    )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> MiniCPMVProcessor:
        """Load from an official checkpoint folder (config.json, preprocessor_config.json,
        tokenizer files). ``overrides``: any of max_slice_nums, use_image_id, max_inp_length,
        patch_buckets, max_pixels, scale_resolution."""
        unknown = sorted(set(overrides) - set(cls._OVERRIDES))
        if unknown:
            raise TypeError(f"unknown processor option(s) {unknown}; allowed: {cls._OVERRIDES}")
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a checkpoint folder")
        config = _read_json(folder / "config.json")
        if config.get("model_type") == "minicpmv4_6":  # native-transformers 4.6: v46/processor.py
            from minicpmv_jax.v46.processor import MiniCPMV46Processor

            if overrides:
                raise TypeError(f"MiniCPM-V 4.6 takes settings per call, not {sorted(overrides)}")
            return MiniCPMV46Processor.from_folder(folder)
        version = versions.parse(config.get("version"), f"{folder / 'config.json'}")
        pre = _read_json(folder / "preprocessor_config.json")
        tok_config = _read_json(folder / "tokenizer_config.json")
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # list-of-named-templates form
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if not template:
            raise CheckpointError(f"{folder}: tokenizer_config.json has no chat_template")
        if pre.get("slice_mode", True) is False:
            raise CheckpointError(f"{folder}: slice_mode = false is not supported")
        query_num = int(pre.get("image_feature_size", config.get("query_num", 64)))
        if "query_num" in config and int(config["query_num"]) != query_num:
            # The official chat() asserts the same agreement.
            raise CheckpointError(
                f"{folder}: preprocessor image_feature_size {query_num} != "
                f"config query_num {config['query_num']}"
            )
        vision = config.get("vision_config", {})
        patch_size = int(pre.get("patch_size", config.get("patch_size", 14)))
        image_size = int(vision.get("image_size", 980))
        tokens = {
            k: pre[k]
            for k in (
                "im_start",
                "im_end",
                "slice_start",
                "slice_end",
                "unk",
                "im_id_start",
                "im_id_end",
            )
            if k in pre
        }
        kwargs = {
            "max_slice_nums": int(
                pre.get("max_slice_nums", config.get("slice_config", {}).get("max_slice_nums", 9))
            ),
            "use_image_id": bool(pre.get("use_image_id", versions.spec(version).image_ids)),
            "scale_resolution": int(pre.get("scale_resolution", 448)),
        }
        kwargs.update(overrides)
        tokenizer = load_tokenizer(folder, version)
        proc = cls(
            tokenizer,
            version=version,
            chat_template=template,
            query_num=query_num,
            patch_size=patch_size,
            num_patches_per_side=image_size // patch_size,
            tokens=tokens,
            **kwargs,
        )
        proc.folder = folder
        return proc

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or self.tokenizer.convert_ids_to_tokens(tid) != token:
            raise CheckpointError(f"the tokenizer has no token {token!r}")
        return int(tid)

    @staticmethod
    def _check_max_slice_nums(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise MessageError(f"max_slice_nums must be an integer >= 1, got {value!r}")
        return int(value)

    # -- messages ----------------------------------------------------------------------------

    def _flatten_messages(
        self, msgs: Any, system_prompt: str | None
    ) -> tuple[list[dict[str, str]], list[Image.Image]]:
        """Official chat(): content lists -> text with IMAGE_MARKER per image, joined by "\\n"."""
        if isinstance(msgs, (str, bytes)) or not isinstance(msgs, Sequence):
            raise MessageError(
                f"msgs must be a list of {{'role', 'content'}} dicts, got {type(msgs).__name__}"
            )
        if len(msgs) == 0:
            raise MessageError("empty conversation: msgs has no messages")
        out: list[dict[str, str]] = []
        images: list[Image.Image] = []
        for m, msg in enumerate(msgs):
            if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
                raise MessageError(f"message {m} must be a dict with 'role' and 'content' keys")
            role = msg["role"]
            if role not in _ROLES:
                raise MessageError(f"message {m}: unknown role {role!r}; expected one of {_ROLES}")
            if role == "system" and m != 0:
                raise MessageError(f"message {m}: a system message may only come first")
            content = msg["content"]
            if isinstance(content, str) or not isinstance(content, Sequence):
                content = [content]
            parts: list[str] = []
            for j, item in enumerate(content):
                where = f"message {m} item {j}"
                if isinstance(item, Mapping):  # {"text": s} / {"image": x} (fixture / JSON form)
                    if set(item) == {"text"}:
                        item = item["text"]
                    elif set(item) == {"image"}:
                        item = load_image(item["image"], max_pixels=self.max_pixels, what=where)
                    else:
                        raise MessageError(
                            f"{where}: dict items must be {{'text': s}} or {{'image': x}}"
                        )
                if isinstance(item, str):
                    parts.append(self._check_text(item, where, typed=role != "assistant"))
                elif isinstance(item, (Image.Image, bytes, bytearray, os.PathLike)):
                    if role == "system":
                        raise MessageError(f"{where}: images are not allowed in a system message")
                    images.append(load_image(item, max_pixels=self.max_pixels, what=where))
                    parts.append(IMAGE_MARKER)
                else:
                    raise MessageError(
                        f"{where}: content items must be str or images (PIL.Image, path, bytes), "
                        f"got {type(item).__name__}"
                    )
            out.append({"role": role, "content": "\n".join(parts)})
        if system_prompt:
            if out[0]["role"] == "system":
                raise MessageError("both system_prompt and a leading system message were given")
            # Official chat(): `if system_prompt:` prepends {'role': 'system', ...}.
            text = self._check_text(str(system_prompt), "system_prompt")
            out.insert(0, {"role": "system", "content": text})
        first = 1 if out[0]["role"] == "system" else 0
        if len(out) == first:
            raise MessageError("empty conversation: only a system message was given")
        if out[first]["role"] != "user":
            raise MessageError("the first (non-system) message must have role 'user'")
        return out, images

    def _check_text(self, text: str, where: str, typed: bool = True) -> str:
        """A text item as it will be tokenised; clear errors for what would go silently wrong:
        lone surrogates (not encodable) and, in text a person typed (``typed``: user and system
        messages; an assistant turn holds the model's own answer), chat-control tokens and a
        lone string that names an existing image or video file (sent as text, not the file)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise MessageError(
                f"{where}: the text has a lone surrogate {text[e.start]!r} at character {e.start} "
                "(half of a UTF-16 pair, not a character); fix the string's decoding"
            ) from None
        if not typed:
            return text
        control = [t for t in self._control_tokens if t in text]
        if control:
            raise MessageError(
                f"{where}: the text spells the chat-control token(s) {', '.join(control)}; the "
                "tokenizer would turn them into real control tokens (e.g. an end of turn), so "
                "they are refused: remove them from the text"
            )
        words = text.split()
        if len(words) == 1 and len(text) < 4096:
            path = pathlib.Path(words[0]).expanduser()
            suffix = path.suffix.lower()
            is_image = suffix in Image.registered_extensions()
            if (is_image or suffix in _VIDEO_EXTENSIONS) and path.is_file():
                how = (
                    f"{{'image': {words[0]!r}}} or pathlib.Path({words[0]!r})"
                    if is_image
                    else f"minicpmv_jax.video.load_video({words[0]!r}, version).message(question)"
                )
                kind = "an image" if is_image else "a video"
                raise MessageError(
                    f"{where}: the text {words[0]!r} names {kind} file, which would be sent as "
                    f"text; to send the file itself pass {how}"
                )
        return text

    def _template_variables(self, enable_thinking: bool) -> dict[str, Any]:
        tok = self.tokenizer
        variables = {
            "bos_token": tok.bos_token or "",
            "eos_token": tok.eos_token or "",
            "unk_token": tok.unk_token or "",
            "pad_token": tok.pad_token or "",
        }
        if "enable_thinking" in self.chat_template:
            # 4.5 chat() always passes it (default False -> "<think>\n\n</think>\n\n" prefill).
            variables["enable_thinking"] = bool(enable_thinking)
        elif enable_thinking:
            raise MessageError(
                f"enable_thinking=True is not supported by MiniCPM-V {self.version}'s chat template"
            )
        return variables

    def apply_chat_template(
        self,
        msgs: Any,
        *,
        enable_thinking: bool = False,
        system_prompt: str | None = None,
    ) -> tuple[str, list[Image.Image]]:
        """Rendered prompt (images as IMAGE_MARKER) and the loaded RGB images, in order."""
        messages, images = self._flatten_messages(msgs, system_prompt)
        prompt = render_chat_template(
            self.chat_template, messages, **self._template_variables(enable_thinking)
        )
        n_markers = prompt.count(IMAGE_MARKER)
        if n_markers != len(images):
            more = (
                "images than placeholders"
                if len(images) > n_markers
                else "placeholders than images"
            )
            raise MessageError(
                f"more {more}: {len(images)} image(s) but {n_markers} {IMAGE_MARKER!r} marker(s) "
                "in the rendered prompt (literal markers in text, or images the template dropped)"
            )
        return prompt, images

    # -- placeholders ------------------------------------------------------------------------

    def image_placeholder(
        self, image_index: int, grid: tuple[int, int] | None, use_image_id: bool
    ) -> str:
        """Text that replaces one IMAGE_MARKER (spec §6)."""
        t, unk = self.tokens, self.tokens["unk"] * self.query_num
        if self.spec.placeholder == "image_grid":
            # 2.5: slices are <image>-wrapped and the whole grid sits in ONE <slice>...</slice>.
            text = t["im_start"] + unk + t["im_end"]
            if grid is not None:
                cols, rows = grid
                row = (t["im_start"] + unk + t["im_end"]) * cols
                text += t["slice_start"] + "\n".join([row] * rows) + t["slice_end"]
            return text
        text = ""
        if use_image_id:
            text = f"{t['im_id_start']}{image_index}{t['im_id_end']}"
        text += t["im_start"] + unk + t["im_end"]
        if grid is not None:
            cols, rows = grid
            row = (t["slice_start"] + unk + t["slice_end"]) * cols
            text += "\n".join([row] * rows)
        return text

    # -- temporal groups (4.5 video) ---------------------------------------------------------

    def _temporal_groups(self, temporal_ids: Any, n_images: int) -> list[list[int]]:
        if temporal_ids is None:
            return [[-1]] * n_images
        if not self.spec.temporal:
            raise MessageError(
                f"temporal_ids are only supported by MiniCPM-V 4.5, not {self.version}"
            )
        if isinstance(temporal_ids, (str, bytes)) or not isinstance(
            temporal_ids, (Sequence, np.ndarray)
        ):
            raise MessageError("temporal_ids must be a list of groups (lists of int time ids)")
        groups = []
        for g, group in enumerate(temporal_ids):
            arr = np.asarray(group)
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise MessageError(
                    f"temporal_ids group {g} must be a non-empty list of ints, got {group!r}"
                )
            if (arr < -1).any():
                raise MessageError(f"temporal_ids group {g}: ids must be >= 0 (or -1 for an image)")
            groups.append([int(x) for x in arr])
        total = sum(len(g) for g in groups)
        if total != n_images:
            raise MessageError(
                f"temporal_ids cover {total} frame(s) but the conversation has {n_images} image(s); "
                "every image needs a group entry (a still image is the group [-1])"
            )
        return groups

    # -- main entry --------------------------------------------------------------------------

    def __call__(
        self,
        msgs: Any,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        enable_thinking: bool = False,
        system_prompt: str | None = None,
        temporal_ids: Any = None,
        patch_bucket: int | None = None,
        max_inp_length: int | None = None,
    ) -> ProcessorOutput:
        """Process one conversation (official ``chat()`` message format).

        Args:
          msgs: list of ``{"role": "system"|"user"|"assistant", "content": str | list}``; list
            items are strings, PIL images, image paths (``pathlib.Path``) or encoded bytes, or
            ``{"text": s}`` / ``{"image": x}`` dicts.
          max_slice_nums: slices per image cap (default: preprocessor_config's, usually 9).
          use_image_id: prefix ``<image_id>k</image_id>`` (2.6/4.5; default from the config;
            2.5 has no image ids and ignores it).
          enable_thinking: 4.5 generation prefill ``<think>\\n`` instead of an empty think block.
          system_prompt: prepended as a system message (as chat(system_prompt=...)).
          temporal_ids: 4.5 only: groups of frame time ids covering every image in order (a still
            image is ``[-1]``); frames of a group share one placeholder and resampler output.
          patch_bucket: force the padded patch count P (default: smallest of ``patch_buckets``).
          max_inp_length: truncate the ids to this length (default: chat()'s, per version).

        Returns:
          ``ProcessorOutput`` (see its docstring for keys and shapes).
        """
        max_slice_nums = self._check_max_slice_nums(
            self.max_slice_nums if max_slice_nums is None else max_slice_nums
        )
        use_image_id = self.use_image_id if use_image_id is None else bool(use_image_id)
        max_inp_length = self.max_inp_length if max_inp_length is None else int(max_inp_length)
        if max_inp_length < 1:
            raise MessageError(f"max_inp_length must be >= 1, got {max_inp_length}")
        prompt, images = self.apply_chat_template(
            msgs, enable_thinking=enable_thinking, system_prompt=system_prompt
        )
        groups = self._temporal_groups(temporal_ids, len(images))

        sliced: list[SlicedImage] = [
            slice_image(img, max_slice_nums, self.scale_resolution, self.patch_size)
            for img in images
        ]
        pieces: list[np.ndarray] = []
        slice_tids: list[int] = []
        group_sizes: list[int] = []
        skip: set[int] = set()
        first = 0
        for g, group in enumerate(groups):
            members = sliced[first : first + len(group)]
            n_pieces = len(members[0].pieces)
            if any(len(m.pieces) != n_pieces for m in members):
                raise MessageError(
                    f"temporal_ids group {g}: its frames slice into different numbers of pieces "
                    "(frames of one group need the same size; use max_slice_nums=1 for video)"
                )
            # 4.5: the s-th slice of every frame of the group forms one resampler group.
            for s in range(n_pieces):
                for f, member in enumerate(members):
                    pieces.append(member.pieces[s])
                    slice_tids.append(group[f])
                group_sizes.append(len(group))
            skip.update(range(first + 1, first + len(group)))
            first += len(group)

        # Placeholder expansion. 4.5 quirk: frames 2.. of a temporal group get no placeholder and
        # the text chunk before their marker is .strip()-ped (the "\n" chat() joined them with).
        chunks = prompt.split(IMAGE_MARKER)
        text = []
        for i, chunk in enumerate(chunks[:-1]):
            if i in skip:
                text.append(chunk.strip())
            else:
                text.append(chunk)
                text.append(self.image_placeholder(i, sliced[i].grid, use_image_id))
        text.append(chunks[-1])
        expanded = "".join(text)

        # Default add_special_tokens: Qwen adds nothing; 2.5's Llama-3 post-processor prepends
        # <|begin_of_text|> although the template already starts with it (official double BOS).
        input_ids = np.asarray(self.tokenizer.encode(expanded), dtype=np.int64)
        image_bound = self._image_bound(input_ids, len(group_sizes), max_inp_length)
        if len(input_ids) > max_inp_length:
            logger.warning(
                "prompt of %d tokens truncated to max_inp_length=%d (as the official processor)",
                len(input_ids),
                max_inp_length,
            )
            input_ids = input_ids[:max_inp_length]

        return self._assemble(
            input_ids, image_bound, pieces, slice_tids, group_sizes, images, expanded, patch_bucket
        )

    def _image_bound(self, input_ids: np.ndarray, n_groups: int, max_inp_length: int) -> np.ndarray:
        """[start, end) rows as the official ``_convert`` computes them (after truncation)."""
        ids = input_ids[:max_inp_length]
        starts = np.flatnonzero(np.isin(ids, self._bound_start)) + 1
        ends = np.flatnonzero(np.isin(ids, self._bound_end))
        if len(input_ids) > max_inp_length and (len(starts) < n_groups or len(ends) < n_groups):
            raise PromptTooLongError(
                f"the prompt has {len(input_ids)} tokens; truncating it to max_inp_length="
                f"{max_inp_length} would cut image placeholders (the official code would misalign "
                "or crash): use fewer / smaller images (max_slice_nums) or raise max_inp_length"
            )
        if (
            len(starts) != n_groups
            or len(ends) != n_groups
            or np.any(ends - starts != self.query_num)
        ):
            raise MessageError(
                "the prompt text contains image/slice marker tokens "
                f"({', '.join(self.tokens[k] for k in ('im_start', 'im_end', 'slice_start', 'slice_end'))}); "
                "pass images as content items instead of writing their tokens"
            )
        return np.stack([starts, ends], axis=1).astype(np.int64).reshape(-1, 2)

    def _assemble(
        self,
        input_ids: np.ndarray,
        image_bound: np.ndarray,
        pieces: list[np.ndarray],
        slice_tids: list[int],
        group_sizes: list[int],
        images: list[Image.Image],
        expanded: str,
        patch_bucket: int | None,
    ) -> ProcessorOutput:
        p = self.patch_size
        tgt_sizes = np.array(
            [(x.shape[0] // p, x.shape[1] // p) for x in pieces], dtype=np.int64
        ).reshape(-1, 2)
        lengths = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        max_len = int(lengths.max()) if len(pieces) else 0
        if patch_bucket is None:
            num_patches = patch_bucket_size(max_len, self.patch_buckets) if pieces else 0
        else:
            num_patches = int(patch_bucket)
            if num_patches < max_len:
                raise MessageError(
                    f"patch_bucket={num_patches} < largest slice ({max_len} patches)"
                )
        # room for twice the slices: any slice bucket (<= 2x) pads in place (batching.pad_to)
        pixel_patches = aligned_zeros(
            (len(pieces), num_patches, 3 * p * p), np.float32, capacity=2 * len(pieces)
        )
        for i, piece in enumerate(pieces):
            patchify(piece, p, out=pixel_patches[i])
        if self.spec.mask_id0:
            # Official quirk (2.6/4.5): mask = input_ids != 0 also hides a genuine id-0 token.
            attention_mask = input_ids != self.pad_id
        else:
            attention_mask = np.ones(input_ids.shape, dtype=bool)  # 2.5 passes no mask
        return ProcessorOutput(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_bound=image_bound,
            tgt_sizes=tgt_sizes,
            image_sizes=np.array([img.size for img in images], dtype=np.int64).reshape(-1, 2),
            pixel_values=PixelStrips(pixel_patches, tgt_sizes, p),
            pixel_patches=pixel_patches,
            patch_valid=np.arange(num_patches)[None, :] < lengths[:, None],
            vision_mask=vision_mask(tgt_sizes, num_patches, self.version),
            position_ids=vision_position_ids(
                tgt_sizes, num_patches, self.version, self.num_patches_per_side
            ),
            temporal_ids=np.array(slice_tids, dtype=np.int64),
            group_sizes=np.array(group_sizes, dtype=np.int64),
            prompt=expanded,
            version=self.version,
        )

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Token ids -> text (special tokens kept by default, as chat() decodes)."""
        return self.tokenizer.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens
        )

    def __repr__(self) -> str:
        return (
            f"MiniCPMVProcessor(version={self.version!r}, query_num={self.query_num}, "
            f"max_slice_nums={self.max_slice_nums}, use_image_id={self.use_image_id}, "
            f"vocab={len(self.tokenizer)})"
        )
