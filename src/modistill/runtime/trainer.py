"""`StageTrainer`: the `transformers.Trainer` every stage's trainer subclasses.

It adds what the stages share and the Trainer lacks; each stage's `compute_loss` lives in its own
file (`modistill.stages.*`). Checkpointing, schedules, gradient accumulation, logging, progress
bars and distribution stay the Trainer's.

- Resume through `from_pretrained` (see `_load_from_checkpoint`).
- Extra per-step metrics (`record`) averaged into the Trainer's logs, as TRL's trainers do.
- A non-finite loss or gradient stops the run before the update, and no checkpoint with a non-finite
  weight is written (`GuardMixin`, modistill.runtime.guards).
- `train.fsdp` honoured on CPU processes too (`CpuFsdpMixin`, modistill.runtime.fsdp).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from transformers import PreTrainedModel

from modistill.errors import UserError
from modistill.runtime.config import LENGTH_SAMPLERS
from modistill.runtime.fsdp import CpuFsdpMixin
from modistill.runtime.guards import GuardMixin, check_finite
from modistill.runtime.inputs import ResponseStates, model_inputs, response_states


class StageTrainer(GuardMixin, CpuFsdpMixin):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_guard()
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, float] = defaultdict(float)
        self._tokens_since_log = 0
        self._time_of_last_log = time.perf_counter()

    def _get_train_sampler(self, train_dataset=None):
        # Without a `length` column transformers would look for `input_ids` in our raw rows and fail
        # with a traceback; preference pairs (stage 2) have no such column.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        strategy = self.args.train_sampling_strategy
        columns = getattr(dataset, "column_names", None) or []
        if strategy in LENGTH_SAMPLERS and self.args.length_column_name not in columns:
            raise UserError(
                f"train.train_sampling_strategy: {strategy} needs a {self.args.length_column_name!r} column, "
                f"which this stage's data has not (conversation data has it; preference pairs do not): use random"
            )
        return super()._get_train_sampler(train_dataset)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume from checkpoints through `from_pretrained`, which knows the checkpoint key mapping.

        transformers 5 saves Llava and MoE weights under their legacy names (`language_model.model.*`,
        per-expert `experts.{i}.*`), but `Trainer._load_from_checkpoint` loads the file with a plain
        `load_state_dict(strict=False)`: every key misses and training silently restarts from the
        initial weights. Loading the checkpoint with `from_pretrained` converts the names back.
        """
        model = model if model is not None else self.model
        inner = self.accelerator.unwrap_model(model)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not isinstance(inner, PreTrainedModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(inner.parameters()).dtype
        saved = type(inner).from_pretrained(resume_from_checkpoint, dtype=dtype)
        inner.load_state_dict(saved.state_dict(), strict=True)

    def student_states(self, model, inputs: dict) -> tuple[dict, ResponseStates]:
        """The student's forward inputs and its hidden states at the batch's response positions."""
        student_inputs, labels = model_inputs(inputs)
        states = response_states(model, student_inputs, labels)
        if states.targets.numel() == 0:
            raise UserError(f"batch with samples {inputs.get('sample_ids')} has no response token to learn from")
        return student_inputs, states

    def across_devices(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """A token-normalised loss, scaled so that DDP's gradient averaging leaves it normalised.

        With `average_tokens_across_devices` the Trainer's `num_items_in_batch` counts every device's
        tokens, and DDP averages gradients over devices: multiply back by the device count.
        """
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return loss * self.accelerator.num_processes
        return loss

    def check_finite(self, loss: torch.Tensor, inputs: dict) -> None:
        """Stop at a NaN/inf micro-batch loss, naming the (1-based) step, its samples and the resume point."""
        check_finite(loss, self.state.global_step + 1, inputs.get("sample_ids", []), self.args.output_dir)

    def record(self, key: str, total: float, count: float = 1.0) -> None:
        """Add `total` over `count` items; the log shows sum(total) / sum(count) since the last log."""
        self._sums[key] += float(total)
        self._counts[key] += float(count)

    def count_tokens(self, attention_mask: torch.Tensor) -> None:
        """Tokens this micro-batch processed, for the logged `tokens_per_s`."""
        self._tokens_since_log += int(attention_mask.sum())

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
