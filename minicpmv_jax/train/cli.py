"""`minicpmv-jax finetune` / `minicpmv-jax dpo`: fine-tune or DPO-train, resumable.

    minicpmv-jax finetune --model DIR --data train.json [--eval-data eval.json] [--lora]
        [--freeze-vision] [--mesh D,F,T] [--quant int8] [--remat {none,full,dots}]
        [--vision-remat {none,full,dots}] [--frozen-dtype bfloat16] [--lora-dropout P]
        --output OUT
    minicpmv-jax dpo --model DIR --data prefs.jsonl [--reference R] [--lora] [--beta 0.1]
        [--sft-weight 0] [--dpo-use-average] [--skip-bad-samples] (finetune's options) --output OUT

Writes OUT/metrics.jsonl, OUT/checkpoints/step_*/ (train state) and at the end OUT/adapter/
(PEFT layout, with --lora) or OUT/model/ (orbax; `minicpmv-to-safetensors` exports it); `dpo`
also OUT/reference_logps.npz (the reference log-probs, reused while the data and reference are
unchanged). Running the same command again continues from the newest save.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from minicpmv_jax.errors import MiniCPMVError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minicpmv-jax finetune", description="fine-tune MiniCPM-V (official data format)"
    )
    p.add_argument("--model", required=True, help="checkpoint folder (or hub id)")
    p.add_argument("--data", required=True, help="training JSON (official fine-tuning format)")
    p.add_argument("--eval-data", help="held-out JSON for the eval loss")
    _run_args(p)
    return p


def build_dpo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minicpmv-jax dpo",
        description="DPO on RLAIF-V preference pairs (image, question, chosen, rejected)",
    )
    p.add_argument("--model", required=True, help="checkpoint folder (or hub id): the policy")
    p.add_argument("--data", required=True, help="preference records: .json, .jsonl, .parquet")
    p.add_argument(
        "--reference",
        help="reference checkpoint (default: the starting policy; with --lora, the base model "
        "with the adapter disabled)",
    )
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (RLAIF-V scripts: 0.1)")
    p.add_argument("--sft-weight", type=float, default=0.0, help="weight of -mean chosen logp")
    p.add_argument(
        "--dpo-use-average", action="store_true", help="per-token mean log-probs, not sums"
    )
    _run_args(p)
    p.set_defaults(learning_rate=5e-7)  # RLAIF-V's scripts
    return p


def _run_args(p: argparse.ArgumentParser) -> None:
    """Options shared by finetune and dpo (the loop's settings)."""
    p.add_argument("--output", required=True, help="output folder (resumes from its saves)")
    p.add_argument("--lora", action="store_true", help="LoRA on the LLM (official setup)")
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    p.add_argument("--mesh", help="D,F,T devices over (data, fsdp, tensor); default one device")
    p.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16)")
    p.add_argument(
        "--quant",
        choices=("int8",),
        help="int8 base (LLM layers and lm_head), frozen; LoRA adapters in float32 (QLoRA-style)",
    )
    p.add_argument(
        "--frozen-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="store frozen weight matrices in this dtype (trainable ones stay float32)",
    )
    remat = ("none", "full", "dots")
    p.add_argument("--remat", choices=remat, default="none", help="decoder layers (recompute)")
    p.add_argument("--vision-remat", choices=remat, help="vision tower layers (default: --remat)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=64.0)
    p.add_argument("--lora-target", help="regex of the LoRA'd modules (default: LLM q/k/v)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="official default: 0.05")
    p.add_argument("--save-every", type=int, default=0, help="steps between saves (0: end)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evals (0: end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad-samples", action="store_true", help="skip and count bad samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(args, processor=None):
    """The model of --model (with `processor` instead of loading its own, when given)."""
    from minicpmv_jax import MiniCPMV
    from minicpmv_jax.cli import _mesh

    if args.quant and not args.lora:
        raise MiniCPMVError("--quant int8 trains LoRA adapters on the frozen int8 base: add --lora")
    model = MiniCPMV.from_pretrained(
        args.model,
        dtype=args.dtype,
        mesh=_mesh(args.mesh),
        progress=not args.no_progress,
        quant=args.quant,
        load_processor=processor is None,
    )
    if processor is not None:
        model.processor = processor
    return model


def _train_config(args):
    from minicpmv_jax import train

    lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
    if args.lora_target:
        lora["target_modules"] = args.lora_target
    if args.lora and args.freeze_vision:  # official: tune_vision false drops vpm from the copies
        lora["modules_to_save"] = ("embed_tokens", "resampler")
    return train.TrainConfig(
        mode="lora" if args.lora else "freeze_vision" if args.freeze_vision else "full",
        lora=train.LoraConfig(**lora),
        steps=args.steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        seed=args.seed,
        save_every=args.save_every,
        eval_every=args.eval_every,
        remat=args.remat,
        vision_remat=args.vision_remat,
        frozen_dtype=args.frozen_dtype,
    )


def _export(args, trained, config, what: str) -> None:
    """Write OUT/adapter (LoRA) or OUT/model and print the closing line."""
    from minicpmv_jax import train

    if args.lora:
        out = train.export_adapter(trained, f"{args.output}/adapter")
    else:
        out = train.save_merged(trained, f"{args.output}/model", overwrite=True, progress=False)
    print(f"done: step {config.steps}, {what} -> {out}")


def run(args) -> None:
    from minicpmv_jax import train

    model = _load(args)
    load = {"max_length": args.max_length, "skip_bad_samples": args.skip_bad_samples}
    examples, skipped = train.load_examples(model, args.data, **load)
    eval_examples = ()
    if args.eval_data:
        eval_examples = train.load_examples(model, args.eval_data, **load)[0]
    for e in skipped:
        logging.getLogger(__name__).warning("skipped: %s", e)
    config = _train_config(args)
    trained, history = train.finetune(
        model,
        examples,
        config,
        eval_examples=eval_examples,
        output_dir=args.output,
        progress=not args.no_progress,
        skipped=len(skipped),
    )
    last = history[-1] if history else {}
    _export(args, trained, config, f"loss {last.get('loss', float('nan')):.4f}")


def run_dpo(args) -> None:
    from minicpmv_jax import train
    from minicpmv_jax.model import resolve_checkpoint
    from minicpmv_jax.processor import MiniCPMVProcessor

    # the data is checked with the processor alone: a bad pair stops the run before the weights
    # load
    processor = MiniCPMVProcessor.from_pretrained(resolve_checkpoint(args.model))
    pairs, skipped = train.load_preferences(
        processor, args.data, max_length=args.max_length, skip_bad_samples=args.skip_bad_samples
    )
    for e in skipped:
        logging.getLogger(__name__).warning("skipped: %s", e)
    if not pairs:
        raise MiniCPMVError(f"{args.data}: no usable preference pair ({len(skipped)} skipped)")
    config = _train_config(args)
    model = _load(args, processor)
    dpo = train.DpoConfig(beta=args.beta, sft_weight=args.sft_weight, average=args.dpo_use_average)
    trained, history = train.dpo_finetune(
        model,
        pairs,
        config,
        dpo,
        reference=args.reference,
        output_dir=args.output,
        progress=not args.no_progress,
        skipped=len(skipped),
    )
    last = history[-1] if history else {}
    acc = last.get("rewards/accuracies", float("nan"))
    what = f"loss {last.get('loss', float('nan')):.4f}, reward accuracy {acc:.2f}"
    _export(args, trained, config, what)


def main(argv: Sequence[str] | None = None, *, command: str = "finetune") -> int:
    """Run `finetune` (or `dpo`) with `argv`; 2 on a MiniCPMVError, 130 on Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = (build_dpo_parser() if command == "dpo" else build_parser()).parse_args(argv)
    try:
        run_dpo(args) if command == "dpo" else run(args)
    except MiniCPMVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the newest save is intact; rerun to continue
        print("interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    return 0
