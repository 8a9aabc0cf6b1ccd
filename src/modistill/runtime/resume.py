"""Continuing a stage across runs: what changed since it started, new hyper-parameters, the time of every segment.

- `config_changes` names the keys whose values differ between the saved and the current config.
- `ApplyLearningRate` makes a resume with a changed `train.learning_rate` (`--resume-with-changes`)
  train at the new rate: the Trainer restores the optimizer and scheduler from the checkpoint, and
  with them the old rate; the schedule's shape (warm-up, decay) is kept and rescaled.
- `SegmentClock` stores the cumulative training time in every checkpoint (`runtime.json`), so a
  resumed run's `metrics.json` reports the time of the whole run, not of its last segment.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

RUNTIME_FILE = "runtime.json"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved_yaml: str, current_yaml: str) -> list[str]:
    """["train.learning_rate: 1000000.0 -> 0.001", ...] for every key whose value differs."""
    old, new = _flatten(yaml.safe_load(saved_yaml) or {}), _flatten(yaml.safe_load(current_yaml) or {})
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


class ApplyLearningRate(TrainerCallback):
    """On resume, scale the restored optimizer/scheduler rates to `new_lr` (the schedule keeps its shape).

    The old rate is the restored scheduler's base rate, so every process (each has its own optimizer
    replica under data parallelism) computes the same ratio from the same checkpoint.
    """

    def __init__(self, new_lr: float):
        self.new_lr = new_lr

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        # Called after the Trainer loaded the checkpoint's optimizer and scheduler states.
        base_lrs = getattr(lr_scheduler, "base_lrs", None)
        if optimizer is None or not base_lrs or not base_lrs[0] or base_lrs[0] == self.new_lr:
            return
        ratio = self.new_lr / base_lrs[0]
        for group in optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        lr_scheduler.base_lrs = [lr * ratio for lr in base_lrs]
        if hasattr(lr_scheduler, "_last_lr"):  # what the Trainer logs as this step's learning_rate
            lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def prior_runtime(checkpoint: str | Path | None) -> float:
    """Training seconds before `checkpoint` (0 for a fresh run or a checkpoint without the record)."""
    if checkpoint is None:
        return 0.0
    try:
        return float(json.loads((Path(checkpoint) / RUNTIME_FILE).read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


class SegmentClock(TrainerCallback):
    """Training time of the whole run: earlier segments (from the resumed checkpoint) plus this one."""

    def __init__(self, resume_from: str | Path | None):
        self.prior = prior_runtime(resume_from)
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def total(self) -> float:
        return self.prior + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            (checkpoint / RUNTIME_FILE).write_text(json.dumps({"train_seconds": self.total()}))
