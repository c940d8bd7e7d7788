"""Seconds of `MiniCPMV.from_pretrained` in a fresh process after the machine sat idle.

On a VM, memory freed by one process can go back to the host, and the next process to touch it
pays for the host backing it again; back-to-back benchmark runs (chat_memory) mostly see memory
that is still backed. This measures the other case, a first load after a quiet spell: for each
source tree in turn (our code from that tree), sleep `--idle` seconds, then load the checkpoint
in a fresh interpreter, weights and tokenizer, imports excluded.

    python -m benchmarks.load_idle --folder /tmp/chatmem/ckpt --trees . /tmp/base . /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import jax
from minicpmv_jax import MiniCPMV
t0 = time.perf_counter()
m = MiniCPMV.from_pretrained(sys.argv[1], dtype=sys.argv[2], progress=False)
jax.block_until_ready(m.state)
print(json.dumps({"load_s": time.perf_counter() - t0}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of sleep before each load")
    ap.add_argument("--trees", nargs="+", default=["."], help="source trees, in run order")
    args = ap.parse_args(argv)
    for tree in args.trees:
        time.sleep(args.idle)
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.abspath(tree))
        env.pop("XLA_FLAGS", None)
        argv_ = [
            sys.executable,
            "-P",
            "-c",
            CHILD,
            args.folder,
            args.dtype,
        ]  # -P: the tree, not the cwd
        out = subprocess.run(argv_, check=True, env=env, capture_output=True, text=True).stdout
        load = json.loads(out.strip().splitlines()[-1])["load_s"]
        print(f"{tree}: {args.dtype} load {load:.2f} s  load avg {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
