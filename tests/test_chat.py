"""chat(): official defaults per version, post-processing and answers equal to the fixtures'."""

import numpy as np
import pytest
from conftest import FIXTURES, VERSIONS, all_cases, load_case
from gen_helpers import case_messages, load_model

from minicpmv_jax import versions
from minicpmv_jax.chat import _TextStream, postprocess
from minicpmv_jax.processor import MiniCPMVProcessor
from minicpmv_jax.settings import GenerationSettings

# (version folder, case) replayed through chat(**chat_kwargs) end to end
CHAT_CASES = [
    ("minicpm-llama3-v-2_5", "beam_default_single"),
    ("minicpm-v-2_6", "greedy_rep_penalty"),
    ("minicpm-v-2_6", "mask_id0_image"),  # `!` (id 0) masked, later positions shifted
    ("minicpm-v-4_5", "mask_id0_text_only"),
    ("minicpm-v-4_5", "thinking_on"),
    ("minicpm-v-4_5", "beam_default_video"),
]


def test_official_defaults():
    assert versions.spec("2.6").generation_defaults(sampling=False) == {
        "do_sample": False,
        "num_beams": 3,
        "repetition_penalty": 1.2,
    }
    for v, penalty in (("2.5", 1.05), ("2.6", 1.05), ("4.5", 1.03)):
        d = versions.spec(v).generation_defaults(sampling=True)
        assert d == {
            "do_sample": True,
            "top_p": 0.8,
            "top_k": 100,
            "temperature": 0.7,
            "repetition_penalty": penalty,
        }
    thinking = versions.spec("4.5").generation_defaults(sampling=True, enable_thinking=True)
    assert thinking == {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 1.0}
    assert (
        GenerationSettings.for_chat(versions.spec("2.5"), None, True, False, {}).max_new_tokens
        == 1024
    )
    assert (
        GenerationSettings.for_chat(versions.spec("2.6"), None, True, False, {}).max_new_tokens
        == 2048
    )
    s = GenerationSettings.for_chat(
        versions.spec("4.5"), 7, False, False, {"num_beams": 1, "length_penalty": 0.5}
    )
    assert (s.max_new_tokens, s.num_beams, s.repetition_penalty, s.length_penalty) == (
        7,
        1,
        1.2,
        0.5,
    )


@pytest.fixture(scope="module")
def processors():
    return {v: MiniCPMVProcessor.from_pretrained(FIXTURES / v / "checkpoint") for v in VERSIONS}


@pytest.mark.parametrize("param", all_cases(), ids=lambda p: f"{p[0]}/{p[1].name}")
def test_postprocess_gives_the_official_answer(processors, param):
    """Drop id 0, a leading bos, a trailing terminator; decode; strip; 4.5 thinking prefix."""
    version, folder = param
    case = load_case(folder)["case"]
    thinking = case["chat_kwargs"].get("enable_thinking", False)
    got = postprocess(np.asarray(case["generated_ids"]), processors[version], thinking)
    assert got == case["chat_answer"]


def test_postprocess_drops_every_id0(processors):
    proc = processors["minicpm-v-2_6"]
    ids = np.array([0, 60, 0, 61, proc.terminators[0]])
    assert postprocess(ids, proc) == proc.decode([60, 61]).strip()


@pytest.mark.parametrize("version, name", CHAT_CASES)
def test_chat_replays_the_official_call(version, name):
    model = load_model(version)
    case = load_case(FIXTURES / version / "cases" / name)
    msgs, kwargs = case_messages(case), dict(case["case"]["chat_kwargs"])
    answer = case["case"]["chat_answer"]
    assert model.chat(msgs, **kwargs) == answer
    if kwargs["num_beams"] == 1:  # streamed pieces add up to the same answer
        assert "".join(model.chat(msgs, stream=True, **kwargs)) == answer
    if name.startswith("beam_default") and not kwargs.get("temporal_ids"):
        # the official default for sampling=False is the beam search the beam cases record
        del kwargs["num_beams"], kwargs["repetition_penalty"]
        assert model.chat(msgs, **kwargs) == answer
        # official sampling defaults run (seeded, deterministic)
        a = model.chat(msgs, max_new_tokens=6, seed=0)
        assert isinstance(a, str) and a == model.chat(msgs, max_new_tokens=6, seed=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_streamed_text_is_the_answer_in_linear_time(processors, version):
    """Streamed pieces add up to postprocess() of the same ids, for every case's generated ids
    and for a 2000-token answer made of them; the tokenizer decodes O(answer) ids in total (the
    window per token stays short), not the whole answer again per token."""
    proc = processors[version]
    decoded = []
    decode = proc.decode
    proc.decode = lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw)
    try:
        answers, body = [], []
        for _, folder in all_cases((version,)):
            case = load_case(folder)["case"]
            ids = list(case["generated_ids"])
            answers.append((ids, case["chat_kwargs"].get("enable_thinking", False)))
            body += [t for t in ids if t not in proc.terminators]
        long = (body * (2000 // len(body) + 1))[:2000]
        answers.append((long + [proc.terminators[0]], version == "4.5"))
        for ids, thinking in answers:
            stream = _TextStream(proc, thinking)
            decoded.clear()
            text = "".join([stream.push(t) for t in ids] + [stream.flush()])
            proc.decode = decode  # the reference answer's decoding is not counted
            assert text == postprocess(np.asarray(ids), proc, thinking)
            proc.decode = lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw)
            assert sum(decoded) <= 16 * len(ids), (sum(decoded), len(ids))
    finally:
        proc.decode = decode
