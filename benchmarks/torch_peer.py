"""Peer numbers: the PyTorch transformers implementation of the same LLM on the same weights.

Our (random or loaded) LLM weights are exported with `weights.to_hf_state_dict` into a
`Qwen2ForCausalLM` (2.6) / `Qwen3ForCausalLM` (4.5) / `LlamaForCausalLM` (2.5) of the same
(possibly truncated) size, in the same dtype. Torch runs a prefill into a `StaticCache` and then
greedy single-token forwards over it (what static-cache `generate` does per step); ours runs
`Sampler.run`. A logits comparison on one prompt proves the weights were copied.

torch is an optional peer used only here: without it the section is skipped with a message.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from flax import nnx

from benchmarks import models
from benchmarks.measure import Timing

log = logging.getLogger(__name__)


def _hf_config(cfg, transformers):
    c = cfg.llm
    common = {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
    }
    if cfg.version == "4.5":
        return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
            head_dim=c.head_dim, **common
        )
    if cfg.version == "2.6":
        return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**common)
    return transformers.LlamaForCausalLM, transformers.LlamaConfig(
        head_dim=c.head_dim, attention_bias=c.qkv_bias, **common
    )


def _to_torch(a: np.ndarray, torch):
    a = np.array(a, copy=True, order="C")  # writable, contiguous
    if a.dtype.name == "bfloat16":  # numpy has no native bf16: reinterpret the bits
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def torch_device(torch) -> str:
    """The peer runs where we run: CUDA when JAX runs on a GPU, else the CPU."""
    import jax

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def build_torch_llm(model, torch, transformers):
    """transformers *ForCausalLM holding exactly our LLM weights (same dtype, same device)."""
    from minicpmv_jax.weights import to_hf_state_dict

    cls, hf_cfg = _hf_config(model.config, transformers)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[str(model.config.llm.dtype)]
    hf_cfg.dtype = dtype
    # the whole model's names (layer stacks are recognised by their full path), LLM part only
    sd = {
        k.removeprefix("llm."): v
        for k, v in to_hf_state_dict(nnx.state(model.module, nnx.Param)).items()
        if k.startswith("llm.")
    }
    with torch.device("meta"):
        ref = cls(hf_cfg)
    ref.load_state_dict({k: _to_torch(v, torch) for k, v in sd.items()}, assign=True, strict=True)
    # non-persistent buffers (rotary inv_freq) are not in the state dict: rebuild them for real
    ref.model.rotary_emb = type(ref.model.rotary_emb)(config=hf_cfg)
    return ref.to(device=torch_device(torch), dtype=dtype).eval()


def _prefill_and_decode(ref, torch, ids: np.ndarray, steps: int) -> tuple[float, float]:
    """Seconds of (prefill, steps - 1 greedy decode forwards) over a fresh StaticCache.

    The loop is the bare model call + argmax that transformers' static-cache `generate` runs per
    token, without its logits processors and stopping checks (a conservative peer).
    """
    from transformers import StaticCache

    device = ref.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.from_numpy(ids.astype(np.int64)).to(device)
    t = x.shape[1]
    cache = StaticCache(config=ref.config, max_cache_len=t + steps)
    positions = torch.arange(t + steps, device=device)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = ref(input_ids=x, past_key_values=cache, use_cache=True,
                  cache_position=positions[:t], logits_to_keep=1)  # fmt: skip
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        for i in range(steps - 1):
            out = ref(input_ids=tok, past_key_values=cache, use_cache=True,
                      cache_position=positions[t + i : t + i + 1])  # fmt: skip
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _time(fn, repeats: int) -> tuple[Timing, Timing]:
    """(prefill, decode) Timings of `fn` after one warm-up call."""
    fn()
    runs = [fn() for _ in range(repeats)]
    return Timing.of([r[0] for r in runs]), Timing.of([r[1] for r in runs])


def logits_check(model, ref, torch, ids: np.ndarray) -> dict[str, float]:
    """Last-token prefill logits, ours vs torch, on one prompt (max |diff| / max |logit|)."""
    gen = model.sampler
    conv = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids, bool),
        "tgt_sizes": np.zeros((0, 2), np.int64),
        "image_bound": np.zeros((0, 2), np.int64),
    }
    prepared = gen.prepare([conv])
    _, _, s_len = gen.cache_len(len(ids), 1)
    ours, _ = gen.prefill(prepared, s_len)
    ours = np.asarray(ours[0], np.float32)
    with torch.inference_mode():
        x = torch.from_numpy(ids[None].astype(np.int64)).to(ref.device)
        theirs = ref(x).logits[0, -1].float().cpu().numpy()
    return {
        "max_abs_diff": float(np.abs(ours - theirs).max()),
        "max_abs_logit": float(np.abs(theirs).max()),
        "argmax_equal": bool(ours.argmax() == theirs.argmax()),
    }


def run(
    model,
    *,
    prefill_tokens: int,
    decode_prompt_tokens: int,
    steps: int,
    batch_sizes,
    repeats: int,
    ours: dict[str, Any],
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """Torch prefill / decode timings and our-over-torch ratios (or a skip message)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        msg = f"skipped: PyTorch peer needs torch ({e}); pip install torch"
        log.warning(msg)
        return {"skipped": msg}
    vocab = model.config.llm.vocab_size
    t0 = time.perf_counter()
    ref = build_torch_llm(model, torch, transformers)
    if compile_mode:  # transformers' static-cache recipe: torch.compile the forward
        ref.forward = torch.compile(ref.forward, mode=compile_mode, fullgraph=True)
    out: dict[str, Any] = {
        "implementation": (
            f"transformers {transformers.__version__} {type(ref).__name__}, torch "
            f"{torch.__version__} on {ref.device}, StaticCache, "
            f"{f'torch.compile({compile_mode})' if compile_mode else 'eager'}, "
            f"{torch.get_num_threads()} threads"
        ),
        "build_s": time.perf_counter() - t0,
    }
    ids = models.text_prompt(decode_prompt_tokens, vocab)["input_ids"]
    out["logits_check"] = logits_check(model, ref, torch, ids)

    if ours.get("prefill"):
        p_ids = models.text_prompt(prefill_tokens, vocab)["input_ids"][None]
        t, _ = _time(lambda: _prefill_and_decode(ref, torch, p_ids, 1), repeats)
        ours_rate = ours["prefill"]["tokens_per_s"]["median"]
        out["prefill"] = {
            "tokens": prefill_tokens,
            "seconds": t.as_dict(),
            "tokens_per_s": t.rate(prefill_tokens),
            "ours_over_torch": ours_rate / t.rate(prefill_tokens)["median"],
        }
    out["decode"] = {}
    for b in batch_sizes:
        d_ids = np.stack(
            [models.text_prompt(decode_prompt_tokens, vocab, seed=r)["input_ids"] for r in range(b)]
        )
        _, t = _time(lambda ids=d_ids: _prefill_and_decode(ref, torch, ids, steps), repeats)
        entry = {
            "seconds": t.as_dict(),
            "forward_steps": steps - 1,
            "tokens_per_s": t.rate(b * (steps - 1)),
        }
        mine = ours["decode"]["batches"].get(str(b))
        if mine:
            entry["ours_over_torch"] = (
                mine["tokens_per_s"]["median"] / entry["tokens_per_s"]["median"]
            )
        out["decode"][str(b)] = entry
    return out
