"""The typed batch (batching.py), the KV cache pool and the one-way imports (no model needed)."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FIXTURES, load_case
from model_inputs import batch_from_case

from minicpmv_jax.batching import Buckets, PreparedBatch, VisionBatch, prepare_batch
from minicpmv_jax.generate import CachePool
from minicpmv_jax.settings import GenerationError

CASES = FIXTURES / "minicpm-v-2_6" / "cases"


def _output(name: str) -> dict:
    return batch_from_case(load_case(CASES / name), "2.6")


def test_prepare_batch_stacks_conversations_and_pads_to_buckets():
    """Two conversations: prompts right-padded to the token bucket, slices concatenated with
    the second one's groups and feature rows after the first one's, padding slices inert."""
    a, b = _output("single_448x448"), _output("beam_default_multi_image")
    na, nb = len(a["tgt_sizes"]), len(b["tgt_sizes"])
    ga, gb = len(a["image_bound"]), len(b["image_bound"])
    q = int(np.diff(a["image_bound"][0])[0])  # the fixture model's query_num
    batch = prepare_batch([a, b], Buckets(tokens=(1024,), slices=(16,)), q)
    assert batch.input_ids.shape == (2, 1024) and batch.lengths == [
        len(a["input_ids"]),
        len(b["input_ids"]),
    ]
    v = batch.vision
    assert isinstance(v, VisionBatch) and v.num_slices == 16 and v.num_groups == 16
    np.testing.assert_array_equal(
        v.tgt_sizes[: na + nb], np.concatenate([a["tgt_sizes"], b["tgt_sizes"]])
    )
    np.testing.assert_array_equal(v.group_index[: na + nb], np.arange(ga + gb))
    # padding slices: no valid patch, dropped group, 1x1 grid, one attended key
    assert not v.patch_valid[na + nb :].any() and (v.group_index[na + nb :] == -1).all()
    assert (v.tgt_sizes[na + nb :] == 1).all() and v.vision_mask[na + nb :].sum(-1).tolist() == [
        1
    ] * (16 - na - nb)
    # row 1's first image token reads feature row ga * Q (after conversation 0's groups)
    start = int(b["image_bound"][0, 0])
    assert batch.image_slot[1, start] == ga * q
    assert (batch.image_slot[:, max(batch.lengths) :] == -1).all()
    assert not batch.token_valid[0, len(a["input_ids"]) :].any()


def test_placeholder_and_abstract_have_the_prepared_shapes():
    """Warm-up placeholders and abstract shapes agree with a real batch of the same sizes (so
    warm-up compiles exactly the programs a request runs)."""
    out = _output("single_448x448")
    buckets = Buckets(tokens=(256,), slices=(8,))
    real = prepare_batch([out], buckets, int(np.diff(out["image_bound"][0])[0]))
    p = real.vision.pixel_patches.shape[1]
    vision = VisionBatch.placeholder(8, p, 588)
    fake = PreparedBatch.placeholder(1, len(out["input_ids"]), 256, vision)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), real.abstract())
    assert jax.tree.map(lambda x: (x.shape, x.dtype), fake.abstract()) == shapes
    assert jax.tree.structure(real) == jax.tree.structure(fake)


def test_vision_batch_pad_refuses_fewer_slices():
    v = VisionBatch.placeholder(3, 16, 588)
    with pytest.raises(ValueError, match="3 slices to 2"):
        v.pad_to(2)


def test_cache_pool_keeps_the_most_recent_buffers():
    pool = CachePool(2)
    for key in ("a", "b", "c"):
        pool.give((key,), key)
    assert pool.keys() == [("b",), ("c",)]  # "a", least recently used, was dropped
    assert pool.take(("b",)) == "b" and pool.take(("b",)) is None
    pool.give(("d",), "d")
    pool.give(("c",), "c2")  # given back: most recent again
    assert pool.keys() == [("d",), ("c",)]
    none = CachePool(0)
    none.give(("a",), "a")
    assert none.keys() == []
    with pytest.raises(GenerationError, match="pool size"):
        CachePool(-1)


@pytest.mark.parametrize(
    ("module", "banned"),
    [
        (
            "minicpmv_jax.model",
            ("minicpmv_jax.generate", "minicpmv_jax.chat", "minicpmv_jax.pipeline"),
        ),
        ("minicpmv_jax.generate", ("minicpmv_jax.chat", "minicpmv_jax.pipeline")),
        ("minicpmv_jax.sharding", ("minicpmv_jax.weights",)),
        ("minicpmv_jax.processor", ("jax", "minicpmv_jax.model")),
    ],
)
def test_imports_run_one_way(module, banned):
    """pipeline -> chat -> generate -> model, never back; sharding does not need weights; the
    processor needs no JAX (a fresh interpreter, so no other test's imports count)."""
    code = f"import sys, {module}; print(sorted(m for m in {banned!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_pixels_are_held_once_from_processor_to_program():
    """A sliced image's pixels live in one aligned buffer: padding to the slice bucket extends it
    in place, and XLA:CPU takes it as a program argument without copying (a 10-minute video's
    pixels are GBs; see benchmarks/vision_memory.py for the measured peak)."""
    from PIL import Image

    from minicpmv_jax.image import grow_rows
    from minicpmv_jax.processor import MiniCPMVProcessor

    proc = MiniCPMVProcessor.from_pretrained(FIXTURES / "minicpm-v-2_6" / "checkpoint")
    image = Image.open(CASES / "single_1024x768" / "image_0.png").convert("RGB")
    out = proc([{"role": "user", "content": [image, "What is it?"]}])
    n = len(out.tgt_sizes)
    assert n > 1 and out.pixel_patches.ctypes.data % 64 == 0
    batch = prepare_batch([out], Buckets(slices=(n + 3,)), proc.query_num)
    patches = batch.vision.pixel_patches
    assert patches.shape[0] == n + 3 and np.shares_memory(patches, out.pixel_patches)
    np.testing.assert_array_equal(patches[:n], out.pixel_patches)
    assert not patches[n:].any()  # the reserved rows still hold zeros
    if jax.default_backend() == "cpu":
        assert jax.device_put(patches).unsafe_buffer_pointer() == patches.ctypes.data
    # the official strips are a view rebuilt from the patches (values checked against the
    # fixtures in test_processor): indexing, slicing and equality behave as a list's
    strips = out.pixel_values
    assert len(strips) == n and strips[-1].shape == strips[n - 1].shape
    assert strips == list(strips) and strips != list(strips)[1:]
    assert all(np.array_equal(a, strips[k + 1]) for k, a in enumerate(strips[1:]))
    # a buffer not reserved by the processor is never grown: pad_to copies instead
    foreign = np.zeros(out.pixel_patches.nbytes + 64, np.uint8)[: out.pixel_patches.nbytes]
    foreign = foreign.view(np.float32).reshape(out.pixel_patches.shape)
    assert grow_rows(foreign, n + 1) is None and grow_rows(out.pixel_patches, 2 * n + 1) is None
    padded = VisionBatch.stack([{**out, "pixel_patches": foreign}]).pad_to(n + 1)
    assert not np.shares_memory(padded.pixel_patches, foreign)
