"""OpenAI chat-completions requests -> ``serve.Request``, and the response objects back.

Parsing is in two passes so that a bad request fails before anything expensive runs: ``parse``
checks every field's type and range and counts the media (no decoding), then ``load_media``
decodes the images / samples the video (on the caller's thread: the server runs it in a worker
thread). Every refusal is an ``ApiError`` carrying the HTTP status and a message that names the
field, e.g. ``messages[1].content[0].image_url.url``.

Accepted (the OpenAI chat-completions body, as vLLM / SGLang accept it for MiniCPM-V):

* ``messages``: roles ``system`` (first message only, text), ``user``, ``assistant`` (text);
  ``content`` a string or a list of parts ``{"type": "text", "text"}``, ``{"type": "image_url",
  "image_url": {"url"}}``, ``{"type": "video_url", "video_url": {"url"}}`` (2.6 / 4.5). URLs are
  ``data:<mime>;base64,...``; ``file://`` URLs / paths only under ``Media.local_root``; ``http(s)``
  only with ``Media.allow_remote_urls``.
* ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``,
  ``top_k``, ``repetition_penalty``, ``seed``, ``stop`` (a string or a list), ``stop_token_ids``,
  ``n`` (1 only), ``stream``, ``stream_options.include_usage``, and the MiniCPM-V options
  ``max_slice_nums``, ``use_image_id``, ``enable_thinking`` (also as
  ``chat_template_kwargs.enable_thinking``).
* Refused with a clear message: ``tools``, ``logprobs``, non-zero presence / frequency
  penalties, a ``response_format`` other than text. Other unknown fields are ignored.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import os
import pathlib
import re
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from typing import Any

from minicpmv_jax.errors import MiniCPMVError
from minicpmv_jax.serve.types import Finished, Request

__all__ = [
    "ApiError",
    "ChatCall",
    "ChatParser",
    "Limits",
    "Media",
    "chunk_body",
    "completion_body",
    "error_body",
    "parse_json",
    "sse",
]


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.status)


_ERROR_TYPES = {
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


def error_body(message: str, type: str, param: str | None = None, code: int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may ask for (the server's ``--max-*`` flags)."""

    max_body_bytes: int = 32 * 2**20  # the whole JSON body, base64 media included
    max_image_pixels: int = 4096 * 4096  # per decoded image or video frame (header check)
    max_images: int = 8  # images per request (video frames are counted by max_video_frames)
    max_tokens: int = 2048  # the largest max_tokens a request may ask for (also the default)
    max_video_frames: int = 64  # frames (2.6) / frame groups (4.5) sampled from a video
    max_stop: int = 8  # stop strings per request

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Limits.{f.name} must be a positive integer, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Media:
    """Where media may come from besides ``data:`` URLs (``--allow-local-files``,
    ``--allow-remote-urls``)."""

    local_root: pathlib.Path | None = None
    allow_remote_urls: bool = False
    remote_timeout_s: float = 10.0

    def __post_init__(self):
        if self.local_root is not None:
            root = pathlib.Path(self.local_root)
            if not root.is_dir():
                raise ValueError(f"--allow-local-files {root}: not a directory")
            object.__setattr__(self, "local_root", root.resolve())


@dataclasses.dataclass
class _MediaRef:
    """One image / video part, located but not yet decoded."""

    kind: str  # "image" | "video"
    url: str
    where: str  # the field's path, for messages
    message: int  # index in the parsed message list
    position: int  # index in that message's content list


@dataclasses.dataclass
class ChatCall:
    """A validated chat-completions request: ``request`` is ready for ``Engine.submit`` once
    ``ChatParser.load_media`` has replaced the media placeholders."""

    request: Request
    stream: bool
    include_usage: bool
    created: int
    media: list[_MediaRef] = dataclasses.field(default_factory=list)

    @property
    def id(self) -> str:
        return self.request.request_id


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 naming what is wrong with it."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 text: {e}") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_json_type(body)}")
    return body


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _bad(field: str, expected: str, value: Any) -> ApiError:
    shown = json.dumps(value)[:80] if not isinstance(value, (dict, list)) else _json_type(value)
    return ApiError(400, f"'{field}' must be {expected}, got {shown}", param=field)


