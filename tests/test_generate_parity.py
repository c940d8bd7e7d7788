"""Generation parity with the golden fixtures, for every case of every version.

`generate` with each case's chat kwargs (greedy, greedy + repetition penalty, default beam search)
must reproduce the official `generated_ids` exactly; greedy decode-step logits match `step_logits`
(5e-4); beam cases also match `sequences_scores`, `beam_indices` and the number of steps.
"""

import numpy as np
import pytest
from conftest import VERSIONS, case_dirs, load_case
from gen_helpers import case_messages, generate_kwargs, load_model, processor_kwargs

from minicpmv_jax.chat import postprocess

CASES = [(v, c) for v in VERSIONS for c in case_dirs(v)]


@pytest.mark.parametrize("param", CASES, ids=lambda p: f"{p[0]}/{p[1].name}")
def test_generate_matches_fixture(param):
    version, folder = param
    model = load_model(version)
    case = load_case(folder)
    llm = case["llm"]
    # one patch bucket for every case (fewer programs to compile; padding changes no result)
    batch = model.processor(case_messages(case), patch_bucket=1280, **processor_kwargs(case))
    np.testing.assert_array_equal(batch["input_ids"], case["processor"]["input_ids"][0])
    kw = generate_kwargs(case)
    out = model.generate(batch, **kw, return_dict=True, record_logits=kw["num_beams"] == 1)
    want = llm["generated_ids"][0]
    np.testing.assert_array_equal(out.sequences[0], want)
    if "step_logits" in llm:
        got = out.step_logits[0, : len(want)]
        np.testing.assert_allclose(got, llm["step_logits"][0], rtol=0, atol=5e-4)
    if "beam_indices" in llm:
        np.testing.assert_array_equal(out.beam_indices[0], llm["beam_indices"][0])
        np.testing.assert_allclose(out.scores[0], llm["sequences_scores"][0], atol=1e-4)
        assert out.num_steps == case["case"]["decoding"]["num_steps"]
    # the official chat() answer is the post-processed ids
    enable_thinking = case["case"]["chat_kwargs"].get("enable_thinking", False)
    assert (
        postprocess(out.sequences[0], model.processor, enable_thinking)
        == case["case"]["chat_answer"]
    )
