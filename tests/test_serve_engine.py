"""The continuous-batching engine on the tiny fixture checkpoints (2.6 and 4.5).

Every answer is checked against the same request run alone through the generation path of
``chat()`` (``model.generate`` for the ids, ``chat.postprocess`` for the text, which is what
``chat()`` returns; a few requests literally through ``model.chat``): token ids exactly equal,
text exactly equal (no tolerance). One engine per checkpoint (fewer slots than requests), every program
compiled in ``start()``; no compilation afterwards.
"""

import dataclasses
import functools
import json
import threading

import jax
import numpy as np
import pytest
from conftest import FIXTURES
from gen_helpers import case_messages, load_model, processor_kwargs
from PIL import Image

from minicpmv_jax.chat import postprocess
from minicpmv_jax.errors import MiniCPMVError
from minicpmv_jax.generate import RequestShape
from minicpmv_jax.serve.engine import Engine
from minicpmv_jax.serve.types import (
    Delta,
    EngineStopped,
    Finished,
    QueueFull,
    Request,
    RequestError,
)
from minicpmv_jax.settings import GenerationSettings

TIMEOUT = 120.0
MAX_LEN = 256  # one token bucket (256): one insert program per engine

SAMPLED = {"temperature": 0.9, "top_p": 0.9, "top_k": 40}
# (case, max_tokens, extra Request fields); every case once or twice with different lengths,
# three or more requests per slot
WORKLOAD = {
    "minicpm-v-2_6": [
        ("text_only", 16, {}),
        ("text_only", 5, {}),
        ("mask_id0_text_only", 12, {}),
        ("greedy_rep_penalty", 24, {"repetition_penalty": 1.2}),
        ("greedy_rep_penalty", 9, {"repetition_penalty": 1.2}),
        ("single_448x448", 16, {}),
        ("single_100x90", 7, {}),
        ("text_only", 16, {"system_prompt": "Answer in one short sentence."}),
        ("single_1024x768", 11, {}),  # sliced
        ("single_1024x768", 20, {"repetition_penalty": 1.2}),
        ("multi_image", 16, {}),
        ("multi_turn", 16, {}),
        ("multi_turn", 1, {}),
    ],
    # 24 requests through one engine: text, thinking, single image, sliced images, several images,
    # video (alone and after an image), different lengths; greedy and seeded sampled (one of
    # them twice: the same request gives the same answer beside itself)
    "minicpm-v-4_5": [
        ("text_only", 16, {}),
        ("text_only", 5, {}),
        ("mask_id0_text_only", 12, {}),
        ("thinking_on", 16, {}),
        ("thinking_off", 16, {}),
        ("system_prompt", 10, {}),
        ("multi_turn", 14, {}),
        ("greedy_rep_penalty", 24, {"repetition_penalty": 1.2}),
        ("greedy_rep_penalty", 9, {"repetition_penalty": 1.2}),
        ("single_448x448", 4, {}),
        ("single_448x448", 16, {}),
        ("single_1024x768", 11, {}),  # sliced
        ("single_1024x768", 20, {"repetition_penalty": 1.2}),
        ("single_300x1200", 8, {}),  # sliced, tall
        ("multi_image", 16, {}),
        ("multi_image", 6, {}),
        ("video_8f_pack3", 16, {}),  # video: frames + temporal_ids
        ("video_8f_pack3", 9, {}),
        ("video_12f_pack2", 12, {}),
        ("image_and_video", 16, {}),
        ("text_only", 20, {"seed": 7, **SAMPLED}),
        ("text_only", 20, {"seed": 7, **SAMPLED}),
        ("single_448x448", 16, {"seed": 11, "repetition_penalty": 1.05, **SAMPLED}),
        ("video_8f_pack3", 12, {"seed": 3, **SAMPLED}),
    ],
}
SLOTS = {"minicpm-v-2_6": 4, "minicpm-v-4_5": 4}
MAX_IMAGES = {"minicpm-v-2_6": 12, "minicpm-v-4_5": 16}  # video_12f_pack2: 13 frames


@functools.cache
def load_case(version: str, name: str) -> dict:
    folder = FIXTURES / version / "cases" / name
    return {"case": json.loads((folder / "case.json").read_text()), "dir": folder}


