"""Compiled memory of the beam-search decode program: how much the KV cache reorder costs.

Beam search reorders the cache rows of the N beams after every step (transformers'
``_reorder_cache``). The program is compiled, not run, on an abstract model (shapes only), and
``compiled.memory_analysis()`` gives what XLA plans: arguments, outputs, temporaries and the bytes
an output shares with a donated argument (alias). Memory figures are deterministic, so they are
valid on a busy machine (timings would not be).

    python -m benchmarks.beam_cache --layers 4 --vocab 8192 --prompt-tokens 8000 --beams 3

(float32, a small vocabulary: the cache, not the weights or their bf16 -> f32 copies, dominates).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from flax import nnx

from benchmarks.models import preset_processor
from minicpmv_jax.batching import Buckets
from minicpmv_jax.config import PRESETS
from minicpmv_jax.model import MiniCPMV


def beam_memory(
    preset: str,
    layers: int,
    vocab: int | None,
    dtype: str,
    prompt_tokens: int,
    max_new_tokens: int,
    beams: int,
) -> dict:
    """Decode-program memory (MiB) of one beam-search request on a truncated preset."""
    base = PRESETS[preset].with_dtype(dtype)
    llm = dataclasses.replace(base.llm, num_layers=layers, vocab_size=vocab or base.llm.vocab_size)
    config = dataclasses.replace(base, llm=llm)
    graphdef, abstract = MiniCPMV.abstract_module(config)
    model = MiniCPMV(config, nnx.merge(graphdef, abstract), preset_processor(preset, 64))
    sampler = model.configure_generation(Buckets())
    report = sampler.memory_report(1, prompt_tokens, max_new_tokens, num_beams=beams)
    d = report["decode"]
    mib = 1 << 20
    return {
        "preset": preset,
        "llm_layers": layers,
        "vocab_size": llm.vocab_size,
        "dtype": dtype,
        "num_beams": beams,
        "cache_len": report["cache_len"],
        "new_token_bucket": report["new_token_bucket"],
        "kv_cache_mib (B * N rows)": round(report["kv_cache_bytes"] / mib, 1),
        "decode_argument_mib": round(d["argument_bytes"] / mib, 1),
        "decode_output_mib": round(d["output_bytes"] / mib, 1),
        "decode_alias_mib": round(d["alias_bytes"] / mib, 1),
        "decode_temp_mib": round(d["temp_bytes"] / mib, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.beam_cache", description=__doc__)
    p.add_argument("--preset", choices=("2.6", "4.5"), default="2.6")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=None, help="smaller vocabulary: cache-bound")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-tokens", type=int, default=2000)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beams", type=int, default=3)
    a = p.parse_args(argv)
    row = beam_memory(
        a.preset, a.layers, a.vocab, a.dtype, a.prompt_tokens, a.max_new_tokens, a.beams
    )
    row["command"] = "python -m benchmarks.beam_cache " + " ".join(argv or sys.argv[1:])
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
