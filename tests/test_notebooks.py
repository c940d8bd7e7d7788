"""Every notebook runs end to end on the tiny fixture checkpoints (nbclient, python3 kernel).

The cell tagged "parameters" is followed by an injected cell (papermill's convention) that points
MODEL and the images at tests/fixtures and keeps generation short; the install cell does nothing
outside Colab. The kernel is this interpreter (a kernelspec written to a temporary JUPYTER_PATH).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import pytest
from conftest import FIXTURES
from train_helpers import train_checkpoint

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")
pytest.importorskip("ipykernel", reason="the test extra installs ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CASES_26 = FIXTURES / "minicpm-v-2_6" / "cases"
# per notebook on the tiny model: a guard against a notebook that grows slow, with room for the
# other test worker and other jobs sharing a 2-core CI machine
MAX_SECONDS = 180

PARAMS = {
    "quickstart": {
        "MODEL": str(FIXTURES / "minicpm-v-2_6" / "checkpoint"),
        "IMAGES": [
            str(CASES_26 / "single_1024x768" / "image_0.png"),
            str(CASES_26 / "single_448x448" / "image_0.png"),
        ],
        "QUANT": "int8",
        "MAX_NEW_TOKENS": 8,
    },
    "tpu_sharding": {
        "MODEL": str(FIXTURES / "minicpm-v-2_6" / "checkpoint"),
        "IMAGES": [str(CASES_26 / "single_448x448" / "image_0.png")],
        "MESH": (1, 2, 4),
        "BATCH": 4,
        "MAX_NEW_TOKENS": 8,
    },
    "finetune": {
        "MODEL": str(train_checkpoint("minicpm-v-2_6")),  # the training tokenizer (train MANIFEST)
        "IMAGES": [
            str(CASES_26 / "single_1024x768" / "image_0.png"),
            str(CASES_26 / "single_448x448" / "image_0.png"),
        ],
        "STEPS": 40,
        "LEARNING_RATE": 2e-2,
        "LORA_R": 8,
        "SCALE_RESOLUTION": 112,
    },
    "minicpm_v_4_6": {
        "MODEL": str(FIXTURES / "minicpm-v-4_6" / "checkpoint"),
        "IMAGES": [str(FIXTURES / "minicpm-v-4_6" / "cases" / "single_448x448" / "image_0.png")]
        * 2,
        "MAX_NEW_TOKENS": 8,
    },
    "video": {
        "MODEL": str(FIXTURES / "minicpm-v-4_5" / "checkpoint"),
        "QUANT": "int8",
        "MAX_NEW_TOKENS": 8,
    },
}


def _inject(nb, params: dict) -> None:
    """Insert a cell assigning `params` right after the cell tagged "parameters"."""
    idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(idx) == 1, "each notebook needs exactly one cell tagged 'parameters'"
    src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx[0] + 1, cell)


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, monkeypatch_module):
    """A `python3` kernelspec running this interpreter, with the repository importable."""
    from ipykernel.kernelspec import write_kernel_spec

    jupyter = tmp_path_factory.mktemp("jupyter")
    spec_dir = write_kernel_spec(str(jupyter / "kernels" / "python3"))
    spec = json.loads((pathlib.Path(spec_dir) / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    monkeypatch_module.setenv("JUPYTER_PATH", str(jupyter))
    old = os.environ.get("PYTHONPATH")
    monkeypatch_module.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + old if old else ""))
    return jupyter


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_notebook_is_clean(name):
    """Committed without outputs, one parameters cell, markdown before every code cell."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: outputs left"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "MODEL =" in tagged[0].source
    for prev, cell in zip(nb.cells, nb.cells[1:], strict=False):
        if cell.cell_type == "code":
            assert prev.cell_type == "markdown", f"{name}: code cell without explanation"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_notebook_runs(name, kernel_env, tmp_path):
    if name == "video":
        pytest.importorskip("av", reason="the video notebook needs PyAV (the video extra)")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    _inject(nb, PARAMS[name])
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},  # working directory of the kernel
    )
    t0 = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]  # fmt: skip
    assert not errors
    print(f"\n{name}: {seconds:.1f} s")
    assert seconds < MAX_SECONDS, f"{name} took {seconds:.0f} s on the tiny model"
