"""Stop training at the first non-finite loss or gradient, before it reaches the weights or a checkpoint.

The Trainer only filters NaN losses out of its logs: a NaN gradient is applied, the poisoned
weights are checkpointed and saved as the final model, and a re-run resumes from them. Here:

- every micro-batch's loss is checked as it is computed (`check_finite`);
- the gradients are checked after clipping, before the optimizer step (`FiniteGuard`,
  `on_pre_optimizer_step`): a NaN update is never applied;
- a checkpoint or a final model with a non-finite weight is never written (`check_finite_model`).

Each stop is a one-line `NonFiniteError` naming the step (1-based, as logged), the step's sample
ids, the last checkpoint and how to resume from it with other settings.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from transformers import TrainerCallback

from modistill.errors import UserError
from modistill.faults import crash_point

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteError(UserError):
    """Training produced a NaN/inf loss, gradient or weight; nothing of it was applied or saved."""


def last_checkpoint(checkpoints_dir: str | Path | None) -> str | None:
    """The newest complete checkpoint's name (its trainer_state.json parses), or None."""
    if checkpoints_dir is None or not Path(checkpoints_dir).is_dir():
        return None
    found = sorted(
        (
            (int(m.group(1)), p)
            for p in Path(checkpoints_dir).iterdir()
            if (m := _CHECKPOINT.match(p.name)) and p.is_dir()
        ),
        reverse=True,
    )
    for _, path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path.name
        except (OSError, ValueError):
            continue
    return None


def _ids(sample_ids) -> str:
    ids = [str(i) for i in sample_ids]
    return ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "") if ids else "unknown"


def nonfinite_message(step: int, what: str, value: float, sample_ids, checkpoints_dir: str | Path | None) -> str:
    checkpoint = last_checkpoint(checkpoints_dir)
    resume = (
        f"then rerun with --resume-with-changes to continue from {checkpoint} (or --fresh to start over)"
        if checkpoint
        else "then rerun (no checkpoint was written yet)"
    )
    return (
        f"step {step}: {what} is {value} (samples {_ids(sample_ids)}); the update was not applied and nothing "
        f"of this step is saved; lower train.learning_rate, check these samples, or use fp32/bf16 instead of "
        f"fp16, {resume}"
    )


def check_finite(loss: torch.Tensor, step: int, sample_ids, checkpoints_dir: str | Path | None = None) -> None:
    """Raise `NonFiniteError` if the micro-batch loss of (1-based) `step` is NaN or inf."""
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteError(nonfinite_message(step, "the loss", loss.item(), sample_ids, checkpoints_dir))


def grad_norm(model: torch.nn.Module) -> float:
    """The total L2 norm of the gradients (NaN or inf if any gradient is)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))


def check_finite_model(model: torch.nn.Module, what: str, state_dict: dict | None = None) -> None:
    """Refuse to save `what` (a checkpoint, the final model) when any weight is NaN or inf.

    `state_dict`: the full weights to check instead of the model's own (FSDP: the model holds shards).
    """
    weights = state_dict.items() if state_dict is not None else model.named_parameters()
    bad = [name for name, p in weights if p.is_floating_point() and not torch.isfinite(p.detach()).all()]
    if bad:
        raise NonFiniteError(
            f"refusing to save {what}: {len(bad)} tensors hold NaN/inf (first: {bad[0]}); "
            f"lower train.learning_rate and rerun with --resume-with-changes or --fresh"
        )


class FiniteGuard(TrainerCallback):
    """Checks the (clipped) gradients before every optimizer step; collects the step's sample ids."""

    def __init__(self) -> None:
        self.sample_ids: list = []

    def record(self, sample_ids) -> None:
        self.sample_ids.extend(list(sample_ids))

    def on_step_begin(self, args, state, control, **kwargs):
        self.sample_ids = []  # called before the first micro-batch of each optimizer step
        crash_point("step", state.global_step + 1)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        norm = grad_norm(model)
        if not math.isfinite(norm):
            raise NonFiniteError(
                nonfinite_message(state.global_step + 1, "the gradient norm", norm, self.sample_ids, args.output_dir)
            )


class GuardMixin:
    """For a `Trainer` subclass: installs the `FiniteGuard` and checks weights before every checkpoint save."""

    def _init_guard(self) -> None:
        self.guard = FiniteGuard()
        self.add_callback(self.guard)  # type: ignore[attr-defined]  # a Trainer method (mixed into one)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.guard.record(inputs.get("sample_ids", []))
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        check_finite_model(self.accelerator.unwrap_model(model), f"checkpoint-{self.state.global_step}")
        return super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir):
        # Between the weights and the trainer state of a checkpoint: where a kill leaves it incomplete.
        crash_point("checkpoint-save", self.state.global_step)
        return super()._save_optimizer_and_scheduler(output_dir)
