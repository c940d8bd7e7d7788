"""Fine-tuning: the official data format, exact loss and gradients, LoRA, the optax loop.

Public surface (held stable): `training_example`, `collate`, `forward_logits`, `loss_and_grads`
and the loop in `minicpmv_jax.train.loop`. Modules: `data` (official dataset / collator), `loss`
(training forward, loss, trainable sets), `lora` (LoRA on any regex, PEFT names and files).
"""

from minicpmv_jax.train.data import (
    IGNORE_INDEX,
    collate,
    load_examples,
    read_samples,
    training_example,
)
from minicpmv_jax.train.lora import LoraConfig, export_adapter, save_merged
from minicpmv_jax.train.loop import TrainConfig, Trainer, finetune
from minicpmv_jax.train.loss import forward_logits, loss_and_grads, prepare_batch

__all__ = [
    "IGNORE_INDEX",
    "LoraConfig",
    "TrainConfig",
    "Trainer",
    "collate",
    "export_adapter",
    "finetune",
    "forward_logits",
    "load_examples",
    "loss_and_grads",
    "prepare_batch",
    "read_samples",
    "save_merged",
    "training_example",
]
