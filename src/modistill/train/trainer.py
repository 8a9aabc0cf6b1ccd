"""`DistillTrainer`: a `transformers.Trainer` whose loss is LLaVA-MoD's mimic distillation.

    loss = kd_weight * KD(teacher || student) + ce_weight * CE + balance_coef * balance   (per step)

KD and CE are sums over response tokens divided by the response-token count of the whole
accumulated batch (across devices too): gradient accumulation and data parallelism do not change
the loss. The balance loss is counted once (the official code counts it twice). Stage 0 / SFT use
the same trainer with kd_weight = 0 and no teacher. Checkpointing, resume, schedules, gradient
accumulation, logging, progress bars and distribution are the Trainer's.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from transformers import PreTrainedModel, Trainer

from modistill.errors import UserError
from modistill.guards import GuardMixin, check_finite
from modistill.losses.fused import fused_distill_loss
from modistill.moe import RouterLogitsCollector, balance_loss, expert_load, sparse_blocks, top_k_of
from modistill.train.config import LossConfig
from modistill.train.forward import model_inputs, output_head, response_states


class ResumeMixin:
    """Resume from checkpoints through `from_pretrained`, which knows the checkpoint key mapping.

    transformers 5 saves Llava and MoE weights under their legacy names (`language_model.model.*`,
    per-expert `experts.{i}.*`), but `Trainer._load_from_checkpoint` loads the file with a plain
    `load_state_dict(strict=False)`: every key misses and training silently restarts from the
    initial weights. Loading the checkpoint with `from_pretrained` converts the names back.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        inner = self.accelerator.unwrap_model(model)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not isinstance(inner, PreTrainedModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(inner.parameters()).dtype
        saved = type(inner).from_pretrained(resume_from_checkpoint, dtype=dtype)
        inner.load_state_dict(saved.state_dict(), strict=True)


class MetricsMixin:
    """Accumulates extra per-step metrics and adds their means to the Trainer's logs (TRL's pattern)."""

    def _init_metrics(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, float] = defaultdict(float)
        self._tokens_since_log = 0
        self._time_of_last_log = time.perf_counter()

    def _record(self, key: str, total: float, count: float = 1.0) -> None:
        """Add `total` over `count` items; the log shows sum(total) / sum(count) since the last log."""
        self._sums[key] += float(total)
        self._counts[key] += float(count)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (not the final summary)
            for key, total in self._sums.items():
                logs[key] = total / max(self._counts[key], 1e-12)
            now = time.perf_counter()
            logs["tokens_per_s"] = self._tokens_since_log / max(now - self._time_of_last_log, 1e-9)
            self._sums.clear()
            self._counts.clear()
            self._tokens_since_log, self._time_of_last_log = 0, now
        super().log(logs, *args, **kwargs)


class DistillTrainer(GuardMixin, ResumeMixin, MetricsMixin, Trainer):
    """Trainer for stages 0 / SFT / 1a / 1b. `teacher` is a `TeacherSource` or None."""

    # compute_loss divides token losses by the accumulated batch's token count itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, loss_config: LossConfig, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self.teacher = teacher
        self.is_moe = bool(sparse_blocks(self.model))
        self.router_collector = RouterLogitsCollector(self.model) if self.is_moe else None
        self._load_sum: torch.Tensor | None = None
        self._load_count = 0
        self._init_metrics()
        self._init_guard()
        if loss_config.kd_weight > 0 and teacher is None:
            raise UserError("loss.kd_weight > 0 needs a teacher (or a teacher cache)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.loss_config
        student_inputs, labels = model_inputs(inputs)
        states = response_states(model, student_inputs, labels)
        if states.targets.numel() == 0:
            raise UserError(f"batch with samples {inputs.get('sample_ids')} has no response token to learn from")
        teacher_target = None
        if cfg.kd_weight > 0:
            teacher_target = self.teacher.targets(inputs, states)
        weight, bias = output_head(model)
        num_items = num_items_in_batch if num_items_in_batch is not None else states.targets.numel()
        losses = fused_distill_loss(
            states.hidden, weight, teacher=teacher_target, labels=states.targets, kind=cfg.divergence,
            temperature=cfg.temperature, ce_weight=cfg.ce_weight, kd_weight=cfg.kd_weight,
            chunk_size=cfg.chunk_size, num_items=num_items, student_head_bias=bias,
            beta=cfg.jsd_beta, alpha=cfg.skew_alpha,
        )
        loss = losses["loss"]
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items counts every device's tokens, and DDP averages gradients over devices.
            loss = loss * self.accelerator.num_processes
        # Logged per token: the normalised losses times the normaliser are this micro-batch's sums.
        tokens = states.targets.numel()
        self._record("kd", losses["kd"].item() * float(num_items), tokens)
        self._record("ce", losses["ce"].item() * float(num_items), tokens)
        if self.is_moe:
            router_logits = self.router_collector.pop()
            balance = balance_loss(self.model, router_logits, student_inputs["attention_mask"])
            loss = loss + cfg.balance_coef * balance / self.current_gradient_accumulation_steps
            self._record("balance", balance.item())
            self._accumulate_load(router_logits, student_inputs["attention_mask"])
        check_finite(loss, self.state.global_step + 1, inputs.get("sample_ids", []), self.args.output_dir)
        self._tokens_since_log += int(student_inputs["attention_mask"].sum())
        return (loss, None) if return_outputs else loss

    def _accumulate_load(self, router_logits, attention_mask) -> None:
        load = expert_load(router_logits, top_k_of(self.model), attention_mask)["top1"]
        self._load_sum = load if self._load_sum is None else self._load_sum + load
        self._load_count += 1

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._load_sum is not None:
            load = self._load_sum / self._load_count
            for layer, row in zip(sorted(sparse_blocks(self.model)), load):
                for expert, share in enumerate(row.tolist()):
                    logs[f"load/L{layer}/E{expert}"] = share
            logs["load/max_share"] = float(load.max())
            self._load_sum, self._load_count = None, 0
        super().log(logs, *args, **kwargs)

