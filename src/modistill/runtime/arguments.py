"""From a stage's `train:` section to `transformers.TrainingArguments`, and the small Trainer helpers
every stage shares (a wall-clock budget, the first N samples)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from modistill.errors import UserError
from modistill.runtime.config import TrainArgs

# `train:` keys that are modistill's own, not TrainingArguments fields.
_OWN_KEYS = {"max_time_s"}
# Keys whose TrainingArguments name differs (transformers 5 deprecates `gradient_checkpointing`).
_RENAMED = {"gradient_checkpointing": "activation_checkpointing"}


def training_arguments(output_dir: str | Path, train: TrainArgs) -> TrainingArguments:
    """TrainingArguments for a stage whose checkpoints live in `output_dir/checkpoints`.

    Every `train:` key maps by name (TrainArgs mirrors TrainingArguments); the fixed settings
    below are what the stages rely on.
    """
    mapped = {
        _RENAMED.get(f.name, f.name): getattr(train, f.name)
        for f in dataclasses.fields(train)
        if f.name not in _OWN_KEYS
    }
    if isinstance(mapped.get("fsdp_config"), dict):
        mapped["fsdp_config"] = dict(mapped["fsdp_config"])  # TrainingArguments edits it in place
    args = TrainingArguments(
        output_dir=str(Path(output_dir) / "checkpoints"),
        **mapped,
        logging_first_step=True,
        save_strategy="steps",
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # our rows are raw samples; the collator renders them
        label_names=["labels"],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        # transformers then trains one full copy per process, each writing the same output_dir.
        raise UserError(
            f"launched with {launched} processes but training would not be distributed (no GPU per process): "
            f"set train.use_cpu: true for data parallelism on CPUs"
        )
    return args


def first_samples(dataset, n: int | None):
    """The first `n` samples (data.max_samples), or all of them."""
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


class MaxTimeCallback(TrainerCallback):
    """Stop (and save) once training has run for `seconds` — for equal-time comparisons."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control


def callbacks_for(train: TrainArgs) -> list[TrainerCallback]:
    return [MaxTimeCallback(train.max_time_s)] if train.max_time_s else []