def case_request(version: str, name: str, max_tokens: int, **fields) -> Request:
    case = load_case(version, name)
    pk = processor_kwargs(case)
    if "temporal_ids" in pk:
        pk["temporal_ids"] = tuple(tuple(g) for g in pk["temporal_ids"])
    fields.setdefault("temperature", 0.0)
    return Request(messages=case_messages(case), max_tokens=max_tokens, **{**pk, **fields})


_OUTPUTS: dict = {}


def processed(model, r: Request):
    """The processor output of a request (cached: images are processed once per test run)."""
    tids = None if r.temporal_ids is None else [list(g) for g in r.temporal_ids]
    kw = {
        "max_slice_nums": r.max_slice_nums,
        "use_image_id": r.use_image_id,
        "enable_thinking": r.enable_thinking,
        "system_prompt": r.system_prompt,
        "temporal_ids": tids,
    }
    key = (id(model), repr(r.messages), repr(kw))
    if key not in _OUTPUTS:
        _OUTPUTS[key] = model.processor(r.messages, **kw)
    return _OUTPUTS[key]


def alone(model, r: Request, **kwargs) -> list[int]:
    """The request's ids from the generation path of chat(), batch 1 (greedy unless kwargs)."""
    kw = {"sampling": False, "num_beams": 1, "repetition_penalty": r.repetition_penalty, **kwargs}
    ids = model.generate(processed(model, r), max_new_tokens=r.max_tokens, **kw)
    return [int(t) for t in ids]


def collect(handle) -> tuple[Finished, list[int], str]:
    ids, text = [], ""
    for ev in handle.events(timeout=TIMEOUT):
        if isinstance(ev, Delta):
            ids += ev.token_ids
            text += ev.text
        else:
            return ev, ids, text
    raise AssertionError("no Finished event")


