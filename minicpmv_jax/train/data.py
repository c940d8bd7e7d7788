"""Fine-tuning data exactly as the official `finetune/dataset.py` builds it (numpy + PIL only).

A sample is the official JSON form::

    {"id": "0", "image": "a.png" | {"<image_00>": "a.png", ...} | {},
     "conversations": [{"role": "user", "content": "<image>\\nWhat is it?"},
                       {"role": "assistant", "content": "A cat."}, ...]}

`training_example` returns what the official `SupervisedDataset[i]` returns (input ids, labels
already shifted, position ids, image bounds, slice sizes, pixel strips) and `collate` what its
`data_collator` returns. The official quirks are reproduced and named where they happen:

* labels are shifted in the dataset (`labels[i]` is the target of position `i`), the token that
  closes a trained span is trained to predict eos / eot, and `labels[-1]` is always ignored;
* position ids are a plain `arange` per sample (no attention mask reaches the LLM in training);
* unsliced images get no `<image_id>` in training (inference numbers every image);
* placeholders of the dict form are substituted by `re.split` + `"\\n".join`, which puts a newline
  on each side of every `<image_XX>`.

Where the official dataset silently swaps a bad sample for a random other one (its bare `except`),
this module raises `DataError` naming the sample id and the field; `load_examples(...,
skip_bad_samples=True)` skips and counts such samples instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from minicpmv_jax.errors import DataError, ImageError
from minicpmv_jax.image import load_image, slice_image, strip_layout

IGNORE_INDEX = -100  # official label of untrained positions (torch CrossEntropyLoss default)
DEFAULT_MAX_LENGTH = 2048  # official model_max_length
_PLACEHOLDER = re.compile(r"(<image_\d+>)")  # official dict-form image keys
# Qwen3 (4.5) renders an empty thinking block in the last assistant turn; the official code skips
# these tokens in the trained span unless the answer holds its own <think>...</think>.
_EMPTY_THINK = "<think>\n\n</think>\n\n"
# 2.5: dataset.py's own llama3 template (the checkpoint's one always appends an assistant header).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
)


def _sample_id(sample: Any) -> str:
    return str(sample.get("id", "?")) if isinstance(sample, Mapping) else "?"


def llm_type(version: str) -> str:
    """The official `--llm_type` of a version: "llama3" for 2.5, "qwen" for 2.6 and 4.5."""
    return "llama3" if version == "2.5" else "qwen"


# ---------------------------------------------------------------------------------------------
# Validation and images
# ---------------------------------------------------------------------------------------------


def _check_conversations(sid: str, conversations: Any) -> list[dict[str, str]]:
    """Alternating user/assistant turns, user first, string contents (official asserts + more).

    The official code asserts two or more turns and a user first; 2.6/4.5 also reject any role but
    user/assistant, while 2.5 accepts a system turn after the first user turn. Here every version
    requires strict alternation (a system or repeated role would be trained or templated
    inconsistently across versions).
    """
    if not isinstance(conversations, Sequence) or isinstance(conversations, (str, bytes)):
        raise DataError(sid, "conversations", "must be a list of {'role', 'content'} turns")
    if len(conversations) < 2:
        raise DataError(
            sid,
            "conversations",
            f"needs a user turn and an assistant turn, got {len(conversations)} turn(s)",
        )
    out = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise DataError(sid, f"conversations[{i}]", "must be a dict with 'role' and 'content'")
        want = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != want:
            raise DataError(
                sid,
                f"conversations[{i}].role",
                f"expected {want!r} (turns alternate user/assistant, user first), "
                f"got {turn['role']!r}",
            )
        if not isinstance(turn["content"], str):
            raise DataError(sid, f"conversations[{i}].content", "must be a string")
        out.append({"role": turn["role"], "content": turn["content"]})
    return out


def _load_images(sid: str, image: Any, image_root: pathlib.Path) -> dict[str, Any]:
    """The official images_dict: a path -> {"<image>": img}; a dict -> {key: img}; {} -> none.
    (Besides paths, a value may be encoded image bytes or a PIL image.)"""
    if isinstance(image, (str, os.PathLike, bytes, bytearray, Image.Image)):
        image = {"<image>": image}
    if not isinstance(image, Mapping):
        raise DataError(
            sid, "image", f"must be a path or a dict of paths, got {type(image).__name__}"
        )
    out = {}
    for key, path in image.items():
        field = "image" if key == "<image>" and len(image) == 1 else f"image[{key!r}]"
        if isinstance(path, (bytes, bytearray, Image.Image)):  # decoded / encoded in memory
            src, what = path, field
        elif isinstance(path, (str, os.PathLike)):
            src, what = image_root / path, str(path)
        else:
            raise DataError(sid, field, f"must be a path, got {type(path).__name__}")
        try:
            out[key] = load_image(src, max_pixels=None, what=what)
        except ImageError as e:
            raise DataError(sid, field, str(e)) from None
    return out


# ---------------------------------------------------------------------------------------------
# Text: placeholders, template, trained spans
# ---------------------------------------------------------------------------------------------


def _placeholders(processor, images: dict[str, Any], version: str):
    """(placeholder text per image key, pieces in pixel order) as the official preprocess()."""
    texts, pieces, image_id = {}, [], 0
    for key, img in images.items():
        sliced = slice_image(
            img, processor.max_slice_nums, processor.scale_resolution, processor.patch_size
        )
        pieces += sliced.pieces
        # Quirk: only SLICED images get an <image_id> in training (and count towards the ids).
        numbered = sliced.grid is not None and version != "2.5"
        texts[key] = processor.image_placeholder(image_id, sliced.grid, numbered)
        image_id += numbered
    return texts, pieces


def _substitute(sid: str, turns: list[dict[str, str]], texts: dict[str, str]) -> None:
    """Put the placeholders into the turns in place, as the official preprocess() does."""
    if len(texts) == 1 and "<image>" in texts:
        first = turns[0]["content"]
        if "<image>" in first:
            turns[0]["content"] = first.replace("<image>", texts["<image>"])
        else:  # no placeholder: the image goes before the first user turn
            turns[0]["content"] = texts["<image>"] + "\n" + first
        return
    for i, turn in enumerate(turns):
        parts = _PLACEHOLDER.split(turn["content"])
        for j, part in enumerate(parts):
            if _PLACEHOLDER.fullmatch(part):
                if part not in texts:
                    raise DataError(
                        sid,
                        f"conversations[{i}].content",
                        f"placeholder {part} has no entry in 'image' (keys: {sorted(texts)})",
                    )
                parts[j] = texts[part]
        # Quirk: "\n".join of the re.split parts puts a newline on each side of a placeholder.
        turn["content"] = "\n".join(parts)


def _tokenize(processor, turns: list[dict[str, str]]) -> tuple[np.ndarray, str]:
    """Chat template (no generation prompt; 2.5: dataset.py's llama3 template), tokenised without
    special tokens as transformers' apply_chat_template(tokenize=True) does."""
    from minicpmv_jax.processor import _compile_template

    tok = processor.tokenizer
    variables = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}
    template = LLAMA3_TEMPLATE if processor.version == "2.5" else processor.chat_template
    text = _compile_template(template).render(
        messages=turns, add_generation_prompt=False, **variables
    )
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64), text


