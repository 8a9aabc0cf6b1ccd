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
from modistill.io import write_json_atomic, write_text_atomic
from modistill.models.build import build_vlm
from modistill.models.load import load_model
from modistill.train.config import StageConfig, StudentConfig
from modistill.upcycle import upcycle

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunDir:
    """A stage's output directory: config check, resume point, atomic final checkpoint.

    Under torchrun only the main process may delete (``fresh``, half-written checkpoints); open it
    with :func:`open_run_dir` so the other ranks wait until the main process has set it up.
    """

    def __init__(self, cfg: StageConfig, fresh: bool = False, is_main: bool = True):
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

    def finalize(self, model, processor, trainer, extra: dict | None = None, state_dict: dict | None = None) -> dict:
        """Write the final student (atomically per file), its log history, then metrics.json.

        `state_dict`: the full weights when the model holds shards (FSDP; modistill.fsdp.full_state_dict).
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
        summary = next((h for h in reversed(history) if "train_runtime" in h), {})
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


def open_run_dir(cfg: StageConfig, args: TrainingArguments, fresh: bool = False) -> RunDir:
    """The run directory, set up by the main process before any other rank looks at it."""
    with args.main_process_first(desc="run directory"):
        return RunDir(cfg, fresh=fresh, is_main=args.process_index == 0)


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
        fsdp_config=dict(t.fsdp_config) if isinstance(t.fsdp_config, dict) else t.fsdp_config,  # it edits it
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
