"""A stage's run directory: start, resume, or skip when done; and the final, self-describing save.

    output_dir/
      config.json, model.safetensors, processor files   the final student (plain transformers)
      stage.yaml        the resolved config (written at start; a resume must match it)
      data.json         the data files (size, hash) and sample count (a resume must match them)
      .modistill        marks the directory as modistill's (only such a directory is ever deleted)
      metrics.json      written last: its presence marks the stage as finished
      log_history.json  the Trainer's logs (loss curves, expert load)
      checkpoints/checkpoint-N/   Trainer checkpoints (resume); removed at the end unless kept

A checkpoint counts only once its `trainer_state.json` (the Trainer writes it last) parses, so a
run killed while saving resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from modistill.config import dump_yaml
from modistill.errors import UserError
from modistill.faults import crash_point
from modistill.info import parameter_counts
from modistill.io import is_ours, mark, write_json_atomic, write_text_atomic
from modistill.runtime.arguments import training_arguments
from modistill.runtime.data_identity import DATA_FILE, data_identity, describe_difference, read_identity
from modistill.runtime.fsdp import full_state_dict
from modistill.runtime.guards import check_finite_model
from modistill.runtime.resume import ApplyLearningRate, SegmentClock, config_changes

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunDir:
    """A stage's output directory: config check, resume point, atomic final checkpoint.

    Under torchrun only the main process may delete (``fresh``, half-written checkpoints); open it
    with :func:`open_run_dir` so the other ranks wait until the main process has set it up.
    """

    def __init__(self, cfg: Any, fresh: bool = False, is_main: bool = True, resume_with_changes: bool = False):
        self.cfg = cfg
        self.is_main = is_main
        self.path = Path(cfg.output_dir)
        self.checkpoints = self.path / "checkpoints"
        self.started = time.time()
        self.resume_with_changes = resume_with_changes
        self.stored_data = read_identity(self.path)  # before this run rewrites it
        self.callbacks: list[TrainerCallback] = []  # what the run directory asks of the Trainer
        if fresh and is_main and self.path.exists():
            self._clear()
        if is_main and self.path.is_dir():
            for orphan in self.path.glob(".final-*"):  # a final save cut off by a kill
                shutil.rmtree(orphan, ignore_errors=True)
        self.done = (self.path / "metrics.json").is_file()
        self.resume_from = None if self.done else self._last_complete_checkpoint()
        self.data = data_identity(cfg.data.train)
        if self.done:
            self._check_finished()
        elif is_main:
            self._check_or_write_config()
        self.clock = SegmentClock(self.resume_from)
        self.callbacks.append(self.clock)
        if self.resume_from is not None and resume_with_changes:  # on every rank: each has an optimizer
            self.callbacks.append(ApplyLearningRate(cfg.train.learning_rate))

    def _is_ours(self) -> bool:
        return is_ours(self.path, legacy=("stage.yaml", "metrics.json", "checkpoints"), kind="run")

    def _check_finished(self) -> None:
        """A finished stage re-run must ask for what it finished with; anything else is a new run."""
        saved = self.path / "stage.yaml"
        changes = config_changes(saved.read_text(), dump_yaml(self.cfg)) if saved.is_file() else []
        stored = self.stored_data
        data_change = describe_difference(stored, self.data) if stored is not None else None
        if changes or data_change:
            what = "; ".join(changes) or f"data: {data_change}"
            raise UserError(
                f"{self.path}: this stage already finished with another config or data ({what}); "
                f"pass --fresh to run it again, or choose another output_dir"
            )

    def _clear(self) -> None:
        if not self._is_ours():
            raise UserError(
                f"{self.path}: not a modistill run directory; refusing to delete it (choose another output_dir)"
            )
        shutil.rmtree(self.path)

    def _check_or_write_config(self) -> None:
        text = dump_yaml(self.cfg)
        saved = self.path / "stage.yaml"
        if self.path.exists() and any(self.path.iterdir()):
            if not self._is_ours():
                raise UserError(
                    f"{self.path}: output_dir exists and holds other files; choose an empty or new directory"
                )
            if self.resume_from is not None:
                self._check_resume(saved, text)
        self.path.mkdir(parents=True, exist_ok=True)
        mark(self.path, "run")
        write_text_atomic(saved, text)
        # A resume keeps the recorded sample count until check_samples has compared it (on every rank).
        samples = (self.stored_data or {}).get("samples") if self.resume_from is not None else None
        write_json_atomic(self.path / DATA_FILE, {**self.data, **({"samples": samples} if samples else {})})

    def _check_resume(self, saved: Path, text: str) -> None:
        """Resume only on the config and data the run started with, unless changes are allowed."""
        old_text = saved.read_text() if saved.is_file() else text
        changes = config_changes(old_text, text)
        stored = self.stored_data
        data_change = describe_difference(stored, self.data) if stored is not None else None
        if data_change:
            changes.append(f"data: {data_change}")
        assert self.resume_from is not None  # only called when resuming
        name = Path(self.resume_from).name
        if changes and not self.resume_with_changes:
            raise UserError(
                f"{saved}: the config or data differ from the ones this run started with ({'; '.join(changes)}); "
                f"resume with the same ones, pass --resume-with-changes to continue from {name} with the new ones, "
                f"or start over with --fresh"
            )
        if changes:
            print(f"resuming from {name} with changes (--resume-with-changes): {'; '.join(changes)}", flush=True)
        state = json.loads((Path(self.resume_from) / "trainer_state.json").read_text())
        print(f"resuming from {name} (step {state.get('global_step')} of {state.get('max_steps')})", flush=True)

    def check_samples(self, n: int) -> None:
        """Compare the number of training samples with the one the run started on (then record it)."""
        stored = self.stored_data or {}
        if (
            self.resume_from is not None
            and "samples" in stored
            and stored["samples"] != n
            and not self.resume_with_changes
        ):
            raise UserError(
                f"{self.path / DATA_FILE}: the run started on {stored['samples']} samples, the data now gives {n}; "
                f"resume on the same data, pass --resume-with-changes to continue from "
                f"{Path(self.resume_from).name} on this data, or start over with --fresh"
            )
        if self.is_main:
            write_json_atomic(self.path / DATA_FILE, {**self.data, "samples": n})

    def _last_complete_checkpoint(self) -> str | None:
        if not self.checkpoints.is_dir():
            return None
        found = []
        for child in self.checkpoints.iterdir():
            match = _CHECKPOINT.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
        for _, child in sorted(found, reverse=True):
            try:
                json.loads((child / "trainer_state.json").read_text())
                if any(child.glob("*.safetensors")):
                    return str(child)
            except (OSError, ValueError):
                pass
            if self.is_main:
                shutil.rmtree(child, ignore_errors=True)  # a checkpoint cut off while being written
        return None

    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    def save_final(self, trainer: Trainer, processor, extra: dict | None = None) -> dict:
        """After training: the main process writes the final student and metrics; every rank waits.

        Under FSDP every rank first takes part in gathering the full weights from the shards.
        """
        trainer.accelerator.wait_for_everyone()
        weights = full_state_dict(trainer)
        metrics: dict = {}
        if trainer.is_world_process_zero():
            metrics = self.finalize(trainer.accelerator.unwrap_model(trainer.model), processor, trainer, extra, weights)
        trainer.accelerator.wait_for_everyone()
        return metrics

    def finalize(self, model, processor, trainer, extra: dict | None = None, state_dict: dict | None = None) -> dict:
        """Write the final student (atomically per file), its log history, then metrics.json.

        `state_dict`: the full weights when the model holds shards (FSDP; `runtime.fsdp.full_state_dict`).
        """
        check_finite_model(model, f"the final model in {self.path}", state_dict)
        tmp = self.path / f".final-{uuid.uuid4().hex[:8]}"
        model.save_pretrained(str(tmp), state_dict=state_dict)
        crash_point("final-save")  # a kill here leaves the orphan .final-* copy the next run removes
        if processor is not None:
            processor.save_pretrained(str(tmp))
        for item in tmp.iterdir():
            item.replace(self.path / item.name)
        tmp.rmdir()
        history = trainer.state.log_history if trainer is not None else []
        write_json_atomic(self.path / "log_history.json", history)
        train_logs = [h for h in history if "loss" in h]
        metrics = {
            "stage": self.cfg.stage,
            "steps": trainer.state.global_step if trainer is not None else 0,
            # Over every segment of a resumed run (SegmentClock), and the mean loss over all logged steps.
            "train_runtime_s": round(self.clock.total(), 4),
            "train_loss": mean_logged_loss(history),
            "wall_time_s": round(time.time() - self.started, 1),
            "last_log": train_logs[-1] if train_logs else {},
            "parameters": parameter_counts(model),
            **(extra or {}),
        }
        write_json_atomic(self.path / "metrics.json", metrics)
        if not self.cfg.keep_checkpoints:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        return metrics


def open_run_dir(cfg: Any, args: TrainingArguments, fresh: bool = False, resume_with_changes: bool = False) -> RunDir:
    """The run directory, set up by the main process before any other rank looks at it."""
    with args.main_process_first(desc="run directory"):
        return RunDir(cfg, fresh=fresh, is_main=args.process_index == 0, resume_with_changes=resume_with_changes)


def mean_logged_loss(history: list[dict]) -> float | None:
    """The mean training loss over every logged step (each log averages the steps since the previous one)."""
    total, steps, previous = 0.0, 0, 0
    for h in history:
        if "loss" in h and "step" in h:
            total += h["loss"] * (h["step"] - previous)
            steps += h["step"] - previous
            previous = h["step"]
    return total / steps if steps else None


def start_stage(cfg: Any, fresh: bool = False, resume_with_changes: bool = False) -> tuple[TrainingArguments, RunDir]:
    """A stage's first step: its TrainingArguments and run directory, and the seed set.

    `run.done` tells that the stage finished earlier (its metrics are `run.metrics()`); an interrupted
    run resumes from `run.resume_from` (with another config or data only if `resume_with_changes`).
    The Trainer must get `run.callbacks` and the loaded sample count `run.check_samples(n)`.
    """
    args = training_arguments(cfg.output_dir, cfg.train)
    run = open_run_dir(cfg, args, fresh=fresh, resume_with_changes=resume_with_changes)
    if run.done:
        print(f"{cfg.output_dir}: stage already finished (metrics.json); use --fresh to run it again")
    set_seed(cfg.train.seed)
    return args, run
