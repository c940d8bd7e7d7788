"""Where a batch-1 decode step's time goes: the step inside the compiled loop and its parts.

Loads a checkpoint folder with `MiniCPMV.from_pretrained` and times, on the sampler's own
parameters (per-layer views and packed weights as the samplers pass them):

  loop      seconds per token of `Sampler.run`'s compiled decode loop (a text prompt of
            `--prompt-words` words, `--new-tokens` greedy tokens), as `benchmarks.chat_speed`
  step      one decode step as its own program (`generate._forward`: embedding, the decoder
            stack with its cache writes, final norm, lm_head), outside any loop
  decoder   the embedding and the decoder stack alone (`Llm.hidden`)
  lm_head   `Llm.logits` of one row alone
  sample    one greedy `sampling.sample_step` over the vocabulary
  mlp / attention   layer 0's MLP and attention block (its q/k/v/o projections, RoPE, the cache
            write and attention over the cache) alone; x the number of layers

Each part reports the weight bytes it reads and the rate (GB/s). Parts timed alone may find
their weights in the CPU's caches (a layer's MLP is 26 MB for 2.6's LLM), so their sum can
undercut the step. Medians of `--repeats` calls, after one compiling call.

    python -m benchmarks.decode_parts --checkpoint /tmp/chatmem/ckpt --dtype bfloat16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _median_ms(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _nbytes(tree) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def measure(model, *, prompt_words: int = 96, new_tokens: int = 16, repeats: int = 5) -> dict:
    """Timings (ms) and weight bytes of a batch-1 decode step's parts; see the module doc."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minicpmv_jax import generate, layers, sampling
    from minicpmv_jax.kv_cache import KVCache
    from minicpmv_jax.settings import GenerationSettings

    sampler = model.sampler
    graphdef, state = sampler.graphdef, sampler.state
    words = ("the cat sat on a mat and " * (prompt_words // 7 + 1)).split()[:prompt_words]
    output = model.processor([{"role": "user", "content": [" ".join(words)]}])
    settings = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    res: dict = {"prompt_tokens": len(output["input_ids"]), "new_tokens": new_tokens}
    with sampler.context():
        sampler.run([output], settings)  # compiles the prefill and the decode loop
        loop = []
        for _ in range(repeats):
            out = sampler.run([output], settings)
            loop.append(1e3 * out.timings["decode"] / (out.num_steps - 1))
        res["ids"] = [int(i) for i in out.sequences[0]]

        module = nnx.merge(graphdef, state)
        cfg = module.llm.cfg
        t = res["prompt_tokens"]
        cache = KVCache.init(cfg, 1, t + new_tokens, sampler.cache_dtype)
        cache = cache.replace(end=jnp.asarray(t, jnp.int32), valid=cache.valid.at[:, :t].set(True))
        tok, pos = jnp.asarray([5], jnp.int32), jnp.asarray([t], jnp.int32)
        valid = jnp.ones((1, 1), bool)

        def step(state, cache):
            return generate._forward(nnx.merge(graphdef, state), cache, tok, pos)

        def hidden(state, cache):
            m = nnx.merge(graphdef, state)
            return m.llm.hidden(m.llm.embed(tok[:, None]), pos[:, None], cache, valid)

        def logits(state, h):
            return nnx.merge(graphdef, state).llm.logits(h)

        h = jax.jit(hidden)(state, cache)[0]
        lg = jax.jit(logits)(state, h)[:, 0]
        greedy = functools.partial(
            sampling.sample_step,
            mode=settings.mode,
            params=settings.params(),
            terminators=sampler._terminators(),
        )
        s0 = sampling.SampleState.init(1, new_tokens, lg.shape[-1], jax.random.key(0))

        stack = module.llm.model.layers
        layer_graph, layer_state = nnx.split(stack)
        is_parts = lambda x: isinstance(x, layers.LayerParts)
        first = jax.tree.map(
            lambda x: layers.unpack_bf16(x.parts[0] if is_parts(x) else x[0]),
            layer_state,
            is_leaf=is_parts,
        )
        x = jnp.ones((1, 1, cfg.hidden_size), cfg.dtype)

        def mlp(first, x):
            return nnx.merge(layer_graph, first).mlp(x)

        def attention(first, x, cache):
            mask = cache.mask(jnp.asarray(t), 1)
            return nnx.merge(layer_graph, first).self_attn(x, pos[:, None], mask, cache, 0, t)

        parts = {
            "step": (jax.jit(step), (state, cache)),
            "decoder": (jax.jit(hidden), (state, cache)),
            "lm_head": (jax.jit(logits), (state, h)),
            "sample": (jax.jit(lambda s, lg: greedy(s, logits=lg)), (s0, lg)),
            "mlp": (jax.jit(mlp), (first, x)),
            "attention": (jax.jit(attention), (first, x, cache)),
        }
        layer_bytes = _nbytes(layer_state)
        head_bytes = _nbytes(nnx.state(module.llm.lm_head))
        weight_bytes = {
            "loop": layer_bytes + head_bytes,
            "step": layer_bytes + head_bytes,
            "decoder": layer_bytes,
            "lm_head": head_bytes,
            "sample": 0,
            "mlp": _nbytes(nnx.state(nnx.merge(layer_graph, first).mlp)),
            "attention": _nbytes(nnx.state(nnx.merge(layer_graph, first).self_attn)),
        }
        res["ms"] = {"loop": float(np.median(loop)), "loop_all": loop}
        for name, (fn, args) in parts.items():
            res["ms"][name] = _median_ms(lambda fn=fn, args=args: fn(*args), repeats)
    res["layers"] = cfg.num_layers
    res["weight_bytes"] = weight_bytes
    res["gb_per_s"] = {
        k: weight_bytes[k] / res["ms"][k] / 1e6 for k in weight_bytes if weight_bytes[k]
    }
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=pathlib.Path, required=True, help="checkpoint folder")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-words", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import jax

    from minicpmv_jax import MiniCPMV

    model = MiniCPMV.from_pretrained(args.checkpoint, dtype=args.dtype, progress=False)
    res = measure(
        model, prompt_words=args.prompt_words, new_tokens=args.new_tokens, repeats=args.repeats
    )
    res["command"] = "python -m benchmarks.decode_parts " + " ".join(argv or sys.argv[1:])
    res["device"] = jax.devices()[0].device_kind
    res["load_average"] = os.getloadavg()
    n = res["layers"]
    print(
        f"{args.dtype}, {n} layers, prompt {res['prompt_tokens']} tokens, load {res['load_average']}"
    )
    for name, ms in res["ms"].items():
        if name == "loop_all":
            continue
        rate = res["gb_per_s"].get(name)
        extra = f"  x {n} layers = {ms * n:7.2f} ms" if name in ("mlp", "attention") else ""
        print(f"  {name:10s} {ms:8.2f} ms" + (f"  {rate:5.1f} GB/s" if rate else "") + extra)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