def _context(processor, ids: np.ndarray, turns: list[dict[str, str]], version: str) -> np.ndarray:
    """int8 [T]: 0 = trained token (assistant answers and their closing token), 1 = context."""
    tok = processor.tokenizer
    tid = tok.convert_tokens_to_ids
    context = np.ones_like(ids, dtype=np.int8)
    assistant = np.flatnonzero(ids == tid("assistant"))
    if version == "2.5":  # conversation_to_ids_llama3
        starts = np.flatnonzero(ids == tid("<|start_header_id|>"))
        ends = np.flatnonzero(ids == tid("<|end_header_id|>"))
        eots = np.flatnonzero(ids == tid("<|eot_id|>"))
        n = min(len(starts), len(ends))
        headers = set(((starts[:n] + ends[:n]) / 2).tolist())  # official midpoint test
        for a in assistant:
            if a in headers:
                st = a + 3  # assistant<|end_header_id|>\n\n
                close = eots[eots > st]
                if len(close):
                    context[st : close[0] + 1] = 0
        return context
    # conversation_to_ids_qwen2: from <|im_start|>assistant\n to the next <|im_end|> inclusive
    starts = set(np.flatnonzero(ids == tid("<|im_start|>")).tolist())
    ends = np.flatnonzero(ids == tid("<|im_end|>"))
    think = np.asarray(tok(_EMPTY_THINK, add_special_tokens=False)["input_ids"], np.int64)
    answers = [t["content"] for t in turns if t["role"] == "assistant"]
    thinking = any("<think>" in a for a in answers)
    for a in assistant:
        if a - 1 not in starts:
            continue
        st = a + 2  # skip "assistant" "\n"
        # 4.5: the template's empty <think>\n\n</think>\n\n is not trained (enable_thinking off)
        if not thinking and np.array_equal(ids[st : st + len(think)], think):
            st += len(think)
        close = ends[ends > st]
        if len(close):
            context[st : close[0] + 1] = 0
    return context


