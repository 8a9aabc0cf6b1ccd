"""Training steps as the trainers run them, on text-only Qwen3 models (B2, B3, B4).

Every step is the trainer's own `training_step` (forward, loss, backward), then what the Trainer does
after it: gradient clipping at 1.0, the optimizer step, zero_grad. All trainers share one student and
one AdamW (`Trainer.create_optimizer`, the Trainer's default `adamw_torch_fused`), so the optimizer
work is the same in every variant.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import torch
from transformers import Trainer, TrainingArguments

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

_TMP = tempfile.mkdtemp(prefix="modistill-bench-")


def training_args(**overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=_TMP,
        report_to=[],
        use_cpu=True,
        learning_rate=1e-5,
        max_grad_norm=1.0,
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        per_device_train_batch_size=4,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def ce_trainer(student, args: TrainingArguments | None = None) -> Trainer:
    """The Trainer's own SFT step: the model's CE loss on full logits (transformers' ForCausalLMLoss)."""
    return Trainer(model=student, args=args or training_args())


def distill_trainer(student, teacher_source, args: TrainingArguments | None = None, **loss):
    """The stage trainer `modistill train` builds: stage 0's CE trainer for kd_weight 0, else stage 1a's
    (stage 1b's for an MoE student)."""
    from modistill.moe import sparse_blocks
    from modistill.stages.align import CELoss, CETrainer
    from modistill.stages.mimic_dense import KDLoss, MimicTrainer
    from modistill.stages.mimic_sparse import SparseKDLoss, SparseMimicTrainer

    args = args or training_args()
    if loss.get("kd_weight") == 0:
        return CETrainer(model=student, args=args, loss_config=CELoss())
    if sparse_blocks(student):
        return SparseMimicTrainer(model=student, args=args, loss_config=SparseKDLoss(**loss), teacher=teacher_source)
    loss.pop("balance_coef", None)  # a dense student has no router to balance
    return MimicTrainer(model=student, args=args, loss_config=KDLoss(**loss), teacher=teacher_source)


def gkd_trainer(student, teacher, **overrides):
    """TRL 1.16 GKDTrainer, lmbda=0 (no on-policy generation), beta=0 (forward KL), no Liger, no checkpointing.

    `overrides` replace GKDConfig fields (the GPU benchmark: bf16, use_cpu=False, use_liger_kernel).
    """
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from modistill.models.tiny import tiny_tokenizer

    kwargs = dict(
        output_dir=_TMP,
        lmbda=0.0,
        beta=0.0,
        bf16=False,
        use_cpu=True,
        report_to=[],
        activation_checkpointing=False,
        learning_rate=1e-5,
        max_grad_norm=1.0,
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        per_device_train_batch_size=4,
    )
    config = GKDConfig(**{**kwargs, **overrides})
    # GKDTrainer needs a dataset and a tokenizer to be built; compute_loss uses neither.
    dummy = Dataset.from_list([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    return GKDTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=dummy, processing_class=tiny_tokenizer()
    )


def num_items(batch: dict) -> torch.Tensor:
    """What Trainer.get_batch_samples passes: response tokens after the causal shift."""
    return batch["labels"][:, 1:].ne(-100).sum()


def model_batch(batch: dict) -> dict:
    """The keys a transformers model accepts (the Trainer's remove_unused_columns would drop the rest)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


class StepRunner:
    """One shared optimizer; `step(trainer, batch)` = training_step + clip + optimizer step + zero_grad."""

    def __init__(self, student, optimizer_owner: Trainer):
        self.student = student
        self.optimizer = optimizer_owner.create_optimizer()
        self.params = [p for p in student.parameters() if p.requires_grad]

    def step(self, trainer: Trainer, batch: dict) -> float:
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop for each optimizer step
        loss = trainer.training_step(self.student, batch, num_items(batch) if "labels" in batch else None)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def bind(self, trainer: Trainer, batch: dict) -> Callable[[], float]:
        return lambda: self.step(trainer, batch)


def teacher_forward(teacher, batch: dict) -> Callable[[], None]:
    """The teacher's plain forward (full logits, no gradient), as a KD step would run it."""

    def go() -> None:
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    return go


def plain_kd_step(runner: StepRunner, teacher, batch: dict) -> Callable[[], float]:
    """Plain KD: full fp32 logits of both models, F.kl_div on the shifted response positions."""
    import torch.nn.functional as F

    def go() -> float:
        student = runner.student
        student.train()
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        with torch.no_grad():
            teacher_logits = teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
        mask = batch["labels"][:, 1:] != -100
        student_logp = F.log_softmax(logits[:, :-1][mask].float(), -1)
        teacher_logp = F.log_softmax(teacher_logits[:, :-1][mask].float(), -1)
        loss = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum") / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(runner.params, 1.0)
        runner.optimizer.step()
        runner.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return go
