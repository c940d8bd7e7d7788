"""Training benchmark: tokens/s and MFU of one train step, ours and the PyTorch peer's.

    python -m benchmarks.train_step --preset 2.6 --layers 1 --vocab 8192 --seq 256 --batch 1
    python -m benchmarks.train_step --preset 2.6 --layers 1 --steps full lora --remat none full
    python -m benchmarks.train_step --preset 2.6 --layers 1 --batch 2 --steps dpo dpo_lora

Real layer widths (hidden, heads, MLP of the preset), truncated depth, random weights, a
text-only batch of `--batch` rows x `--seq` tokens with every label trained. Each step kind is a
function `jax_<kind>(bench, batch, remat)` / `torch_<kind>(bench, batch, remat)` registered in
STEP_KINDS: "full" (every LLM weight, AdamW) and "lora" (LoRA r 64 / alpha 64 on the LLM's
q/k/v, AdamW on the adapters only; "lora_delta" the same with our LoRA as a weight delta,
`TrainConfig(lora_path="delta")`, against the same peer, timed once per run; "full_base"
the same as "full" with `train.loop.SPLIT_TRAINABLE_LAYERS` and `SCALAR_CLIP` off, the CPU
step before those changes), "dpo" /
"dpo_lora" (the same weights trained with RLAIF-V's DPO loss: the batch's first half of rows
are the chosen answers, the second half the rejected ones of the same pairs, one forward +
backward over all rows, summed label log-probs per row, -logsigmoid(beta * margin) against fixed
reference log-probs; `--batch` must be even). A new kind adds its pair.

Ours: `train.Trainer`'s jitted, donated step (loss, gradients, clipping, AdamW update). The peer:
the transformers model of the same LLM (`benchmarks.torch_peer.build_torch_llm`, our weights)
running the official trainer's step: forward, the official loss (cross-entropy over the already
shifted labels), backward, gradient clipping, `torch.optim.AdamW`; LoRA as PEFT computes it
(x A^T B^T * alpha / r added to q/k/v; peft itself is not a dependency), remat as
`gradient_checkpointing_enable()`. The first step's losses are compared (same weights, batch).

MFU = model FLOPs / step seconds / the matmul rate measured in the same run (best of repeats,
`benchmarks.measure.measure_matmul` in the compute dtype). Model FLOPs: 6 N T (full) or 4 N T
(LoRA: the frozen weights need no weight gradient) for the LLM's projection and lm_head
parameters N, plus 3 (full) / 2 (LoRA) x the causal attention matmuls 4 B T^2 N H per layer;
rematerialisation does not count (it is model, not hardware, FLOPs). Seconds are the median of
`--repeats` steps after one warm-up step; the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from benchmarks import measure, models

log = logging.getLogger(__name__)
LORA_R, LORA_ALPHA = 64, 64.0


@dataclasses.dataclass
class Batch:
    ids: np.ndarray  # int [B, T]
    labels: np.ndarray  # int [B, T], already shifted (official dataset convention)

    @property
    def tokens(self) -> int:
        return int(self.ids.size)


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq + 1))
    return Batch(ids[:, :-1].astype(np.int32), ids[:, 1:].astype(np.int32))


def build(preset: str, layers: int, vocab: int | None, dtype: str, seed: int = 0) -> models.Bench:
    """A random-weight model of the preset's widths, `layers` decoder layers, the vision tower
    reduced to one layer (text-only batches never run it), and `vocab` rows if given."""
    full = models.PRESETS[preset].with_dtype(dtype)
    cfg = models._truncate_config(full, layers, 1)
    if vocab is not None:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=vocab))
    processor = models.preset_processor(full.version, full.query_num)
    model = models.init_random(cfg, seed, processor)
    jax.block_until_ready(model.state)
    truncated = {"llm_layers": [cfg.llm.num_layers, full.llm.num_layers]}
    if vocab is not None:
        truncated["vocab"] = [vocab, full.llm.vocab_size]
    return models.Bench(model, f"random weights (preset {preset})", truncated, None)


def step_flops(cfg, batch: Batch, kind: str) -> float:
    """Model FLOPs of one train step of `kind` (see the module docstring)."""
    c = cfg.llm
    d, n, k, h, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    per_layer = d * n * h * 2 + 2 * d * k * h + 3 * d * f
    params = c.num_layers * per_layer + d * c.vocab_size
    b, t = batch.ids.shape
    attention = c.num_layers * 4 * b * t * t * n * h
    passes = 2 if kind in ("lora", "lora_delta", "dpo_lora") else 3
    return passes * (2 * params * b * t + attention)


# ---------------------------------------------------------------------------------------------
# Our steps
# ---------------------------------------------------------------------------------------------


def _examples(batch: Batch) -> list[dict[str, Any]]:
    t = batch.ids.shape[1]
    return [
        {
            "input_ids": ids,
            "labels": labels,
            "position_ids": np.arange(t, dtype=np.int64),
            "attention_mask": np.ones(t, bool),
            "image_bound": np.zeros((0, 2), np.int64),
            "tgt_sizes": np.zeros((0, 2), np.int32),
            "pixel_values": [],
        }
        for ids, labels in zip(batch.ids, batch.labels, strict=True)
    ]


def _jax_trainer_step(bench, batch: Batch, remat: str, config: dict) -> Callable:
    """A zero-argument function running one of `Trainer`'s train steps (state donated)."""
    from minicpmv_jax import train

    b, t = batch.ids.shape
    cfg = train.TrainConfig(
        steps=10**6,
        batch_size=b,
        max_length=t + 1,
        token_buckets=(t,),
        slice_buckets=None,  # text-only: no vision program
        remat=remat,
        **config,
    )
    trainer = train.Trainer(bench.model, _examples(batch), cfg)
    arrays, groups = trainer._device_batch(trainer.micro_batch(0))
    args = (trainer.frozen, trainer.loaded, arrays)
    compiled = trainer._step.lower(trainer.state, *args, num_groups=groups).compile()
    memory = compiled.memory_analysis()
    info = {"temp_bytes": int(memory.temp_size_in_bytes)} if memory is not None else {}

    def step():
        trainer.state, metrics = compiled(trainer.state, *args)
        return float(metrics["loss"])

    step.info = info
    return step


