"""Multi-process (multi-host) run on one machine: 2 CPU processes x 4 devices joined by
`jax.distributed` (coordinator on 127.0.0.1, gloo collectives), one global 8-device mesh.

Each process loads the fixture checkpoint process-locally (it reads the safetensors file and
places only its own devices' shards), computes prompt logits on a (2, 2, 2) mesh, runs greedy
`generate` on it (sharded KV cache, replicated tokens fetched by every process), saves an orbax
checkpoint collectively, and restores it into a different (1, 2, 4) mesh. Both logits must
equal the single-process result and the generated ids the fixture's.

Run as a script, this file is the worker: `python test_multihost.py PROCESS_ID PORT OUT_DIR`.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
CASE_VERSION = "minicpm-v-2_6"
CASE = "single_100x90"
GEN_CASE = "text_only"  # greedy, 16 new tokens (text only: one small prefill program to compile)
TIMEOUT_S = 240


def worker(process_id: int, port: int, out: pathlib.Path) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    os.environ["JAX_NUM_PROCESSES"] = "2"
    os.environ["JAX_PROCESS_ID"] = str(process_id)
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from minicpmv_jax.sharding import initialize_distributed, make_mesh

    assert initialize_distributed()  # before any other jax call
    import jax
    import numpy as np
    from conftest import FIXTURES, load_case
    from model_inputs import batch_from_case

    from minicpmv_jax import checkpoint
    from minicpmv_jax.batching import Buckets
    from minicpmv_jax.model import MiniCPMV
    from minicpmv_jax.processor import MiniCPMVProcessor

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    folder = FIXTURES / CASE_VERSION
    batch = batch_from_case(load_case(folder / "cases" / CASE), "2.6")
    kw = {"dtype": "float32", "progress": False, "load_processor": False}

    model = MiniCPMV.from_pretrained(folder / "checkpoint", mesh=make_mesh((2, 2, 2)), **kw)
    # global arrays: this process holds only the shards of its own 4 devices
    lm_head = model.state["llm"]["lm_head"]["weight"].get_value()
    assert not lm_head.is_fully_addressable and len(lm_head.addressable_shards) == 4
    np.save(out / f"logits_a_{process_id}.npy", model.prompt_logits(batch))

    # greedy decoding on the cross-process mesh, two rows so that the KV cache rows are sharded
    # over "data" (one row per process): every process reads all (replicated) tokens
    model.processor = MiniCPMVProcessor.from_pretrained(folder / "checkpoint")  # stop tokens
    model.configure_generation(Buckets(tokens=(64,), slices=(1,), new_tokens=(16,)))
    gen_case = load_case(folder / "cases" / GEN_CASE)
    gen_batch = batch_from_case(gen_case, "2.6")
    n_new = gen_case["case"]["chat_kwargs"]["max_new_tokens"]
    rows = model.generate([gen_batch, gen_batch], max_new_tokens=n_new)
    np.save(out / f"generated_{process_id}.npy", np.stack(rows))

    saved = checkpoint.save(
        out / "orbax", model, side_files_from=folder / "checkpoint", progress=False
    )
    restored = MiniCPMV.from_pretrained(saved, mesh=make_mesh((1, 2, 4)), **kw)
    np.save(out / f"logits_b_{process_id}.npy", restored.prompt_logits(batch))
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    import numpy as np
    from conftest import FIXTURES, load_case
    from model_inputs import batch_from_case

    from minicpmv_jax.model import MiniCPMV

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(i), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"multi-process run did not finish within {TIMEOUT_S} s") from None
    for p, log in zip(procs, logs, strict=True):
        tail = "\n".join(line for line in log.splitlines() if "Gloo" not in line)[-3000:]
        assert p.returncode == 0, tail

    folder = FIXTURES / CASE_VERSION
    batch = batch_from_case(load_case(folder / "cases" / CASE), "2.6")
    ref = MiniCPMV.from_pretrained(
        folder / "checkpoint", dtype="float32", progress=False, load_processor=False
    ).prompt_logits(batch)
    for stage in ("a", "b"):
        for i in range(2):
            got = np.load(tmp_path / f"logits_{stage}_{i}.npy")
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4, err_msg=f"{stage}{i}")
    want = load_case(folder / "cases" / GEN_CASE)["llm"]["generated_ids"]  # [1, n]
    for i in range(2):
        got = np.load(tmp_path / f"generated_{i}.npy")  # [2 rows, n]
        np.testing.assert_array_equal(got, np.repeat(want, 2, axis=0), err_msg=f"process {i}")


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
