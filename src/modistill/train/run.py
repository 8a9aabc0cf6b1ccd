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
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from modistill.config import dump_yaml
from modistill.errors import UserError
from modistill.info import parameter_counts
from modistill.faults import crash_point
from modistill.fingerprint import DATA_FILE, data_identity, describe_difference, read_identity
from modistill.guards import check_finite_model
from modistill.io import is_ours, mark, write_json_atomic, write_text_atomic
from modistill.models.build import build_vlm
from modistill.models.load import load_model
from modistill.resume import ApplyLearningRate, SegmentClock, config_changes
from modistill.train.config import StageConfig, StudentConfig
from modistill.upcycle import upcycle

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunDir:
    """A stage's output directory: config check, resume point, atomic final checkpoint.

    Under torchrun only the main process may delete (``fresh``, half-written checkpoints); open it
    with :func:`open_run_dir` so the other ranks wait until the main process has set it up.
    """

    def __init__(self, cfg: StageConfig, fresh: bool = False, is_main: bool = True,
                 resume_with_changes: bool = False):
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
            raise UserError(f"{self.path}: this stage already finished with another config or data ({what}); "
                            f"pass --fresh to run it again, or choose another output_dir")

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
        if self.resume_from is not None and "samples" in stored and stored["samples"] != n \
                and not self.resume_with_changes:
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

    def finalize(self, model, processor, trainer, extra: dict | None = None) -> dict:
        """Write the final student (atomically per file), its log history, then metrics.json."""
        check_finite_model(model, f"the final model in {self.path}")
        tmp = self.path / f".final-{uuid.uuid4().hex[:8]}"
        model.save_pretrained(str(tmp))
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


def open_run_dir(cfg: StageConfig, args: TrainingArguments, fresh: bool = False,
                 resume_with_changes: bool = False) -> RunDir:
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


def load_student(cfg: StudentConfig, dtype: torch.dtype = torch.float32):
    """The student model and processor: loaded or built, then optionally upcycled."""
    if cfg.path is not None:
        loaded = load_model(cfg.path, dtype=dtype)
        model, processor = loaded.model, loaded.processor
    else:
        model, processor = build_vlm(cfg.build, dtype=dtype)
    if cfg.upcycle is not None:
        u = cfg.upcycle
        model = upcycle(model, u.num_experts, u.top_k, u.layers, router_std=u.router_std, seed=u.seed)
    if cfg.experts_implementation is not None:
        from modistill.moe import language_model

        language_model(model).set_experts_implementation(cfg.experts_implementation)
    return model, processor


def first_samples(dataset, n: int | None):
    """The first `n` samples (data.max_samples), or all of them."""
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


class MaxTimeCallback(TrainerCallback):
    """Stop (and save) once training has run for `seconds` — for equal-time comparisons."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control


def training_arguments(cfg: StageConfig) -> TrainingArguments:
    t = cfg.train
    args = TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "checkpoints"),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=t.bf16,
        fp16=t.fp16,
        seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        dataloader_num_workers=t.dataloader_num_workers,
        activation_checkpointing=t.gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=t.report_to,
        disable_tqdm=t.disable_tqdm,
        ddp_find_unused_parameters=t.ddp_find_unused_parameters,
        fsdp=t.fsdp,
        fsdp_config=t.fsdp_config,
        deepspeed=t.deepspeed,
        remove_unused_columns=False,  # our rows are raw samples; the collator renders them
        label_names=["labels"],
        use_cpu=t.use_cpu,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        # transformers then trains one full copy per process, each writing the same output_dir.
        raise UserError(
            f"launched with {launched} processes but training would not be distributed (no GPU per process): "
            f"set train.use_cpu: true for data parallelism on CPUs"
        )
    return args
