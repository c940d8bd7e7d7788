"""The HTTP front end (``serve.server``) over a stand-in engine (``serve_helpers.FakeEngine``,
the ``Engine`` contract without a model), on 127.0.0.1: routes, SSE framing, errors, 429,
disconnects, metrics and SIGTERM draining. The real engine on the tiny checkpoint is in
``test_serve_e2e.py``."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from serve_helpers import FakeEngine, free_port, serve_in_thread

from minicpmv_jax.serve.api import Limits
from minicpmv_jax.serve.server import ServerState, create_app

HERE = pathlib.Path(__file__).resolve().parent
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine(slots=2, max_queue=4, max_len=64, step_s=0.002)
    engine.start()
    limits = Limits(max_body_bytes=100_000, max_images=2, max_tokens=64)
    state = ServerState(engine, model_name="tiny", version="2.6", limits=limits)
    with serve_in_thread(create_app(state)) as url:
        yield url, engine, state


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], timeout=TIMEOUT) as c:
        yield c


def ask(text: str, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], **fields}


def sse_events(lines) -> list:
    """The data of each server-sent event; '[DONE]' stays a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return out


def test_completion(client):
    r = client.post("/v1/chat/completions", json=ask("one two three", temperature=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: one two three"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    r = client.post("/v1/chat/completions", json=ask("one two three", max_tokens=2))
    assert r.json()["choices"][0]["message"]["content"] == "echo: one"
    assert r.json()["choices"][0]["finish_reason"] == "length"
    r = client.post("/v1/chat/completions", json=ask("one two three", stop=[" two"]))
    assert r.json()["choices"][0]["message"]["content"] == "echo: one"


def test_stream(client):
    body = ask("a b c d", stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "echo: a b c d"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])


def test_errors_are_4xx_and_the_server_keeps_serving(client, server):
    png = "data:image/png;base64," + base64.b64encode(b"junk" * 10).decode()
    img = {"type": "image_url", "image_url": {"url": png}}
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps(ask("x", max_tokens="many")), 400, "'max_tokens' must be an integer"),
        (json.dumps({"messages": [{"role": "tool", "content": "x"}]}), 400, "'tool' is not"),
        (json.dumps({"messages": [{"role": "user", "content": [img] * 3}]}), 400, "3 images"),
        (json.dumps({"messages": [{"role": "user", "content": [img]}]}), 400,
         "messages[0].content[0].image_url.url"),
        (json.dumps(ask("word " * 80)), 400, "the cache holds 64"),  # the engine refuses it
        (json.dumps(ask("x", model="other")), 404, "serves 'tiny'"),
        (b"x" * 100_001, 413, "larger than the limit of 100000 bytes"),
    ]  # fmt: skip
    for raw, status, match in cases:
        r = client.post("/v1/chat/completions", content=raw,
                        headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == status, (match, r.text)
        err = r.json()["error"]
        assert match in err["message"], err
        ok = client.post("/v1/chat/completions", json=ask("still here"))
        assert ok.json()["choices"][0]["message"]["content"] == "echo: still here"
    # a body streamed without Content-Length is cut at the limit too
    r = client.post("/v1/chat/completions", content=iter([b"x" * 60_000] * 2))
    assert r.status_code == 413
    assert client.get("/v1/chat/completions").status_code == 405
    r = client.get("/nothing")
    assert r.status_code == 404 and "/nothing" in r.json()["error"]["message"]


def test_models_health(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["slots"] == 2


async def _many(url: str, bodies: list[dict]) -> list:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as c:

        async def one(body):
            if not body.get("stream"):
                r = await c.post("/v1/chat/completions", json=body)
                return r.status_code, r.headers.get("retry-after"), r.json()
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return r.status_code, r.headers.get("retry-after"), json.loads(await r.aread())
                events = sse_events([line async for line in r.aiter_lines()])
                text = "".join(e["choices"][0]["delta"].get("content", "")
                               for e in events[:-1] if e["choices"])  # fmt: skip
                return 200, None, {"stream_text": text, "id": events[0]["id"]}

        return await asyncio.wait_for(asyncio.gather(*(one(b) for b in bodies)), TIMEOUT)


def test_full_queue_answers_429_with_retry_after(server):
    """2 slots + 4 queued are accepted while the engine is paused; the next one gets 429 with
    Retry-After, and the six complete once the engine runs."""
    url, engine, _ = server
    engine.paused.set()
    try:
        results = []
        t = threading.Thread(
            target=lambda: results.extend(
                asyncio.run(_many(url, [ask(f"q{i}", stream=True) for i in range(6)]))
            )
        )
        t.start()
        # wait for all six to be accepted (in a slot or queued), not for the queue to hold 4: how
        # many the paused loop has moved into slots yet depends on thread scheduling
        deadline = time.monotonic() + TIMEOUT
        while (s := engine.stats()).active_slots + s.queue_length < 6:
            assert time.monotonic() < deadline and t.is_alive(), (s, results)
            time.sleep(0.01)
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            r = c.post("/v1/chat/completions", json=ask("one too many"))
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert "busy" in r.json()["error"]["message"]
        s = engine.stats()
        assert s.active_slots + s.queue_length == 6, s
    finally:
        engine.paused.clear()
    t.join(TIMEOUT)
    assert [status for status, _, _ in results] == [200] * 6, results
    assert sorted(r[2]["stream_text"] for r in results) == [f"echo: q{i}" for i in range(6)]


def test_many_concurrent_none_lost_or_duplicated(server):
    url, engine, _ = server
    engine.max_queue = 100
    try:
        bodies = [ask(f"n{i} x", stream=bool(i % 2), max_tokens=1 + i % 3) for i in range(80)]
        results = asyncio.run(_many(url, bodies))
    finally:
        engine.max_queue = 4
    for i, (status, _, body) in enumerate(results):
        assert status == 200, body
        want = ["echo:", f" n{i}", " x"][: 1 + i % 3]
        got = body["stream_text"] if i % 2 else body["choices"][0]["message"]["content"]
        assert got == "".join(want)
    ids = [b["id"] for _, _, b in results]
    assert len(set(ids)) == len(ids)


def _wait_cancelled(engine, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while len(engine.cancelled) < n or engine.stats().active_slots:
        assert time.monotonic() < deadline, (engine.cancelled, engine.stats())
        time.sleep(0.01)


def test_disconnect_mid_stream_frees_the_slot(server):
    url, engine, _ = server
    before = len(engine.cancelled)
    engine.step_s = 0.05
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            body = ask("w " * 50, stream=True, max_tokens=60)
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                first = [next(lines) for _ in range(4)]  # role chunk and a first token
        assert first[0].startswith("data: ")
        _wait_cancelled(engine, before + 1)
        # a blocking request whose client gives up is cancelled as well
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=ask("w " * 50, max_tokens=60),
                       timeout=0.3)  # fmt: skip
        _wait_cancelled(engine, before + 2)
    finally:
        engine.step_s = 0.002
    with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert c.post("/v1/chat/completions", json=ask("after")).status_code == 200


def test_metrics(client, server):
    client.post("/v1/chat/completions", json=ask("m e t r i c s"))
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    parser = pytest.importorskip("prometheus_client.parser")
    families = {f.name: f for f in parser.text_string_to_metric_families(text.text)}
    value = {f.name: f.samples[0].value for f in families.values() if f.type == "gauge"}
    assert value["minicpmv_slots"] == 2 and value["minicpmv_queue_length"] == 0
    assert value["minicpmv_generation_tokens_per_second"] > 0
    ttft = families["minicpmv_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    count = {s.name: s.value for s in ttft.samples if not s.name.endswith("_bucket")}
    finished = families["minicpmv_requests"]  # prometheus_client drops the _total suffix
    done = sum(s.value for s in finished.samples if s.name.endswith("_total"))
    assert count["minicpmv_time_to_first_token_seconds_count"] >= 1
    assert done >= count["minicpmv_time_to_first_token_seconds_count"]
    buckets = [s.value for s in ttft.samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == count[
        "minicpmv_time_to_first_token_seconds_count"]  # fmt: skip
    tokens = families["minicpmv_generation_tokens"].samples[0].value
    assert tokens >= 8  # this request's 8 tokens at least
    rejected = {s.labels["status"]: s.value for s in families["minicpmv_rejected_requests"].samples}
    assert set(rejected) <= {"400", "404", "413", "429", "503"}


SIGTERM_SERVER = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]
from serve_helpers import FakeEngine
from minicpmv_jax.serve.server import ServerState, create_app, run

engine = FakeEngine(slots=2, max_queue=8, step_s=0.05)
engine.start()
state = ServerState(engine, model_name="tiny", version="2.6", drain_timeout=20)
run(create_app(state), host="127.0.0.1", port={port}, log_level="warning")
print("exited; engine finished", engine.finished, "cancelled", len(engine.cancelled), flush=True)
"""


def test_sigterm_drains_in_flight_requests(tmp_path):
    """SIGTERM while a stream and a blocking request run: both complete, then the process
    exits 0 (the stand-in engine reports no cancelled request)."""
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(SIGTERM_SERVER).format(
        tests=str(HERE), root=str(HERE.parent), port=port))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        blocking = []
        t = threading.Thread(target=lambda: blocking.append(httpx.post(
            f"{url}/v1/chat/completions", json=ask("b " * 20), timeout=TIMEOUT)))  # fmt: skip
        t.start()
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=TIMEOUT,
                          json=ask("s " * 20, stream=True)) as r:  # fmt: skip
            lines = r.iter_lines()
            head = [next(lines) for _ in range(4)]
            proc.send_signal(signal.SIGTERM)
            events = sse_events([*head, *lines])
        t.join(TIMEOUT)
        assert proc.wait(TIMEOUT) == 0
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "echo:" + " s" * 20
    assert blocking[0].status_code == 200
    assert blocking[0].json()["choices"][0]["message"]["content"] == "echo:" + " b" * 20
    assert "exited; engine finished 2 cancelled 0" in out, out
    with pytest.raises(httpx.TransportError):  # nobody listens any more
        httpx.get(f"{url}/health", timeout=2)


def test_package_imports_without_the_serve_extra():
    """starlette / uvicorn absent: the package, the contract and the parser import; the server
    module says which extra to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["starlette"] = sys.modules["uvicorn"] = None
        import minicpmv_jax, minicpmv_jax.serve, minicpmv_jax.serve.api, minicpmv_jax.cli
        try:
            import minicpmv_jax.serve.server
        except ImportError as e:
            print("ImportError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(HERE.parent)}, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "ImportError: the HTTP server needs the 'serve' extra" in out.stdout


def test_cli_serve_refuses_before_loading(monkeypatch, capsys, tmp_path):
    from minicpmv_jax import cli

    ckpt = str(HERE / "fixtures" / "minicpm-v-2_6" / "checkpoint")
    for extra, match in (
        (["--max-images", "0"], "--max-images must be a positive integer, got 0"),
        (["--slots", "0"], "--slots must be positive, got 0"),
        (["--allow-local-files", str(tmp_path / "nope")], "not a directory"),
        (["--mesh", "1,2"], "--mesh 1,2"),
        (["--decode-buckets", "1,x"], "--decode-buckets: '1,x' is not a comma-separated list"),
        (["--slots", "4", "--decode-buckets", "2,8"], "outside [1, --slots=4]"),
    ):
        assert cli.main(["serve", "--model", ckpt, *extra]) == 2
        assert match in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert cli.main(["serve", "--model", ckpt]) == 2
    assert "pip install 'minicpmv-jax[serve]'" in capsys.readouterr().err
    monkeypatch.delitem(sys.modules, "uvicorn")
    # one process of a multi-host run: refused with the way out, before loading
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert cli.main(["serve", "--model", ckpt]) == 2
    assert "serve runs in one process; this is process 0 of 2" in capsys.readouterr().err
