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
