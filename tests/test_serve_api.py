"""OpenAI chat-completions parsing (``serve.api``): bodies -> ``serve.Request``, every refusal a
4xx naming the field. No model, no server: the media are decoded against the source files."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import threading

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from minicpmv_jax.serve.api import (
    ApiError,
    ChatParser,
    Limits,
    Media,
    chunk_body,
    completion_body,
    parse_json,
    sse,
)
from minicpmv_jax.serve.types import Finished

IMAGE = FIXTURES / "minicpm-v-2_6" / "cases" / "single_448x448" / "image_0.png"


def data_url(path=IMAGE, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def png_url(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def parser(version="2.6", media=None, **limits) -> ChatParser:
    return ChatParser("tiny", version, Limits(**limits), media or Media())


def user(*parts) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": list(parts)}]}


def text(s: str) -> dict:
    return {"type": "text", "text": s}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def refused(body, status=400, match="", p=None):
    p = p or parser()
    with pytest.raises(ApiError) as e:
        call = p.parse(body)
        p.load_media(call)
    assert e.value.status == status, e.value.message
    assert match in e.value.message, e.value.message
    return e.value


def test_text_request_fields():
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
            {"role": "user", "content": [text("What is "), text("this?")]},
        ],
        "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": -1,
        "repetition_penalty": 1.1, "seed": 3, "stop": "\n", "stop_token_ids": [5],
        "n": 1, "max_slice_nums": 2, "use_image_id": False,
        "chat_template_kwargs": {"enable_thinking": True}, "user": "someone", "unknown": [1],
    }  # fmt: skip
    call = parser().parse(body)
    r = call.request
    assert r.messages == [
        {"role": "user", "content": ["Hi"]},
        {"role": "assistant", "content": ["Hello."]},
        {"role": "user", "content": ["What is ", "this?"]},
    ]
    assert r.system_prompt == "Be brief."
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k) == (7, 0.0, 0.5, 0)
    assert (r.repetition_penalty, r.seed, r.stop, r.stop_token_ids) == (1.1, 3, ("\n",), (5,))
    assert (r.max_slice_nums, r.use_image_id, r.enable_thinking) == (2, False, True)
    assert r.request_id.startswith("chatcmpl-") and not call.stream and not call.media
    assert parser().load_media(call) is r


def test_defaults():
    r = parser(max_tokens=100).parse({"messages": [{"role": "user", "content": "x"}]}).request
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed, r.stop) == (
        100, 1.0, 1.0, 0, None, ()
    )  # fmt: skip
    assert r.system_prompt is None and r.enable_thinking is False
    # newer clients send max_completion_tokens; nulls are defaults
    body = {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9,
            "temperature": None, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    call = parser().parse(body)
    assert call.request.max_tokens == 9 and call.stream and call.include_usage


def test_data_url_images_in_place():
    call = parser().parse(user(text("a"), image(data_url()), text("b"), image(png_url(30, 20))))
    assert [m.kind for m in call.media] == ["image", "image"]
    r = parser().load_media(call)
    a, img, b, small = r.messages[0]["content"]
    assert (a, b) == ("a", "b") and small.size == (30, 20)
    with Image.open(IMAGE) as want:
        np.testing.assert_array_equal(np.asarray(img), np.asarray(want.convert("RGB")))
    assert r.temporal_ids is None


BAD_FIELDS = [
    ({"messages": "hi"}, "'messages' must be a non-empty array"),
    ({"messages": []}, "'messages' must be a non-empty array"),
    ({"messages": None}, "'messages' is required"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role 'tool' is not supported"),
    ({"messages": [{"role": "user", "content": 5}]}, "'messages[0].content' must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "'audio' is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
     "'messages[0].content[0].text' must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "'messages[0].content[0].image_url' must be a URL string"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "last message must be a user"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}]},
     "only accepted as the first message"),
    ({"messages": [{"role": "assistant", "content": [image("data:,")]},
                   {"role": "user", "content": "x"}]}, "only accepted in user messages"),
    ({"max_tokens": "5"}, "'max_tokens' must be an integer, got \"5\""),
    ({"max_tokens": 0}, "'max_tokens' must be between 1 and 2048, got 0"),
    ({"max_tokens": 4096}, "'max_tokens' must be between 1 and 2048, got 4096"),
    ({"max_tokens": True}, "'max_tokens' must be an integer"),
    ({"temperature": "hot"}, "'temperature' must be a number"),
    ({"temperature": -1}, "'temperature' must be >= 0"),
    ({"top_p": 0}, "'top_p' must be in (0, 1]"),
    ({"top_k": 1.5}, "'top_k' must be an integer"),
    ({"repetition_penalty": 0}, "'repetition_penalty' must be > 0"),
    ({"seed": "x"}, "'seed' must be an integer"),
    ({"stop": 3}, "'stop' must be a non-empty string or a list"),
    ({"stop": [""]}, "'stop' must be a non-empty string"),
    ({"stop": list("abcdefghij")}, "'stop' has 10 strings, more than 8"),
    ({"stop_token_ids": [-1]}, "'stop_token_ids' must be a list of non-negative integers"),
    ({"n": 2}, "'n' must be 1"),
    ({"stream": "yes"}, "'stream' must be true or false"),
    ({"stream_options": {"include_usage": 1}}, "'stream_options.include_usage' must be true"),
    ({"max_slice_nums": 0}, "'max_slice_nums' must be >= 1"),
    ({"use_image_id": "no"}, "'use_image_id' must be true or false"),
    ({"chat_template_kwargs": {"enable_thinking": "y"}},
     "'chat_template_kwargs.enable_thinking' must be true or false"),
    ({"tools": [{"type": "function"}]}, "tool calling) is not supported"),
    ({"logprobs": True}, "'logprobs' are not supported"),
    ({"presence_penalty": 0.5}, "'presence_penalty' is not supported"),
    ({"response_format": {"type": "json_object"}}, "'response_format' other than"),
    ({"model": 5}, "'model' must be a string"),
]  # fmt: skip


@pytest.mark.parametrize("fields,match", BAD_FIELDS, ids=[m[:40] for _, m in BAD_FIELDS])
def test_bad_fields_name_the_field(fields, match):
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    refused(body, 400, match)


def test_unknown_model_is_404():
    e = refused({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "gpt-4")
    assert e.body()["error"]["type"] == "not_found_error" and "'tiny'" in e.message


def test_parse_json():
    assert parse_json(b'{"a": 1}') == {"a": 1}
    for raw, match in ((b"{", "not valid JSON"), (b"[1]", "must be a JSON object, got an array"),
                       (b'{"a": "\xff"}', "not UTF-8"), (b"", "not valid JSON")):  # fmt: skip
        with pytest.raises(ApiError, match=match) as e:
            parse_json(raw)
        assert e.value.status == 400


def test_bad_images():
    refused(user(image("data:image/png;base64,!!!!")), 400, "not valid base64")
    refused(user(image("data:image/png,abc")), 400, "data:<mime type>;base64")
    junk = "data:image/png;base64," + base64.b64encode(b"not an image" * 10).decode()
    e = refused(user(image(junk)), 400, "messages[0].content[0].image_url.url")
    assert e.param == "messages[0].content[0].image_url.url"
    refused(user(image(png_url(200, 100))), 400, "above the limit of 10000",
            parser(max_image_pixels=10_000))  # fmt: skip
    refused(user(image("ftp://host/x.png")), 400, "scheme 'ftp' is not supported")


def test_too_many_images_refused_before_decoding():
    """The count is checked in the first pass: the (undecodable) images are never read."""
    body = user(*[image("data:image/png;base64,AAAA")] * 3)
    e = refused(body, 400, "3 images, more than the limit of 2", parser(max_images=2))
    assert "--max-images" in e.message
    with pytest.raises(ApiError, match="3 images"):
        parser(max_images=2).parse(body)


def test_local_files_only_under_the_allowed_root(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cat.png").write_bytes(IMAGE.read_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes(IMAGE.read_bytes())
    os.symlink(outside, root / "link.png")
    refused(user(image("file:///etc/passwd")), 400, "local files are refused")
    refused(user(image(str(outside))), 400, "--allow-local-files")
    p = parser(media=Media(local_root=root))
    for url in ("sub/cat.png", f"file://{root}/sub/cat.png", str(root / "sub" / "cat.png"),
                "sub/../sub/cat.png"):  # fmt: skip
        r = p.load_media(p.parse(user(image(url))))
        assert r.messages[0]["content"][0].size == (448, 448), url
    for url in ("../secret.png", "sub/../../secret.png", str(outside), f"file://{outside}",
                "link.png", "file:///etc/passwd"):  # fmt: skip
        refused(user(image(url)), 400, "outside the allowed folder", p)
    refused(user(image("sub/missing.png")), 400, "cannot read 'sub/missing.png'", p)
    with pytest.raises(ValueError, match="not a directory"):
        Media(local_root=tmp_path / "nope")


def test_remote_urls_refused_unless_allowed(tmp_path):
    (tmp_path / "cat.png").write_bytes(IMAGE.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
        refused(user(image(url)), 400, "remote URLs are refused; start the server with "
                "--allow-remote-urls")  # fmt: skip
        p = parser(media=Media(allow_remote_urls=True, remote_timeout_s=5))
        assert p.load_media(p.parse(user(image(url)))).messages[0]["content"][0].size == (448, 448)
        refused(user(image(url.replace("cat", "dog"))), 400, "cannot fetch", p)
        small = parser(media=Media(allow_remote_urls=True), max_body_bytes=1000)
        refused(user(image(url)), 400, "larger than 1000 bytes", small)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """48 frames at 30 fps, 64x48, frame i grey level 5 i (lossless PNG codec in AVI)."""
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        for i in range(48):
            frame = np.full((48, 64, 3), 5 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video(path) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(path, "video/x-msvideo")}}


def test_video_26_frames_and_recipe(clip):
    from minicpmv_jax.video import load_video

    want = load_video(clip, "2.6")
    r = parser().load_media(parser().parse(user(video(clip), text("What happens?"))))
    content = r.messages[0]["content"]
    assert len(content) == len(want.frames) + 1 and content[-1] == "What happens?"
    for got, frame in zip(content, want.frames):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(frame))
    assert (r.use_image_id, r.max_slice_nums, r.temporal_ids) == (False, 2, None)
    # the client's own processor settings win over the recipe's
    body = {**user(video(clip), text("?")), "max_slice_nums": 1, "use_image_id": True}
    r = parser().load_media(parser().parse(body))
    assert (r.use_image_id, r.max_slice_nums) == (True, 1)


def test_video_45_temporal_ids_cover_still_images(clip):
    from minicpmv_jax.video import load_video

    want = load_video(clip, "4.5")
    p = parser("4.5")
    body = user(image(png_url(20, 20)), video(clip), image(png_url(30, 30)), text("?"))
    r = p.load_media(p.parse(body))
    content = r.messages[0]["content"]
    assert [c.size for c in content[:-1]] == [(20, 20)] + [(64, 48)] * len(want.frames) + [(30, 30)]
    assert r.temporal_ids == ((-1,), *map(tuple, want.temporal_ids), (-1,))
    assert (r.use_image_id, r.max_slice_nums) == (False, 1)


def test_video_refusals(clip, tmp_path):
    refused(user(video(clip), text("?")), 400, "supported by MiniCPM-V 2.6 and 4.5, not 2.5",
            parser("2.5"))  # fmt: skip
    refused(user(video(clip), video(clip)), 400, "2 videos; one per request")
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"no video here" * 20)
    refused(user(video(bad)), 400, "messages[0].content[0].video_url.url")
    refused(user(video(clip)), 400, "above the limit of 1000 pixels",
            parser(max_image_pixels=1000))  # fmt: skip


def test_limits_are_checked():
    with pytest.raises(ValueError, match="Limits.max_images must be a positive integer"):
        Limits(max_images=0)


def test_response_bodies():
    call = parser().parse({"messages": [{"role": "user", "content": "x"}], "stream": True})
    fin = Finished("length", "abc", 12, 3)
    body = completion_body(call, "tiny", fin)
    assert body["object"] == "chat.completion" and body["id"] == call.id
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "abc"},
                                "logprobs": None, "finish_reason": "length"}]  # fmt: skip
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    chunk = chunk_body(call, "tiny", {"content": "é"})
    assert chunk["object"] == "chat.completion.chunk" and "usage" not in chunk
    assert chunk["choices"][0] == {"index": 0, "delta": {"content": "é"}, "logprobs": None,
                                   "finish_reason": None}  # fmt: skip
    assert sse(chunk).startswith(b"data: {") and sse(chunk).endswith(b"}\n\n")
    assert json.loads(sse(chunk)[6:]) == chunk and sse("[DONE]") == b"data: [DONE]\n\n"
    assert chunk_body(call, "tiny", None, usage_={"x": 1})["choices"] == []
