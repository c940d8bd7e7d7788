"""The training memory plan: trainable element counts equal the official trainer's (fixture
batch.json) for every mode and version; the README table is what the planner prints."""

import json
import pathlib

import pytest
from conftest import FIXTURES
from train_helpers import TRAIN_VERSIONS, train_dir

from minicpmv_jax.config import MiniCPMVConfig
from minicpmv_jax.train import memory
from minicpmv_jax.train.lora import LoraConfig


@pytest.mark.parametrize("version", TRAIN_VERSIONS)
@pytest.mark.parametrize("mode", ["full", "freeze_vision", "lora"])
def test_trainable_elements_match_official(version, mode):
    cfg = MiniCPMVConfig.from_pretrained(FIXTURES / version / "checkpoint", dtype="float32")
    meta = json.loads((train_dir(version) / "batch" / "batch.json").read_text())
    p = memory.plan(cfg, mode=mode, lora=LoraConfig(r=8, alpha=16))
    assert p.trainable_elements == meta["modes"][mode]["n_trainable_elements"]
    assert p.grads == p.master == 4 * p.trainable_elements  # one device: nothing sharded
    assert p.optimizer == 2 * p.grads


def test_readme_table(capsys):
    memory.main()
    table = capsys.readouterr().out.strip()
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert table in readme, "README training table out of date: python -m minicpmv_jax.train.memory"