def _int(body: dict, field: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(field)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        return _raise(_bad(field, "an integer", v))
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(400, f"'{field}' must be {rng}, got {v}", param=field)
    return v


def _float(body: dict, field: str, ok, expected: str) -> float | None:
    v = body.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return _raise(_bad(field, "a number", v))
    if not ok(v):
        raise ApiError(400, f"'{field}' must be {expected}, got {v}", param=field)
    return float(v)


def _bool(body: dict, field: str, where: str | None = None) -> bool | None:
    v = body.get(field)
    if v is None or isinstance(v, bool):
        return v
    return _raise(_bad(where or field, "true or false", v))


def _raise(e: Exception):
    raise e


_DATA_URL = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)", re.DOTALL
)


class ChatParser:
    """Turns chat-completions bodies into engine ``Request`` s for one served model.

    Args:
      model_name: the id clients send as ``model`` (``/v1/models`` lists it).
      version: the checkpoint's MiniCPM-V version ("2.6", "4.5", ...): video needs 2.6 / 4.5.
      limits, media: see ``Limits`` and ``Media``.
    """

    def __init__(self, model_name: str, version: str, limits: Limits, media: Media):
        self.model_name = model_name
        self.version = str(version)
        self.limits = limits
        self.media = media

    # -- pass 1: fields ----------------------------------------------------------------------

    def parse(self, body: dict) -> ChatCall:
        """Check every field of a decoded JSON body (no media is read). Raises ``ApiError``."""
        lim = self.limits
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _bad("model", "a string", model)
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {self.model_name!r}",
                param="model",
                type="not_found_error",
            )
        self._refuse_unsupported(body)
        n = _int(body, "n", 1)
        if n not in (None, 1):
            raise ApiError(400, f"'n' must be 1 (one answer per request), got {n}", param="n")
        max_tokens = _int(body, "max_completion_tokens", 1, lim.max_tokens)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", 1, lim.max_tokens)
        temperature = _float(body, "temperature", lambda v: v >= 0, ">= 0 (0 = greedy)")
        top_p = _float(body, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        top_k = _int(body, "top_k", -1)
        rep = _float(body, "repetition_penalty", lambda v: v > 0, "> 0")
        seed = _int(body, "seed", -(2**63), 2**63 - 1)
        stop = self._stop(body.get("stop"))
        stop_ids = body.get("stop_token_ids")
        if stop_ids is not None and (
            not isinstance(stop_ids, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stop_ids)
        ):
            raise _bad("stop_token_ids", "a list of non-negative integers", stop_ids)
        stream = _bool(body, "stream") or False
        include_usage = False
        opts = body.get("stream_options")
        if opts is not None:
            if not isinstance(opts, dict):
                raise _bad("stream_options", "an object", opts)
            include_usage = _bool(opts, "include_usage", "stream_options.include_usage") or False
        max_slice_nums = _int(body, "max_slice_nums", 1)
        use_image_id = _bool(body, "use_image_id")
        thinking = _bool(body, "enable_thinking")
        ctk = body.get("chat_template_kwargs")
        if ctk is not None:
            if not isinstance(ctk, dict):
                raise _bad("chat_template_kwargs", "an object", ctk)
            t = _bool(ctk, "enable_thinking", "chat_template_kwargs.enable_thinking")
            thinking = t if thinking is None else thinking
        messages, system_prompt, media = self._messages(body.get("messages"))

        kw: dict[str, Any] = {}
        for name, value in (
            ("temperature", temperature),
            ("top_p", top_p),
            ("repetition_penalty", rep),
        ):
            if value is not None:
                kw[name] = value
        if top_k is not None:
            kw["top_k"] = max(top_k, 0)  # -1 (vLLM) and 0 both mean no top-k filter
        request = Request(
            messages=messages,
            max_tokens=lim.max_tokens if max_tokens is None else max_tokens,
            seed=seed,
            stop=stop,
            stop_token_ids=tuple(stop_ids or ()),
            max_slice_nums=max_slice_nums,
            use_image_id=use_image_id,
            enable_thinking=bool(thinking),
            system_prompt=system_prompt,
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            **kw,
        )
        return ChatCall(request, stream, include_usage, int(time.time()), media)

    @staticmethod
    def _refuse_unsupported(body: dict) -> None:
        for field in ("tools", "functions"):
            if body.get(field):
                raise ApiError(400, f"'{field}' (tool calling) is not supported", param=field)
        for field in ("tool_choice", "function_call"):
            if body.get(field) not in (None, "none"):
                raise ApiError(400, f"'{field}' (tool calling) is not supported", param=field)
        if body.get("logprobs") or body.get("top_logprobs"):
            raise ApiError(400, "'logprobs' are not supported", param="logprobs")
        for field in ("presence_penalty", "frequency_penalty"):
            v = _float(body, field, lambda v: True, "")
            if v:
                raise ApiError(
                    400,
                    f"'{field}' is not supported (only 0); use 'repetition_penalty'",
                    param=field,
                )
        rf = body.get("response_format")
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise ApiError(
                400, "'response_format' other than {\"type\": \"text\"} is not supported",
                param="response_format",
            )  # fmt: skip
        if body.get("logit_bias"):
            raise ApiError(400, "'logit_bias' is not supported", param="logit_bias")

    def _stop(self, stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise _bad("stop", "a non-empty string or a list of non-empty strings", stop)
        if len(items) > self.limits.max_stop:
            raise ApiError(
                400, f"'stop' has {len(items)} strings, more than {self.limits.max_stop}",
                param="stop",
            )  # fmt: skip
        return tuple(items)

    def _messages(self, msgs: Any) -> tuple[list[dict], str | None, list[_MediaRef]]:
        if not isinstance(msgs, list) or not msgs:
            if msgs is None:
                raise ApiError(400, "'messages' is required", param="messages")
            raise _bad("messages", "a non-empty array of messages", msgs)
        system_prompt = None
        out: list[dict] = []
        media: list[_MediaRef] = []
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise _bad(where, "an object with 'role' and 'content'", m)
            role = m.get("role")
            if role not in ("system", "user", "assistant"):
                if not isinstance(role, str):
                    raise _bad(f"{where}.role", "'system', 'user' or 'assistant'", role)
                raise ApiError(
                    400,
                    f"{where}.role {role!r} is not supported; use 'system', 'user' or 'assistant'",
                    param=f"{where}.role",
                )
            parts = self._content(m.get("content"), f"{where}.content")
            if role != "user" and any(kind != "text" for kind, _, _ in parts):
                raise ApiError(
                    400, f"{where}: images and videos are only accepted in user messages",
                    param=f"{where}.content",
                )  # fmt: skip
            if role == "system":
                if i != 0:
                    raise ApiError(
                        400, f"{where}: a system message is only accepted as the first message",
                        param=f"{where}.role",
                    )  # fmt: skip
                system_prompt = "\n".join(v for _, v, _ in parts)
                continue
            content: list[Any] = []
            for kind, value, pwhere in parts:
                if kind == "text":
                    content.append(value)
                else:
                    media.append(_MediaRef(kind, value, pwhere, len(out), len(content)))
                    content.append(None)  # filled by load_media
            out.append({"role": role, "content": content})
        if not out or out[-1]["role"] != "user":
            raise ApiError(
                400, "the last message must be a user message (the question to answer)",
                param="messages",
            )  # fmt: skip
        images = sum(r.kind == "image" for r in media)
        videos = sum(r.kind == "video" for r in media)
        if images > self.limits.max_images:
            raise ApiError(
                400,
                f"the request has {images} images, more than the limit of "
                f"{self.limits.max_images} per request (--max-images)",
                param="messages",
            )
        if videos:
            from minicpmv_jax import versions

            if versions.spec(self.version).video is None:
                raise ApiError(
                    400, f"video input is supported by MiniCPM-V 2.6 and 4.5, not {self.version}",
                    param="messages",
                )  # fmt: skip
            if videos > 1:
                raise ApiError(400, f"the request has {videos} videos; one per request is supported",
                               param="messages")  # fmt: skip
        return out, system_prompt, media

    def _content(self, content: Any, where: str) -> list[tuple[str, str, str]]:
        """A message content -> [(kind, text or url, field path)]."""
        if isinstance(content, str):
            return [("text", content, where)]
        if not isinstance(content, list):
            raise _bad(where, "a string or an array of content parts", content)
        parts = []
        for j, part in enumerate(content):
            pw = f"{where}[{j}]"
            if isinstance(part, str):  # lenient: a bare string is a text part
                parts.append(("text", part, pw))
                continue
            if not isinstance(part, dict):
                raise _bad(pw, "a content part object", part)
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _bad(f"{pw}.text", "a string", text)
                parts.append(("text", text, pw))
            elif kind in ("image_url", "video_url"):
                ref = part.get(kind)
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    field = f"{pw}.{kind}.url" if isinstance(ref, dict) else f"{pw}.{kind}"
                    raise _bad(field, "a URL string (data:, file: or http(s):)", url)
                parts.append((kind.removesuffix("_url"), url, f"{pw}.{kind}.url"))
            else:
                raise ApiError(
                    400,
                    f"{pw}.type {kind!r} is not supported; use 'text', 'image_url' or 'video_url'",
                    param=f"{pw}.type",
                )
        return parts

    # -- pass 2: media -----------------------------------------------------------------------

    def load_media(self, call: ChatCall) -> Request:
        """Decode the images and sample the video of a parsed call; returns the finished
        ``Request``. Raises ``ApiError`` (400) naming the part that failed."""
        if not call.media:
            return call.request
        from minicpmv_jax.image import load_image

        req = call.request
        messages = [dict(m, content=list(m["content"])) for m in req.messages]
        kw: dict[str, Any] = {}
        groups: list[tuple[int, ...]] = []
        video_groups = None
        for ref in call.media:
            data = self._fetch(ref)
            if ref.kind == "image":
                try:
                    item = load_image(data, max_pixels=self.limits.max_image_pixels, what=ref.where)
                except MiniCPMVError as e:
                    raise ApiError(400, str(e), param=ref.where) from None
                messages[ref.message]["content"][ref.position] = item
                groups.append((-1,))
            else:
                frames, tids, vkw = self._video(data, ref)
                content = messages[ref.message]["content"]
                content[ref.position : ref.position + 1] = frames
                # later media of the same message shift by the frames inserted
                for other in call.media:
                    if other.message == ref.message and other.position > ref.position:
                        other.position += len(frames) - 1
                kw.update(vkw)
                if tids is not None:
                    video_groups = len(groups)
                    groups.extend(tuple(g) for g in tids)
                else:
                    groups.extend([(-1,)] * len(frames))
        if video_groups is not None:
            kw["temporal_ids"] = tuple(groups)
        if req.max_slice_nums is not None:
            kw.pop("max_slice_nums", None)  # the client's choice wins over the video recipe's
        if req.use_image_id is not None:
            kw.pop("use_image_id", None)
        return dataclasses.replace(req, messages=messages, **kw)

    def _video(self, data: bytes, ref: _MediaRef):
        from minicpmv_jax.video import load_video

        with tempfile.NamedTemporaryFile(suffix=".video") as f:
            f.write(data)
            f.flush()
            try:
                sample = load_video(
                    f.name, self.version, max_num_frames=self.limits.max_video_frames
                )
            except (MiniCPMVError, ImportError) as e:
                raise ApiError(400, f"{ref.where}: {e}", param=ref.where) from None
        px = self.limits.max_image_pixels
        for k, frame in enumerate(sample.frames):
            if frame.width * frame.height > px:
                raise ApiError(
                    400,
                    f"{ref.where}: frame {k} is {frame.width}x{frame.height}, above the limit of "
                    f"{px} pixels (--max-image-pixels)",
                    param=ref.where,
                )
        kw = {k: v for k, v in sample.processor_kwargs.items() if k != "temporal_ids"}
        return list(sample.frames), sample.temporal_ids, kw

    def _fetch(self, ref: _MediaRef) -> bytes:
        url, where = ref.url, ref.where
        if url.startswith("data:"):
            m = _DATA_URL.fullmatch(url)
            if m is None or ";base64" not in m.group("params"):
                raise ApiError(
                    400, f"{where}: a data URL must be data:<mime type>;base64,<data>", param=where
                )
            try:
                return base64.b64decode(re.sub(r"\s+", "", m.group("data")), validate=True)
            except (binascii.Error, ValueError) as e:
                raise ApiError(400, f"{where}: the data URL is not valid base64 ({e})",
                               param=where) from None  # fmt: skip
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return self._fetch_remote(url, where)
        if scheme == "file" or scheme == "" or (len(scheme) == 1 and os.name == "nt"):
            return self._read_local(url, where)
        raise ApiError(
            400, f"{where}: URL scheme {scheme!r} is not supported (use data:, file: or http(s):)",
            param=where,
        )  # fmt: skip

    def _read_local(self, url: str, where: str) -> bytes:
        root = self.media.local_root
        if root is None:
            raise ApiError(
                400,
                f"{where}: local files are refused; start the server with --allow-local-files "
                "DIR to serve files under DIR (or send the image as a data: URL)",
                param=where,
            )
        if url.startswith("file:"):
            parts = urllib.parse.urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise ApiError(400, f"{where}: file URLs must name a local path", param=where)
            path = pathlib.Path(urllib.parse.unquote(parts.path))
        else:
            path = pathlib.Path(url)
        target = (root / path).resolve()  # an absolute path replaces root; '..' and links resolve
        if not target.is_relative_to(root):
            raise ApiError(
                400, f"{where}: {str(path)!r} is outside the allowed folder (--allow-local-files)",
                param=where,
            )  # fmt: skip
        try:
            size = target.stat().st_size
            if size > self.limits.max_body_bytes:
                raise ApiError(400, f"{where}: the file is {size} bytes, above the limit of "
                               f"{self.limits.max_body_bytes}", param=where)  # fmt: skip
            return target.read_bytes()
        except OSError as e:
            raise ApiError(400, f"{where}: cannot read {str(path)!r} ({e.strerror})",
                           param=where) from None  # fmt: skip

    def _fetch_remote(self, url: str, where: str) -> bytes:
        if not self.media.allow_remote_urls:
            raise ApiError(
                400,
                f"{where}: remote URLs are refused; start the server with --allow-remote-urls "
                "(or send the image as a data: URL)",
                param=where,
            )
        cap = self.limits.max_body_bytes
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "minicpmv-jax"})
            with urllib.request.urlopen(req, timeout=self.media.remote_timeout_s) as r:
                data = r.read(cap + 1)
        except (OSError, ValueError) as e:
            raise ApiError(400, f"{where}: cannot fetch {url!r} ({e})", param=where) from None
        if len(data) > cap:
            raise ApiError(400, f"{where}: {url!r} is larger than {cap} bytes", param=where)
        return data


# -- responses --------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(call: ChatCall, model: str, fin: Finished) -> dict:
    """The ``chat.completion`` object of a finished request (reason "stop" or "length")."""
    return {
        "id": call.id,
        "object": "chat.completion",
        "created": call.created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": fin.text},
                "logprobs": None,
                "finish_reason": fin.reason,
            }
        ],
        "usage": usage(fin.prompt_tokens, fin.completion_tokens),
    }


def chunk_body(
    call: ChatCall,
    model: str,
    delta: dict | None,
    finish_reason: str | None = None,
    usage_: dict | None = None,
) -> dict:
    """One ``chat.completion.chunk``; ``delta=None`` is the usage-only chunk (no choices)."""
    body = {
        "id": call.id,
        "object": "chat.completion.chunk",
        "created": call.created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage_ is not None or call.include_usage:
        body["usage"] = usage_
    return body


def sse(obj: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