def jax_full(bench, batch: Batch, remat: str) -> Callable:
    return _jax_trainer_step(bench, batch, remat, {"mode": "full"})


def jax_full_base(bench, batch: Batch, remat: str) -> Callable:
    """`full` as the CPU step was before `train.loop.SPLIT_TRAINABLE_LAYERS` and
    `train.loop.SCALAR_CLIP` (the trainable decoder stack stacked and scanned, optax's clip):
    the before row of an A/B in one run."""
    from minicpmv_jax.train import loop

    saved = loop.SPLIT_TRAINABLE_LAYERS, loop.SCALAR_CLIP
    loop.SPLIT_TRAINABLE_LAYERS = loop.SCALAR_CLIP = False
    try:
        return jax_full(bench, batch, remat)
    finally:
        loop.SPLIT_TRAINABLE_LAYERS, loop.SCALAR_CLIP = saved


def jax_lora(bench, batch: Batch, remat: str, lora_path: str = "input") -> Callable:
    from minicpmv_jax import train

    lora = train.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, modules_to_save=())
    config = {"mode": "lora", "lora": lora, "lora_path": lora_path}
    return _jax_trainer_step(bench, batch, remat, config)


def jax_lora_delta(bench, batch: Batch, remat: str) -> Callable:
    return jax_lora(bench, batch, remat, "delta")


DPO_BETA = 0.1


def _reference_logps(batch: Batch) -> np.ndarray:
    """Fixed reference log-probs [B] of the rows (a precomputed pass in a real run): any values
    give the same step cost; these make the first losses differ from log 2."""
    return -np.linspace(1.0, 2.0, batch.ids.shape[0]).astype(np.float32) * batch.ids.shape[1]


