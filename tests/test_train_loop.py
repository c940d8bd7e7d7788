"""The training loop on the tiny 2.6 fixture checkpoint: it learns, resumes exactly, compiles a
bounded set of programs, writes metrics.

The processor runs at scale_resolution 112 (64 patches per image, one slice each) so a step is
cheap; everything else is the fixture model with its training tokenizer.
"""

import functools
import json

import numpy as np
import pytest
from PIL import Image
from train_helpers import train_checkpoint, train_dir

from minicpmv_jax import MiniCPMV, MiniCPMVProcessor, train
from minicpmv_jax.errors import MiniCPMVError
from minicpmv_jax.train.loss import TRACE_COUNTS

VERSION = "minicpm-v-2_6"
QA = [  # (image or None, question, answer)
    ("images/s00.png", "What is in the picture?", "A striped square."),
    ("images/s01.png", "Which color dominates?", "Mostly green."),
    ("images/s02a.png", "Describe the image.", "Red lines on white."),
    (None, "Say hello.", "Hello there friend."),
]


def qa_samples():
    out = []
    for i, (image, q, a) in enumerate(QA):
        out.append(
            {
                "id": str(i),
                "image": image if image else {},
                "conversations": [
                    {"role": "user", "content": ("<image>\n" if image else "") + q},
                    {"role": "assistant", "content": a},
                ],
            }
        )
    return out


@functools.cache
def small_model():
    """The fixture model whose processor slices at 112 px (64-patch images)."""
    folder = train_checkpoint(VERSION)
    model = MiniCPMV.from_pretrained(folder, dtype="float32", progress=False)
    model.processor = MiniCPMVProcessor.from_pretrained(folder, scale_resolution=112)
    return model


def qa_examples(model):
    examples, skipped = train.load_examples(
        model, qa_samples(), image_root=train_dir(VERSION) / "sft"
    )
    assert not skipped
    return examples


def chat_answer(model, image, question):
    content = [question]
    if image:
        with Image.open(train_dir(VERSION) / "sft" / image) as im:
            content = [im.convert("RGB"), question]
    return model.chat([{"role": "user", "content": content}], max_new_tokens=16)


@pytest.mark.parametrize("mode,lr", [("lora", 2e-2), ("full", 3e-3)])
def test_it_learns(mode, lr):
    """60 steps on four samples: the loss falls below 10% of its start and greedy chat then
    answers each trained question with its trained answer."""
    model = small_model()
    cfg = train.TrainConfig(
        mode=mode,
        steps=60,
        learning_rate=lr,
        warmup_steps=5,
        batch_size=4,
        weight_decay=0.0,
        token_buckets=(128,),
        lora=train.LoraConfig(r=8, alpha=16),
    )
    trained, history = train.finetune(model, qa_examples(model), cfg, progress=False)
    assert history[-1]["loss"] < 0.1 * history[0]["loss"], [h["loss"] for h in history]
    for image, question, answer in QA:
        assert chat_answer(trained, image, question) == answer
