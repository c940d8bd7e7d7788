"""200 concurrent HTTP requests of mixed kinds against the real engine on the tiny 2.6 fixture
checkpoint (127.0.0.1 only): every request completes once, with the answer of ``chat()`` for the
same request alone (greedy: exact text), streamed or not, and serving compiles nothing.
Marked slow: it runs in `.ci/run`'s second step (`python -m pytest -q -m slow tests`)."""

import asyncio
import base64
import json

import httpx
import pytest
from conftest import FIXTURES
from gen_helpers import load_model
from PIL import Image
from serve_helpers import serve_in_thread

from minicpmv_jax.generate import RequestShape
from minicpmv_jax.serve.engine import Engine
from minicpmv_jax.serve.server import ServerState, create_app
from minicpmv_jax.settings import GenerationSettings

CASES = FIXTURES / "minicpm-v-2_6" / "cases"
IMAGES = [CASES / "single_448x448" / "image_0.png", CASES / "single_100x90" / "image_0.png"]
QUESTIONS = ["What is in the picture?", "Describe it in one word.", "Hello there, who are you?"]
N_REQUESTS = 200
TIMEOUT = 600.0


def kinds() -> list[tuple[str, list[int], int]]:
    """(question, image indices, max_tokens) of the distinct requests: text, one image, two."""
    out = []
    for q, question in enumerate(QUESTIONS):
        for images in ([], [q % 2], [0, 1]):
            out.append((question, images, 3 + 4 * q + len(images)))
    return out


def body(question: str, images: list[int], max_tokens: int, stream: bool) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                            + base64.b64encode(IMAGES[i].read_bytes()).decode()}}
        for i in images
    ] + [{"type": "text", "text": question}]  # fmt: skip
    return {"model": "tiny", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}  # fmt: skip


def messages(question: str, images: list[int]) -> list[dict]:
    pics = [Image.open(IMAGES[i]).convert("RGB") for i in images]
    return [{"role": "user", "content": [*pics, question]}]


async def send_all(url: str, bodies: list[dict]) -> list[tuple[int, str, str]]:
    """(status, response id, answer text) of every body, all in flight at once."""
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as c:

        async def one(b):
            if not b["stream"]:
                r = await c.post("/v1/chat/completions", json=b)
                data = r.json()
                return r.status_code, data.get("id"), data["choices"][0]["message"]["content"]
            async with c.stream("POST", "/v1/chat/completions", json=b) as r:
                lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            events = [json.loads(ln[6:]) for ln in lines[:-1]]
            text = "".join(e["choices"][0]["delta"].get("content") or ""
                           for e in events if e["choices"])  # fmt: skip
            assert len({e["id"] for e in events}) == 1
            return r.status_code, events[0]["id"], text

        return await asyncio.gather(*(one(b) for b in bodies))


@pytest.mark.slow
def test_200_concurrent_mixed_requests_complete_with_the_right_answers():
    model = load_model("minicpm-v-2_6")
    distinct = kinds()
    want = {
        k: model.chat(
            messages(q, imgs), sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=n
        )
        for k, (q, imgs, n) in enumerate(distinct)
    }
    shapes = [
        RequestShape.of([model.processor(messages(q, imgs))], GenerationSettings(max_new_tokens=1))
        for q, imgs, _ in distinct
    ]
    engine = Engine(model, slots=8, max_len=320, max_queue=N_REQUESTS, max_images=4, warmup=shapes)
    engine.start()
    state = ServerState(engine, model_name="tiny", version="2.6", max_pending=N_REQUESTS)
    plan = [(i % len(distinct), bool(i % 2)) for i in range(N_REQUESTS)]
    try:
        with serve_in_thread(create_app(state)) as url:
            bodies = [body(*distinct[k], stream=s) for k, s in plan]
            results = asyncio.run(asyncio.wait_for(send_all(url, bodies), TIMEOUT))
            stats = engine.stats()
    finally:
        state.close()
    assert [status for status, _, _ in results] == [200] * N_REQUESTS
    assert len({rid for _, rid, _ in results}) == N_REQUESTS  # none lost or duplicated
    for (k, stream), (_, _, text) in zip(plan, results, strict=True):
        assert text == want[k], (distinct[k], stream)
    assert stats.requests_finished >= N_REQUESTS and stats.compilations_after_start == 0
    assert (stats.active_slots, stats.queue_length) == (0, 0)