def _jax_dpo_step(bench, batch: Batch, remat: str, config: dict) -> Callable:
    """One of `train.DpoTrainer`'s steps (state donated) on the batch's rows as pairs."""
    from minicpmv_jax import train

    b, t = batch.ids.shape
    if b % 2:
        raise SystemExit(f"dpo steps need an even --batch (chosen + rejected rows), got {b}")
    rows = _examples(batch)
    p = b // 2
    pairs = [{"id": str(i), "chosen": rows[i], "rejected": rows[p + i]} for i in range(p)]
    ref_logps = _reference_logps(batch)
    reference = train.ReferenceLogps(
        ref_logps[:p], ref_logps[p:], np.full(p, t), np.full(p, t), key="benchmark"
    )
    cfg = train.TrainConfig(
        steps=10**6,
        batch_size=p,
        max_length=t + 1,
        token_buckets=(t,),
        slice_buckets=None,  # text-only: no vision program
        remat=remat,
        **config,
    )
    trainer = train.DpoTrainer(bench.model, pairs, cfg, train.DpoConfig(beta=DPO_BETA), reference)
    arrays, groups = trainer._device_batch(trainer.micro_batch(0))
    args = (trainer.frozen, trainer.loaded, arrays)
    compiled = trainer._step.lower(trainer.state, *args, num_groups=groups).compile()
    memory = compiled.memory_analysis()
    info = {"temp_bytes": int(memory.temp_size_in_bytes)} if memory is not None else {}

    def step():
        trainer.state, metrics = compiled(trainer.state, *args)
        return float(metrics["loss"])

    step.info = info
    return step


def jax_dpo(bench, batch: Batch, remat: str) -> Callable:
    return _jax_dpo_step(bench, batch, remat, {"mode": "full"})


def jax_dpo_lora(bench, batch: Batch, remat: str) -> Callable:
    from minicpmv_jax import train

    lora = train.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, modules_to_save=())
    return _jax_dpo_step(bench, batch, remat, {"mode": "lora", "lora": lora})


# ---------------------------------------------------------------------------------------------
# The PyTorch peer's steps
# ---------------------------------------------------------------------------------------------


def _torch_model(bench, remat: str):
    import torch
    import transformers

    from benchmarks.torch_peer import build_torch_llm

    ref = build_torch_llm(bench.model, torch, transformers)
    ref.train()
    if remat != "none":  # transformers' per-layer checkpointing (recomputes the whole layer)
        ref.gradient_checkpointing_enable({"use_reentrant": False})
    return ref, torch


def _xent_loss(torch, logits, labels):
    # official CPMTrainer.compute_loss: no shift (labels are shifted by the dataset)
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def _dpo_loss(torch, logits, labels, ref_logps):
    """RLAIF-V: get_batch_logps_minicpm (drop the last position, log_softmax, gather, sum over
    label tokens) on the concatenated [chosen; rejected] rows, then dpo_loss(...).mean()."""
    labels = labels[:, :-1].clone()
    logits = logits[:, :-1, :].float()
    mask = labels != -100
    labels[labels == -100] = 0
    per_token = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    logps = (per_token * mask).sum(-1)
    p = logps.shape[0] // 2
    margin = (logps[:p] - logps[p:]) - (ref_logps[:p] - ref_logps[p:])
    return -torch.nn.functional.logsigmoid(DPO_BETA * margin).mean()