def run_together(engine, requests) -> list[tuple[Finished, list[int], str]]:
    """Submit every request from its own thread at once; collect each one's events."""
    out = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def client(i):
        barrier.wait()
        out[i] = collect(engine.submit(requests[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert all(o is not None for o in out)
    return out


def make_engine(version: str) -> Engine:
    model = load_model(version)
    settings = GenerationSettings(max_new_tokens=1)
    shapes = [
        RequestShape.of([processed(model, case_request(version, name, n))], settings)
        for name, n, _ in WORKLOAD[version]
    ]
    engine = Engine(
        model,
        slots=SLOTS[version],
        max_len=MAX_LEN,
        max_queue=64,
        max_images=MAX_IMAGES[version],
        warmup=shapes,
    )
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine26():
    engine = make_engine("minicpm-v-2_6")
    yield engine
    engine.shutdown(drain=False, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def engine45():
    engine = make_engine("minicpm-v-4_5")
    yield engine
    engine.shutdown(drain=False, timeout=TIMEOUT)


def check_workload(engine, version: str, literal_chat: tuple[str, ...]):
    """Run WORKLOAD[version] concurrently; each answer must equal the request run alone: greedy
    through chat()'s generation path, seeded sampled through chat()'s seeded sampling."""
    model = engine.model
    requests = [case_request(version, name, n, **kw) for name, n, kw in WORKLOAD[version]]
    assert len(requests) > engine.slots
    results = run_together(engine, requests)
    terminators = set(model.processor.terminators)
    # Greedy requests that differ only in max_tokens share one run alone with the largest
    # max_tokens: max_new_tokens picks the same decode buffer (one new-token bucket), so the run
    # is the same programs on the same cache shape, and a greedy answer of n tokens is its first
    # n tokens (the decode loop only stops later; an answer that ends with a stop token ends
    # there). A sampled request runs alone as it is.
    assert len(model.sampler.buckets.new_tokens) == 1
    assert max(r.max_tokens for r in requests) <= model.sampler.buckets.new_tokens[0]
    longest: dict[str, Request] = {}
    for r in requests:
        key = repr(dataclasses.replace(r, max_tokens=0)) if r.temperature == 0 else repr(r)
        if key not in longest or longest[key].max_tokens < r.max_tokens:
            longest[key] = r

    def run_alone(r):
        if r.temperature == 0:
            return alone(model, r)
        assert r.seed is not None
        return alone(model, r, sampling=True, seed=r.seed, temperature=r.temperature,
                     top_p=r.top_p, top_k=r.top_k)  # fmt: skip

    runs = {key: run_alone(r) for key, r in longest.items()}
    for (name, _, _), r, (fin, ids, text) in zip(WORKLOAD[version], requests, results):
        key = repr(dataclasses.replace(r, max_tokens=0)) if r.temperature == 0 else repr(r)
        expected = runs[key][: r.max_tokens]
        assert ids == expected, (name, r.max_tokens, r.seed)
        answer = postprocess(np.asarray(expected), model.processor, r.enable_thinking)
        assert fin.text == answer and text == answer, name
        assert fin.reason == ("stop" if expected[-1] in terminators else "length"), name
        assert fin.completion_tokens == len(expected)
        assert fin.prompt_tokens == np.asarray(processed(model, r)["input_ids"]).shape[-1]
        if name in literal_chat and r.temperature == 0:
            kw = processor_kwargs(load_case(version, name))
            got = model.chat(r.messages, sampling=False, num_beams=1, max_new_tokens=r.max_tokens,
                             repetition_penalty=r.repetition_penalty, **kw)  # fmt: skip
            assert fin.text == got, name
    stats = engine.stats()
    assert stats.active_slots == 0 and stats.queue_length == 0
    assert stats.compilations_after_start == 0
    return requests, results


# Slow (.ci/run): 13 requests on 4 slots, and the 4.5 workload below (24 requests).
# The default suite runs, on this 2.6 engine, test_per_request_parameters (6 concurrent requests,
# each equal to the request alone), the seeded sampling test and the decode-bucket test.
@pytest.mark.slow
def test_concurrent_greedy_26_equals_each_request_alone(engine26):
    check_workload(engine26, "minicpm-v-2_6", literal_chat=("multi_image",))


# Also with the slow tests (.ci/run): 24 concurrent requests of every kind through one 4-slot
# engine. The default suite keeps its cheaper siblings on the 2.6 engine: the per-request checks,
# seeded sampling beside other requests and the decode-bucket exactness test.
@pytest.mark.slow
def test_concurrent_mixed_45_equals_each_request_alone(engine45):
    """Greedy answers equal chat() of each request alone, token for token; seeded sampled
    answers equal chat()'s seeded sampling alone (the same request twice: the same answer)."""
    v = "minicpm-v-4_5"
    names = [name for name, _, _ in WORKLOAD[v]]
    assert len(names) >= 20
    for kind in ("text_only", "single_448x448", "single_1024x768", "multi_image", "video_8f_pack3",
                 "image_and_video", "thinking_on"):  # fmt: skip
        assert kind in names
    requests, results = check_workload(
        engine45, v, literal_chat=("thinking_on", "video_8f_pack3", "single_1024x768")
    )
    twice = [res[1] for r, res in zip(requests, results) if r.seed == 7]
    assert len(twice) == 2 and twice[0] == twice[1]
    # sampling is in effect: the sampled text_only answer is not its greedy answer
    assert names[0] == "text_only" and twice[0][:16] != results[0][1]


def test_per_request_parameters(engine26):
    """Stop string, stop token id, top_k=1 sampling, repetition penalty: each acts on its own
    row only; expected values come from the request run alone."""
    v = "minicpm-v-2_6"
    model = engine26.model
    base = case_request(v, "text_only", 24)
    ids = alone(model, base)
    answer = postprocess(np.asarray(ids), model.processor)
    pieces = [answer[i : i + 3] for i in range(4, len(answer) - 3)]
    stop = next(p for p in pieces if "\ufffd" not in p)
    stop_id = ids[4]
    cut = ids.index(stop_id)
    plain = case_request(v, "greedy_rep_penalty", 16)
    requests = [
        case_request(v, "text_only", 24, stop=(stop, "never-appears")),
        case_request(v, "text_only", 24, stop_token_ids=(stop_id,)),
        case_request(v, "text_only", 24, temperature=0.7, top_k=1, seed=3),  # = greedy
        case_request(v, "greedy_rep_penalty", 16, temperature=1.3, top_k=1, top_p=0.5),  # no seed
        case_request(v, "greedy_rep_penalty", 16, repetition_penalty=1.2),
        plain,
    ]
    results = run_together(engine26, requests)
    (f_stop, _, t_stop), (f_id, ids_id, _), (f_k1, ids_k1, _), (_, ids_k1b, _) = results[:4]
    assert f_stop.reason == "stop" and f_stop.text == t_stop == answer[: answer.index(stop)]
    assert f_id.reason == "stop" and ids_id == ids[: cut + 1]
    assert f_id.text == postprocess(np.asarray(ids[:cut]), model.processor)
    assert ids_k1 == ids and f_k1.text == answer
    ids_plain = alone(model, plain)
    assert ids_k1b == results[5][1] == ids_plain
    assert results[4][1] == alone(model, requests[4]) != ids_plain
    assert engine26.stats().compilations_after_start == 0


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(engine26):
    v = "minicpm-v-2_6"
    model = engine26.model
    sampled = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.05}
    seeded = case_request(v, "single_448x448", 16, seed=7, **sampled)
    alone_run = run_together(engine26, [seeded])[0]
    mix = [case_request(v, "multi_image", 12), case_request(v, "text_only", 20, seed=1, **sampled),
           seeded, case_request(v, "single_1024x768", 8, temperature=1.2)]  # fmt: skip
    mixed_run = run_together(engine26, mix)[2]
    assert mixed_run[1] == alone_run[1] and mixed_run[0].text == alone_run[0].text
    # the same draws as chat()'s seeded sampling of the request alone
    kw = {k: sampled[k] for k in ("temperature", "top_p", "top_k")}
    assert alone_run[1] == alone(model, seeded, sampling=True, seed=7, **kw)
    # no seed: fresh randomness per request
    free = case_request(v, "text_only", 24, temperature=1.5)
    a, b = run_together(engine26, [free, free])
    assert a[1] != b[1]
    assert engine26.stats().compilations_after_start == 0


def test_decode_bucket_changes_mid_answer_keep_answers_exact(engine26, monkeypatch):
    """Requests arrive and finish while others decode, so a running answer is stepped in row
    buckets of 2, 1, 4 and back (4 slots: buckets 1, 2, 4) and is moved down to slot 0 when the
    row below it frees; greedy answers still equal each request alone, and a seeded sampled
    answer equals chat()'s seeded sampling of it alone. Decode steps are let through one by one
    (a gate on the engine's step) so the order of events does not depend on thread timing."""
    v = "minicpm-v-2_6"
    model = engine26.model
    assert engine26.decode_buckets == (1, 2, 4)
    gate, arrived = threading.Semaphore(0), threading.Semaphore(0)
    step = engine26._step

    def gated():  # the loop has admitted and compacted; it waits here before each step
        arrived.release()
        gate.acquire()
        step()

    def step_once():  # one decode step, then the next round of admissions and moves
        gate.release()
        assert arrived.acquire(timeout=TIMEOUT)

    monkeypatch.setattr(engine26, "_step", gated)
    sampled = {"temperature": 0.9, "top_p": 0.9, "top_k": 40}
    a = case_request(v, "text_only", 6)
    c = case_request(v, "greedy_rep_penalty", 30, repetition_penalty=1.2)
    d = case_request(v, "text_only", 20, seed=7, **sampled)
    e = case_request(v, "mask_id0_text_only", 12)
    before = engine26.stats()
    try:
        ha = engine26.submit(a)  # slot 0
        assert arrived.acquire(timeout=TIMEOUT)
        hc = engine26.submit(c)
        step_once()  # bucket 1; then c takes slot 1
        for _ in range(4):  # bucket 2: a's last token
            step_once()
        fin_a = ha.result(TIMEOUT)
        s = engine26.stats()  # c (slot 1) alone was moved to slot 0: bucket 1
        assert s.rows_moved == before.rows_moved + 1 and s.active_slots == 1
        for _ in range(3):  # bucket 1
            step_once()
        hd, he = engine26.submit(d), engine26.submit(e)
        step_once()  # then d and e take slots 1 and 2: bucket 4, later 2 and 1
        gate.release(10_000)
        results = {"c": collect(hc), "d": collect(hd), "e": collect(he)}
    finally:
        gate.release(10_000)
    fin_c, got_c, _ = results["c"]
    want_a = alone(model, a)
    assert fin_a.completion_tokens == len(want_a)
    assert got_c == alone(model, c)
    assert fin_c.text == postprocess(np.asarray(got_c), model.processor)
    assert fin_a.text == postprocess(np.asarray(want_a), model.processor)
    assert results["e"][1] == alone(model, e)
    assert results["d"][1] == alone(model, d, sampling=True, seed=7, **sampled)
    after = engine26.stats()
    steps = {b: after.decode_steps.get(b, 0) - before.decode_steps.get(b, 0) for b in (1, 2, 4)}
    assert all(n > 0 for n in steps.values()), steps
    for kind in ("prefill_s", "decode_s", "move_s"):  # the scheduler's time in each program
        assert getattr(after, kind) > getattr(before, kind), kind
    assert after.compilations_after_start == 0 and after.active_slots == 0


def test_a_freed_sampled_row_stops_sampling(engine26, monkeypatch):
    """A sampled request finishes in slot 1 while greedy ones decode in slots 0, 2 and 3 (bucket
    4 either way: no move). Its row keeps stepping; the next step clears the row's sample flag
    (the busy-row mask), so the free row no longer runs the sort of top-k / top-p. The
    stale flag could not change a token (selection is per row), so the greedy answers equal
    each request alone, before and after the fix alike. Steps are let through one by one."""
    v = "minicpm-v-2_6"
    model = engine26.model
    gate, arrived = threading.Semaphore(0), threading.Semaphore(0)
    step = engine26._step

    def gated():
        arrived.release()
        gate.acquire()
        step()

    def step_once():
        gate.release()
        assert arrived.acquire(timeout=TIMEOUT)

    def flags():
        return np.asarray(engine26._state.do_sample).tolist()

    monkeypatch.setattr(engine26, "_step", gated)
    a = case_request(v, "text_only", 8)
    b = case_request(v, "text_only", 2, temperature=0.9, top_p=0.9, top_k=40, seed=5)
    c = case_request(v, "greedy_rep_penalty", 10, repetition_penalty=1.2)
    try:
        ha = engine26.submit(a)  # slot 0
        assert arrived.acquire(timeout=TIMEOUT)
        hb, hc, hd = engine26.submit(b), engine26.submit(c), engine26.submit(a)
        step_once()  # bucket 1; then b, c and the second a take slots 1, 2 and 3
        assert flags() == [False, True, False, False]
        step_once()  # bucket 4: b's second and last token; its row is free
        assert hb.result(TIMEOUT).completion_tokens == 2
        assert [r is not None for r in engine26._rows] == [True, False, True, True]
        assert flags() == [False, True, False, False]
        step_once()  # bucket 4 again, with row 1 free
        assert flags() == [False, False, False, False]
        gate.release(10_000)
        got = {"a": collect(ha)[1], "c": collect(hc)[1], "d": collect(hd)[1]}
    finally:
        gate.release(10_000)
    assert got["a"] == got["d"] == alone(model, a)
    assert got["c"] == alone(model, c)
    assert engine26.stats().compilations_after_start == 0


def test_decode_step_and_row_move_update_the_cache_in_place():
    """The compiled decode step of a small row bucket aliases the donated slot cache to its
    output and needs less scratch memory than one row of that cache (no copy of the cache per
    step); the scratch grows with the bucket (it holds the attended layer's rows). The same for
    the row move's write (``put_row``), whose read (``take_row``) allocates one row. In bfloat16:
    there XLA:CPU copied the whole cache per step when one row was written by a scatter (steps of
    more than two rows still are), and per move when the move's read and write were one
    program."""
    import jax.numpy as jnp

    from minicpmv_jax.serve import slots as slot_programs

    model = load_model("minicpm-v-2_6")
    s = model.sampler
    rows, max_len = 8, 4096
    step = jax.jit(slot_programs.decode_step, static_argnums=0,
                   static_argnames=("terminators", "active"), donate_argnums=(2, 3))  # fmt: skip
    with s.context():
        cache = slot_programs.SlotCache.init(s.llm_config, rows, max_len, jnp.bfloat16)
        state = slot_programs.SlotState.init(rows, s.llm_config.vocab_size)
        busy = np.ones(rows, bool)
        compiled = {
            a: step.lower(
                s.graphdef, s.state, cache, state, busy, terminators=(0,), active=a
            ).compile()
            for a in (1, rows)
        }
        src, dst = np.int32(rows - 1), np.int32(0)
        take = jax.jit(slot_programs.take_row).lower(cache, state, src).compile()
        row = jax.eval_shape(slot_programs.take_row, cache, state, src)
        put = jax.jit(slot_programs.put_row, donate_argnums=(0, 1))
        put = put.lower(cache, state, *row, dst).compile()
    nbytes = cache.k.nbytes + cache.v.nbytes
    whole = "bf16[" + ",".join(map(str, cache.k.shape)) + "]"  # a K or V buffer
    for c in (*compiled.values(), put):
        assert c.memory_analysis().alias_size_in_bytes >= nbytes
        assert not [ln for ln in c.as_text().splitlines() if whole in ln and " copy(" in ln]
    memory = {a: c.memory_analysis() for a, c in compiled.items()}
    # one row's scratch: the attended layer of that row (2 layers here), in float32 at most
    assert memory[1].temp_size_in_bytes < nbytes / 4
    assert memory[rows].temp_size_in_bytes > 4 * memory[1].temp_size_in_bytes
    assert put.memory_analysis().temp_size_in_bytes < nbytes / rows
    taken = take.memory_analysis()
    assert taken.temp_size_in_bytes + taken.output_size_in_bytes < 2 * nbytes / rows


def test_decode_buckets_are_checked(engine26):
    model = engine26.model
    assert Engine(model, slots=16, max_len=MAX_LEN).decode_buckets == (1, 2, 4, 8, 16)
    assert Engine(model, slots=6, max_len=MAX_LEN).decode_buckets == (1, 2, 4, 6)
    assert Engine(model, slots=1, max_len=MAX_LEN).decode_buckets == (1,)
    assert Engine(model, slots=8, max_len=MAX_LEN, decode_buckets=(4,)).decode_buckets == (4, 8)
    for bad in ((0,), (9,), (2.5,)):
        with pytest.raises(MiniCPMVError, match="decode_buckets"):
            Engine(model, slots=8, max_len=MAX_LEN, decode_buckets=bad)


def test_cancel_frees_the_slot_and_the_queue_is_bounded(engine26):
    v = "minicpm-v-2_6"
    long = case_request(v, "text_only", MAX_LEN - 60, repetition_penalty=1.3)
    old = engine26.max_queue
    engine26.max_queue = 2
    try:
        # a burst of slots + max_queue is accepted however far the scheduler has got with it
        busy = [engine26.submit(long) for _ in range(engine26.slots)]
        waiting = [engine26.submit(long) for _ in range(2)]
        with pytest.raises(QueueFull) as e:
            engine26.submit(long)
        assert e.value.retry_after > 0
        for h in busy:  # all slots taken
            assert isinstance(next(h.events(TIMEOUT)), Delta)
        s = engine26.stats()
        assert (s.active_slots, s.queue_length) == (engine26.slots, 2)
        with pytest.raises(QueueFull, match="2 requests are waiting for a slot"):
            engine26.submit(long)
    finally:
        engine26.max_queue = old
    busy[0].cancel()
    fin = busy[0].result(TIMEOUT)
    assert fin.reason == "cancelled" and fin.completion_tokens >= 1
    # the freed slot takes a waiting request; its first token arrives
    first = next(waiting[0].events(TIMEOUT))
    assert isinstance(first, Delta) and first.token_ids
    waiting[1].cancel()
    assert waiting[1].result(TIMEOUT).reason == "cancelled"
    for h in busy[1:] + waiting[:1]:
        h.cancel()
        assert h.result(TIMEOUT).reason == "cancelled"
    s = engine26.stats()
    assert (s.active_slots, s.queue_length) == (0, 0)


def test_refusals_name_the_field(engine26):
    v = "minicpm-v-2_6"
    with pytest.raises(RequestError, match="max_tokens"):
        engine26.submit(case_request(v, "text_only", MAX_LEN))  # prompt + max_tokens > max_len
    with pytest.raises(RequestError, match="top_p"):
        engine26.submit(case_request(v, "text_only", 4, temperature=0.5, top_p=2.0))
    with pytest.raises(RequestError, match="max_tokens"):
        engine26.submit(case_request(v, "text_only", 0))
    images = [Image.new("RGB", (32, 32)) for _ in range(13)]
    with pytest.raises(RequestError, match="max_images"):
        engine26.submit(Request(messages=[{"role": "user", "content": images + ["hi"]}]))
    with pytest.raises(RequestError, match="enable_thinking"):
        engine26.submit(case_request(v, "text_only", 4, enable_thinking=True))
    with pytest.raises(RequestError, match="stop_token_ids"):
        engine26.submit(case_request(v, "text_only", 4, stop_token_ids=(10**9,)))


def test_behind_the_http_server(engine26):
    """The official openai client against the real engine: streaming and not, answers equal to
    chat() of the same request alone."""
    openai = pytest.importorskip("openai")
    from serve_helpers import serve_in_thread

    from minicpmv_jax.serve.server import ServerState, create_app

    model = engine26.model
    question = "What is in the picture?"
    ref = model.chat([{"role": "user", "content": question}], sampling=False, num_beams=1,
                     repetition_penalty=1.0, max_new_tokens=12)  # fmt: skip
    state = ServerState(engine26, model_name="tiny", version="2.6", owns_engine=False)
    with serve_in_thread(create_app(state)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=TIMEOUT)
        msgs = [{"role": "user", "content": question}]
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12,
                                           temperature=0)  # fmt: skip
        assert r.choices[0].message.content == ref
        chunks = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12,
                                                temperature=0, stream=True)  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == ref
        # /metrics: the engine's decode steps by row bucket (one request at a time: bucket 1)
        parser = pytest.importorskip("prometheus_client.parser")
        import httpx

        body = httpx.get(url + "/metrics", timeout=TIMEOUT).text
        families = {f.name: f for f in parser.text_string_to_metric_families(body)}
        steps = {s.labels["rows"]: s.value for s in families["minicpmv_decode_steps"].samples}
        assert set(steps) == {"1", "2", "4"} and steps["1"] > 0
        assert families["minicpmv_decode_rows"].samples[0].value == 1
        assert families["minicpmv_slot_moves"].samples[0].value == engine26.stats().rows_moved
    assert engine26.stats().compilations_after_start == 0


def test_shutdown_drains_then_refuses(engine26):
    v = "minicpm-v-2_6"
    handles = [engine26.submit(case_request(v, "text_only", n)) for n in (5, 9, 13, 3, 7, 11)]
    engine26.shutdown(drain=True, timeout=TIMEOUT)
    for h, n in zip(handles, (5, 9, 13, 3, 7, 11)):
        fin = h.result(1.0)
        assert fin.reason in ("stop", "length") and 1 <= fin.completion_tokens <= n
    with pytest.raises(EngineStopped):
        engine26.submit(case_request(v, "text_only", 4))


def test_46_is_refused():
    class Model46:
        class config:
            version = "4.6"

    with pytest.raises(MiniCPMVError, match="4.6"):
        Engine(Model46())


def test_step_logits_do_not_depend_on_the_bucket_or_the_row():
    """A multi-row decode step's logits (``slots.step_logits``, the float32 lm_head as a
    multiply-and-sum over the engine's slot count): a row's values are the same bit for bit in
    every row bucket and at every position, and equal the dense layer's within summation order
    (1e-5 relative, float32)."""
    import types

    import jax.numpy as jnp
    from flax import nnx

    from minicpmv_jax.layers import OutInDense
    from minicpmv_jax.llm import Llm
    from minicpmv_jax.serve import slots as slot_programs
    from minicpmv_jax.sharding import RULES, make_mesh

    d, v, slots = 3584, 1000, 16  # 2.6's width: unpadded, the sum's order changes with the rows
    with jax.set_mesh(make_mesh()), nnx.logical_axis_rules(RULES):
        head = OutInDense(d, v, ("vocab", "embed"), dtype=jnp.float32, param_dtype=jnp.float32,
                          rngs=nnx.Rngs(0))  # fmt: skip
    llm = types.SimpleNamespace(lm_head=head, logits=lambda h: Llm.logits(llm, h))
    h = jnp.asarray(np.random.default_rng(0).standard_normal((slots, d)), jnp.float32)
    logits = jax.jit(lambda h: slot_programs.step_logits(llm, h, slots))
    full = np.asarray(logits(h))
    for rows in (3,):
        np.testing.assert_array_equal(np.asarray(logits(h[:rows])), full[:rows])
    perm = np.random.default_rng(1).permutation(slots)
    np.testing.assert_array_equal(np.asarray(logits(h[perm])), full[perm])
    dense = np.asarray(jax.jit(lambda h: Llm.logits(llm, h[:, None])[:, 0])(h))
    np.testing.assert_allclose(full, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())
    # one row: the dense layer's own product (chat()'s)
    one = jax.jit(lambda h: Llm.logits(llm, h[:, None])[:, 0])(h[:1])
    np.testing.assert_array_equal(np.asarray(logits(h[:1])), np.asarray(one))
