"""Shared helpers of the generation tests: load a fixture checkpoint, replay a case's messages."""

import functools
import pathlib

from conftest import FIXTURES

from minicpmv_jax.batching import Buckets

# small buckets keep the number of compiled programs (and the suite's runtime) low; a slice
# bucket of 8 for the fixtures' sliced, multi-image and video prompts (5 to 8 slices) runs the
# vision tower on half the padding slices that 16 would
TEST_BUCKETS = Buckets(tokens=(256, 1024), slices=(1, 4, 8, 16), new_tokens=(32,))
PROCESSOR_KEYS = (
    "max_slice_nums",
    "use_image_id",
    "system_prompt",
    "enable_thinking",
    "temporal_ids",
)
GENERATE_KEYS = ("max_new_tokens", "num_beams", "repetition_penalty")


@functools.cache
def load_model(version: str, dtype: str = "float32", buckets: Buckets = TEST_BUCKETS):
    """The tiny fixture model of `version`, loaded once per test session (programs are shared)."""
    from minicpmv_jax.model import MiniCPMV

    model = MiniCPMV.from_pretrained(FIXTURES / version / "checkpoint", dtype=dtype, progress=False)
    model.configure_generation(buckets=buckets)
    return model


def case_messages(case: dict) -> list[dict]:
    """case.json messages with image file names resolved to paths of the case folder."""
    folder = pathlib.Path(case["dir"])
    msgs = []
    for msg in case["case"]["messages"]:
        content = msg["content"]
        if isinstance(content, list):
            content = [
                {"image": folder / item["image"]} if "image" in item else item for item in content
            ]
        msgs.append({"role": msg["role"], "content": content})
    return msgs


def processor_kwargs(case: dict) -> dict:
    kw = case["case"]["chat_kwargs"]
    return {k: kw[k] for k in PROCESSOR_KEYS if k in kw}


def generate_kwargs(case: dict) -> dict:
    kw = case["case"]["chat_kwargs"]
    assert kw["sampling"] is False
    return {k: kw[k] for k in GENERATE_KEYS}