def _torch_step(ref, torch, batch: Batch, params, objective: str = "xent") -> Callable:
    device = ref.device
    ids = torch.from_numpy(batch.ids.astype(np.int64)).to(device)
    labels = torch.from_numpy(batch.labels.astype(np.int64)).to(device)
    ref_logps = torch.from_numpy(_reference_logps(batch)).to(device)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)

    def step():
        logits = ref(input_ids=ids).logits
        if objective == "dpo":
            loss = _dpo_loss(torch, logits, labels, ref_logps)
        else:
            loss = _xent_loss(torch, logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    return step


def torch_full(bench, batch: Batch, remat: str, objective: str = "xent") -> Callable:
    ref, torch = _torch_model(bench, remat)
    return _torch_step(ref, torch, batch, [p for p in ref.parameters()], objective)


def torch_lora(bench, batch: Batch, remat: str, objective: str = "xent") -> Callable:
    ref, torch = _torch_model(bench, remat)

    class LoraLinear(torch.nn.Module):  # peft's LoRA Linear forward (dropout 0)
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.lora_A = torch.nn.Linear(base.in_features, LORA_R, bias=False)
            self.lora_B = torch.nn.Linear(LORA_R, base.out_features, bias=False)
            self.lora_A.to(base.weight.dtype)
            self.lora_B.to(base.weight.dtype)
            torch.nn.init.zeros_(self.lora_B.weight)

        def forward(self, x):
            return self.base(x) + self.lora_B(self.lora_A(x)) * (LORA_ALPHA / LORA_R)

    for p in ref.parameters():
        p.requires_grad_(False)
    for layer in ref.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, LoraLinear(getattr(attn, name)))
    if remat != "none":
        ref.enable_input_require_grads()  # checkpointing needs a grad path from the inputs
    params = [p for p in ref.parameters() if p.requires_grad]
    return _torch_step(ref, torch, batch, params, objective)


def torch_dpo(bench, batch: Batch, remat: str) -> Callable:
    return torch_full(bench, batch, remat, "dpo")


def torch_dpo_lora(bench, batch: Batch, remat: str) -> Callable:
    return torch_lora(bench, batch, remat, "dpo")


STEP_KINDS: dict[str, tuple[Callable, Callable]] = {
    "full": (jax_full, torch_full),
    "full_base": (jax_full_base, torch_full),
    "lora": (jax_lora, torch_lora),
    "lora_delta": (jax_lora_delta, torch_lora),
    "dpo": (jax_dpo, torch_dpo),
    "dpo_lora": (jax_dpo_lora, torch_dpo_lora),
}


# ---------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------


def time_step(make: Callable[[], Callable], repeats: int) -> dict[str, Any]:
    """Build, compile / warm up (first call, reported apart), then `repeats` timed steps."""
    t0 = time.perf_counter()
    step = make()
    t1 = time.perf_counter()
    first_loss = step()
    t2 = time.perf_counter()
    seconds = []
    for _ in range(repeats):
        s = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - s)
    return {
        "build_s": t1 - t0,
        "first_step_s": t2 - t1,
        "first_loss": first_loss,
        "seconds": measure.Timing.of(seconds),
        **getattr(step, "info", {}),
    }


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    bench = build(args.preset, args.layers, args.vocab, args.dtype)
    cfg = bench.config
    batch = make_batch(args.batch, args.seq, cfg.llm.vocab_size)
    mm = measure.measure_matmul(args.matmul_n, cfg.llm.dtype, repeats=10)
    rate = mm["flops_per_s"]["max"]
    report: dict[str, Any] = {
        "command": "python -m benchmarks.train_step " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": measure.machine_info(),
        "versions": measure.versions(),
        "load_average_start": measure.load_average(),
        "model": {"source": bench.source, "truncated": bench.truncated, "dtype": args.dtype},
        "batch": {"rows": args.batch, "seq": args.seq, "tokens": batch.tokens},
        "matmul": mm,
        "steps": [],
    }
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        torch = None
        report["torch"] = "skipped: torch is not installed"
    peer_rows: dict[tuple, dict] = {}  # (peer function, remat) -> its row: timed once per run
    for kind in args.steps:
        ours_fn, peer_fn = STEP_KINDS[kind]
        flops = step_flops(cfg, batch, kind)
        for remat in args.remat:
            impls = [("ours", ours_fn)] + ([("torch", peer_fn)] if torch and args.torch else [])
            for impl, fn in impls:
                if impl == "torch" and (fn, remat) in peer_rows:
                    row = dict(
                        peer_rows[fn, remat], kind=kind, timed_as=peer_rows[fn, remat]["kind"]
                    )
                    report["steps"].append(row)
                    continue
                log.info("%s %s remat=%s", impl, kind, remat)
                r = time_step(lambda fn=fn, remat=remat: fn(bench, batch, remat), args.repeats)
                t = r["seconds"]
                row = {
                    "kind": kind,
                    "remat": remat,
                    "impl": impl,
                    **{k: v for k, v in r.items() if k != "seconds"},
                    "seconds": t.as_dict(),
                    "tokens_per_s": t.rate(batch.tokens),
                    "model_flops": flops,
                    "mfu": flops / t.median / rate,
                    "load_average": measure.load_average(),
                }
                report["steps"].append(row)
                if impl == "torch":
                    peer_rows[fn, remat] = row
                print(
                    f"{impl:5s} {kind:8s} remat={remat:4s} {t.median:8.3f} s "
                    f"{batch.tokens / t.median:8.1f} tok/s MFU {row['mfu']:.1%} "
                    f"loss {r['first_loss']:.5f}",
                    flush=True,
                )
                import gc

                gc.collect()
    for row in report["steps"]:
        if row["impl"] != "ours":
            continue
        peer = [
            p
            for p in report["steps"]
            if p["impl"] == "torch" and (p["kind"], p["remat"]) == (row["kind"], row["remat"])
        ]
        if peer:
            row["ours_over_torch"] = (
                row["tokens_per_s"]["median"] / peer[0]["tokens_per_s"]["median"]
            )
            row["first_loss_vs_torch"] = abs(row["first_loss"] - peer[0]["first_loss"])
    report["load_average_end"] = measure.load_average()
    return report


