"""A stage's run directory: start, resume, or skip when done; and the final, self-describing save.

    output_dir/
      config.json, model.safetensors, processor files   the final student (plain transformers)
      stage.yaml        the resolved config (written at start; a resume must match it)
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

from transformers import Trainer, TrainingArguments, set_seed

from modistill.config import dump_yaml
from modistill.errors import UserError
from modistill.info import parameter_counts
from modistill.io import write_json_atomic, write_text_atomic
from modistill.runtime.arguments import training_arguments
from modistill.runtime.fsdp import full_state_dict

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunDir:
    """A stage's output directory: config check, resume point, atomic final checkpoint.

    Under torchrun only the main process may delete (``fresh``, half-written checkpoints); open it
    with :func:`open_run_dir` so the other ranks wait until the main process has set it up.
    """

    def __init__(self, cfg: Any, fresh: bool = False, is_main: bool = True):
        self.cfg = cfg
        self.is_main = is_main
        self.path = Path(cfg.output_dir)
        self.checkpoints = self.path / "checkpoints"
        self.started = time.time()
        if fresh and is_main and self.path.exists():
            self._clear()
        self.done = (self.path / "metrics.json").is_file()
        self.resume_from = None if self.done else self._last_complete_checkpoint()
        if not self.done and is_main:
            self._check_or_write_config()

    def _is_ours(self) -> bool:
        names = {p.name for p in self.path.iterdir()}
        return not names or bool(names & {"stage.yaml", "metrics.json", "checkpoints"})

    def _clear(self) -> None:
        if not self._is_ours():
            raise UserError(f"{self.path}: not a modistill run directory; refusing to delete it (choose another output_dir)")
        shutil.rmtree(self.path)

    def _check_or_write_config(self) -> None:
        text = dump_yaml(self.cfg)
        saved = self.path / "stage.yaml"
        if self.path.exists() and any(self.path.iterdir()):
            if not self._is_ours():
                raise UserError(f"{self.path}: output_dir exists and holds other files; choose an empty or new directory")
            if saved.is_file() and saved.read_text() != text and self.resume_from is not None:
                raise UserError(
                    f"{saved}: the config differs from the one this run started with; "
                    f"resume with the same config, or start over with --fresh"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved, text)

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
            metrics = self.finalize(trainer.accelerator.unwrap_model(trainer.model), processor, trainer, extra,
                                    weights)
        trainer.accelerator.wait_for_everyone()
        return metrics

    def finalize(self, model, processor, trainer, extra: dict | None = None, state_dict: dict | None = None) -> dict:
        """Write the final student (atomically per file), its log history, then metrics.json.

        `state_dict`: the full weights when the model holds shards (FSDP; `runtime.fsdp.full_state_dict`).
        """
        tmp = self.path / f".final-{uuid.uuid4().hex[:8]}"
        model.save_pretrained(str(tmp), state_dict=state_dict)
        if processor is not None:
            processor.save_pretrained(str(tmp))
        for item in tmp.iterdir():
            item.replace(self.path / item.name)
        tmp.rmdir()
        history = trainer.state.log_history if trainer is not None else []
        write_json_atomic(self.path / "log_history.json", history)
        train_logs = [h for h in history if "loss" in h]
        summary: dict[str, Any] = next((h for h in reversed(history) if "train_runtime" in h), {})
        metrics = {
            "stage": self.cfg.stage,
            "steps": trainer.state.global_step if trainer is not None else 0,
            "train_runtime_s": summary.get("train_runtime"),
            "wall_time_s": round(time.time() - self.started, 1),
            "last_log": train_logs[-1] if train_logs else {},
            "parameters": parameter_counts(model),
            **(extra or {}),
        }
        write_json_atomic(self.path / "metrics.json", metrics)
        if not self.cfg.keep_checkpoints:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        return metrics


def open_run_dir(cfg: Any, args: TrainingArguments, fresh: bool = False) -> RunDir:
    """The run directory, set up by the main process before any other rank looks at it."""
    with args.main_process_first(desc="run directory"):
        return RunDir(cfg, fresh=fresh, is_main=args.process_index == 0)


def start_stage(cfg: Any, fresh: bool = False) -> tuple[TrainingArguments, RunDir]:
    """A stage's first step: its TrainingArguments and run directory, and the seed set.

    `run.done` tells that the stage finished earlier (its metrics are `run.metrics()`); an interrupted
    run resumes from `run.resume_from`.
    """
    args = training_arguments(cfg.output_dir, cfg.train)
    run = open_run_dir(cfg, args, fresh=fresh)
    if run.done:
        print(f"{cfg.output_dir}: stage already finished (metrics.json); use --fresh to run it again")
    set_seed(cfg.train.seed)
    return args, run
