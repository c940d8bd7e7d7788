"""Fine-tuning: the official data format, exact loss and gradients, LoRA, the optax loop.

Public surface (held stable): `training_example`, `collate`, `forward_logits`, `loss_and_grads`
and the loop in `minicpmv_jax.train.loop`; preference alignment (RLAIF-V): `sequence_logps`,
`token_logps`, `dpo_loss`, `dpo_rewards`, `load_preferences`, `collate_pairs`, `dpo_finetune`.
Modules: `data` (official dataset / collator), `loss` (training forward, loss, trainable sets),
`lora` (LoRA on any regex, PEFT names and files), `loop` (the optimizer loop, pluggable
objective), `dpo` (preference data, log-probs, DPO loss, reference cache, DPO trainer).
"""

from minicpmv_jax.train.data import (
    IGNORE_INDEX,
    collate,
    load_examples,
    read_samples,
    training_example,
)
from minicpmv_jax.train.dpo import (
    DpoConfig,
    DpoTrainer,
    ReferenceLogps,
    collate_pairs,
    dpo_finetune,
    dpo_loss,
    dpo_rewards,
    load_preferences,
    preference_pair,
    read_preferences,
    reference_logps,
    sequence_logps,
    token_logps,
)
from minicpmv_jax.train.loop import TrainConfig, Trainer, finetune
from minicpmv_jax.train.lora import LoraConfig, export_adapter, save_merged
from minicpmv_jax.train.loss import forward_logits, loss_and_grads, prepare_batch

__all__ = [
    "IGNORE_INDEX",
    "DpoConfig",
    "DpoTrainer",
    "LoraConfig",
    "ReferenceLogps",
    "TrainConfig",
    "Trainer",
    "collate",
    "collate_pairs",
    "dpo_finetune",
    "dpo_loss",
    "dpo_rewards",
    "export_adapter",
    "finetune",
    "forward_logits",
    "load_examples",
    "load_preferences",
    "loss_and_grads",
    "preference_pair",
    "prepare_batch",
    "read_preferences",
    "read_samples",
    "reference_logps",
    "save_merged",
    "sequence_logps",
    "token_logps",
    "training_example",
]