# ---------------------------------------------------------------------------------------------
# Public: one example, a batch, a file
# ---------------------------------------------------------------------------------------------


def training_example(
    model,
    sample: Mapping[str, Any],
    *,
    image_root: str | os.PathLike = ".",
    max_length: int = DEFAULT_MAX_LENGTH,
) -> dict[str, Any]:
    """One official `SupervisedDataset` item.

    Args:
      model: a `MiniCPMV` (its processor gives the tokenizer, template and slice settings) or a
        `MiniCPMVProcessor`.
      sample: `{"id", "image", "conversations"}` in the official format.
      image_root: folder the image paths are relative to.
      max_length: tokens beyond it are cut, as officially (the answer may be cut too).

    Returns:
      dict: `input_ids` int32 [T], `labels` int32 [T] (-100 ignored, already shifted),
      `position_ids` int64 [T], `attention_mask` bool [T], `image_bound` int64 [n, 2]
      (start, end exclusive), `tgt_sizes` int32 [n, 2], `pixel_values` list of n float32
      [3, 14, h*w*14] strips (each image's source, then its slices row by row), `id`.

    Raises:
      DataError: naming the sample id and field (missing/unreadable image, unknown placeholder,
        bad conversation, no answer token left within max_length, placeholders cut by max_length).
    """
    processor = getattr(model, "processor", model)
    version = processor.version
    sid = _sample_id(sample)
    if not isinstance(sample, Mapping):
        raise DataError(sid, "sample", f"must be a dict, got {type(sample).__name__}")
    if "image" not in sample:  # the official dataset reads sample["image"] unconditionally
        raise DataError(sid, "image", 'missing (use "image": {} for a text-only sample)')
    turns = _check_conversations(sid, sample.get("conversations"))
    images = _load_images(sid, sample["image"], pathlib.Path(image_root))
    texts, pieces = _placeholders(processor, images, version)
    _substitute(sid, turns, texts)
    ids, _ = _tokenize(processor, turns)
    context = _context(processor, ids, turns, version)
    if len(ids) > max_length:  # official truncation: ids and context cut alike
        ids, context = ids[:max_length], context[:max_length]
    if np.all(context):
        raise DataError(
            sid,
            "conversations",
            f"no assistant token to train on within max_length={max_length} "
            f"(the prompt has {len(ids)}+ tokens)",
        )
    labels = np.full(ids.shape, IGNORE_INDEX, np.int32)
    # tokenizer.eot_id (2.5) or tokenizer.eos_id: the target of each span's closing token
    closing = (
        processor._token_id("<|eot_id|>") if version == "2.5" else processor.tokenizer.eos_token_id
    )
    trained = context == 0
    labels[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
    # the first context token after a span: its predecessor (the closing token) predicts eos/eot
    labels[:-1] = np.where(~trained[1:] & trained[:-1], closing, labels[:-1])
    bound = _image_bound(processor, sid, ids, len(pieces), max_length)
    p = processor.patch_size
    return {
        "id": sid,
        "input_ids": ids.astype(np.int32),
        "labels": labels,
        "position_ids": np.arange(len(ids), dtype=np.int64),
        "attention_mask": np.ones(len(ids), bool),
        "image_bound": bound,
        "tgt_sizes": np.array(
            [(x.shape[0] // p, x.shape[1] // p) for x in pieces], np.int32
        ).reshape(-1, 2),
        "pixel_values": [strip_layout(x, p) for x in pieces],
    }


def _image_bound(processor, sid: str, ids: np.ndarray, n_pieces: int, max_length: int):
    """int64 [n, 2] from the token ids (official: start after <image>/<slice>, end at the close)."""
    starts = np.flatnonzero(np.isin(ids, processor._bound_start)) + 1
    ends = np.flatnonzero(np.isin(ids, processor._bound_end))
    if len(starts) != n_pieces or len(ends) != n_pieces:
        cut = len(ids) >= max_length
        raise DataError(
            sid,
            "conversations" if not cut else "max_length",
            f"{len(starts)} image placeholder(s) in the tokens for {n_pieces} image slice(s): "
            + (
                f"max_length={max_length} cuts image placeholders"
                if cut
                else "an image key is unused or used twice, or the text holds image tokens"
            ),
        )
    bound = np.stack([starts, ends], axis=1).astype(np.int64).reshape(-1, 2)
    if np.any(bound[:, 1] - bound[:, 0] != processor.query_num):
        raise DataError(sid, "conversations", "the text holds image / slice marker tokens")
    return bound


def collate(examples: Sequence[Mapping[str, Any]], max_length: int = DEFAULT_MAX_LENGTH) -> dict:
    """The official `data_collator`: cut at max_length, right-pad ids / positions / mask with 0
    and labels with -100; per-row lists of pixel_values, image_bound and tgt_sizes."""
    if not examples:
        raise ValueError("collate needs at least one example")
    t = min(max(len(e["input_ids"]) for e in examples), max_length)

    def pad(key, value, dtype):
        out = np.full((len(examples), t), value, dtype)
        for b, e in enumerate(examples):
            row = np.asarray(e[key])[:t]
            out[b, : len(row)] = row
        return out

    return {
        "input_ids": pad("input_ids", 0, np.int32),
        "position_ids": pad("position_ids", 0, np.int64),
        "labels": pad("labels", IGNORE_INDEX, np.int32),
        "attention_mask": pad("attention_mask", False, bool),
        "pixel_values": [list(e["pixel_values"]) for e in examples],
        "image_bound": [np.asarray(e["image_bound"], np.int64).reshape(-1, 2) for e in examples],
        "tgt_sizes": [np.asarray(e["tgt_sizes"], np.int32).reshape(-1, 2) for e in examples],
    }


def read_text(path: pathlib.Path) -> str:
    """A data file's UTF-8 text; a DataError naming the file when it cannot be read."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise DataError("-", str(path), f"cannot read the file ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError("-", str(path), f"not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_json_list(path: pathlib.Path, text: str, what: str) -> list:
    """The JSON list in ``text`` (of file ``path``); a DataError naming the file otherwise."""
    try:
        items = json.loads(text)
    except ValueError as e:
        raise DataError("-", str(path), f"not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise DataError("-", str(path), f"must hold a JSON list of {what}")
    return items


def read_samples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The samples of an official JSON file (a list of sample dicts), with clear errors."""
    path = pathlib.Path(path)
    return read_json_list(path, read_text(path), "samples")


def load_examples(
    model,
    samples: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    image_root: str | os.PathLike | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    skip_bad_samples: bool = False,
) -> tuple[list[dict[str, Any]], list[DataError]]:
    """Training examples of a file (image paths relative to its folder) or a list of samples.

    Returns (examples, skipped): with `skip_bad_samples` every bad sample's `DataError` is in
    `skipped` (count them in the metrics) instead of raised; nothing is altered silently.
    """
    if isinstance(samples, (str, os.PathLike)):
        image_root = image_root if image_root is not None else pathlib.Path(samples).parent
        samples = read_samples(samples)
    examples, skipped = [], []
    for sample in samples:
        try:
            examples.append(
                training_example(model, sample, image_root=image_root or ".", max_length=max_length)
            )
        except DataError as e:
            if not skip_bad_samples:
                raise
            skipped.append(e)
    return examples, skipped