def markdown(report: dict[str, Any]) -> str:
    rate = report["matmul"]["flops_per_s"]["max"]
    lines = [
        (
            f"matmul rate {rate / 1e9:.1f} GFLOP/s ({report['matmul']['dtype']}, n "
            f"{report['matmul']['n']}); load average {report['load_average_start']} -> "
            f"{report['load_average_end']}"
        ),
        "",
        (
            "| step | remat | impl | seconds (min-max) | tokens/s | MFU | ours / torch "
            "| temp memory | first loss |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["steps"]:
        s = r["seconds"]
        ratio = f"{r['ours_over_torch']:.2f}x" if "ours_over_torch" in r else ""
        temp = f"{r['temp_bytes'] / 2**20:.0f} MiB" if "temp_bytes" in r else ""
        impl = r["impl"] + (f" (the {r['timed_as']} row)" if "timed_as" in r else "")
        lines.append(
            f"| {r['kind']} | {r['remat']} | {impl} | {s['median']:.2f} "
            f"({s['min']:.2f}-{s['max']:.2f}) | {r['tokens_per_s']['median']:.1f} "
            f"| {r['mfu']:.1%} | {ratio} | {temp} | {r['first_loss']:.5f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__)
    p.add_argument("--preset", default="2.6", choices=("2.6", "4.5"))
    p.add_argument("--layers", type=int, default=1, help="decoder layers (real widths)")
    p.add_argument("--vocab", type=int, help="vocabulary rows (default: the preset's)")
    p.add_argument("--dtype", default="float32", help="float32 (CPU) or bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", nargs="+", default=["full", "lora"], choices=list(STEP_KINDS))
    p.add_argument("--remat", nargs="+", default=["none", "full"], choices=("none", "full"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip the peer")
    p.add_argument("--out", default=None, help="JSON report (default: results/train-*.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(args, argv)
    out = pathlib.Path(
        args.out
        or pathlib.Path(__file__).parent
        / "results"
        / f"train-{args.preset}-{jax.default_backend()}-{args.dtype}.json"
    )
    out.write_text(json.dumps(report, indent=1, default=_default) + "\n")
    print(markdown(report))
    print(f"report: {out}")
    return 0


def _default(x):
    if isinstance(x, measure.Timing):
        return x.as_dict()
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


if __name__ == "__main__":
    raise SystemExit(main())
