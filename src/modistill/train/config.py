"""The YAML schema of a training stage (`modistill train CONFIG.yaml key=value ...`).

One dataclass per YAML section; `from_dict` (modistill.config) rejects unknown keys and wrong
types with the key path and the file. Stages:

    align       stage 0: projector alignment (CE on responses, projector only)
    sft         supervised fine-tuning (CE; e.g. training the demo's teacher)
    mimic       stages 1a / 1b: mimic distillation (KD [+ CE] [+ balance for MoE students])
    preference  stage 2: preference distillation with the teacher as reference model
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from modistill.config import load_config
from modistill.models.spec import ModelSpec

Stage = Literal["align", "sft", "mimic", "preference"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]
PreferenceKind = Literal["kto_pair", "sigmoid", "ipo", "hinge"]


def _at_least(section: object, low: float, *names: str) -> None:
    """Raise ValueError naming the first field of `section` below `low` (from_dict adds the file and section)."""
    for name in names:
        value = getattr(section, name)
        if value < low:
            raise ValueError(f"{name}: {value}: must be >= {low}")


@dataclass
class UpcycleSpec:
    """Upcycle the loaded student before training (the same operation as `modistill upcycle`)."""

    num_experts: int = 4
    top_k: int = 2
    layers: str = "every-other"
    router_std: float = 0.02
    seed: int = 0


@dataclass
class StudentConfig:
    # Exactly one of: a saved model directory / hub id, or a spec to build from.
    path: str | None = None
    build: ModelSpec | None = None
    upcycle: UpcycleSpec | None = None
    # Experts kernel on the CPU: "eager" trains ~15 % faster than "grouped_mm" here (STACK.md).
    experts_implementation: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.build is None):
            raise ValueError("student: give exactly one of `path` (a model directory) or `build` (a model spec)")


@dataclass
class TeacherConfig:
    path: str
    dtype: str = "float32"  # the teacher's own dtype, independent of the student's
    # The teacher's extra vocabulary rows (padding, e.g. Qwen2-7B 152,064 vs 151,936) may be dropped
    # only when stated: `truncate`. `exact` requires the same vocabulary size.
    vocab: Literal["exact", "truncate"] = "exact"


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    image_root: str | None = None
    max_length: int = 2048
    on_bad_sample: Literal["error", "skip"] = "error"
    max_samples: int | None = None  # use only the first N valid samples (quick runs)
    cache_dir: str | None = None  # where validated datasets are cached (default: the HF datasets cache)
    allow_outside_root: bool = False  # accept image paths resolving outside image_root (or the data file's dir)

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("data.train: give at least one data file")
        _at_least(self, 1, "max_length")
        if self.max_samples is not None:
            _at_least(self, 1, "max_samples")


@dataclass
class LossConfig:
    # Mimic distillation: kd_weight * KD + ce_weight * CE + balance_coef * balance (MoE students).
    kd_weight: float = 1.0
    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    ce_weight: float = 0.0
    balance_coef: float = 0.01
    # Positions per chunk of the fused LM-head + loss computation (full-vocabulary logits of all
    # positions never exist at once).
    chunk_size: int = 256
    # Preference distillation.
    preference: PreferenceKind = "kto_pair"
    beta: float = 0.1
    logps: Literal["sum", "mean"] = "sum"
    chosen_ce_weight: float = 0.0  # CE on the chosen answer keeps the policy fluent
    # kto_pair: detach the batch-mean KL terms (KTO paper, TRL). The official LLaVA-MoD code lets
    # gradient flow through them: set false to reproduce it.
    kto_detach_kl: bool = True


@dataclass
class TrainArgs:
    """Mirrors the `transformers.TrainingArguments` fields a stage uses (same names and meaning)."""

    learning_rate: float = 2e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03  # < 1: a ratio of the total steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = False
    fp16: bool = False
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    dataloader_num_workers: int = 0
    gradient_checkpointing: bool = False
    report_to: list[str] = field(default_factory=lambda: ["none"])
    disable_tqdm: bool = False
    ddp_find_unused_parameters: bool | None = None
    # Train on the CPU even if a GPU is there. Needed for CPU data parallelism (`torchrun
    # --nproc_per_node N` on a machine without GPUs): without it each process trains alone.
    use_cpu: bool = False
    fsdp: str | None = None
    fsdp_config: str | None = None
    deepspeed: str | None = None
    # Stop after this many seconds of training (saves a checkpoint; equal-time comparisons).
    max_time_s: float | None = None

    def __post_init__(self) -> None:
        # Caught here, at config time, not after the models and the data have loaded.
        _at_least(self, 1, "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps")
        _at_least(self, 0, "learning_rate", "warmup_steps", "weight_decay", "max_grad_norm")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps: {self.max_steps}: give a positive number of steps, "
                             f"or -1 (use num_train_epochs)")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs: {self.num_train_epochs}: must be > 0 (or set max_steps)")


@dataclass
class StageConfig:
    stage: Stage
    output_dir: str
    student: StudentConfig
    data: DataConfig
    teacher: TeacherConfig | None = None
    # Read teacher top-k log-probs from `modistill cache-teacher` output instead of running the teacher.
    teacher_cache: str | None = None
    # Stage 2: run the teacher once before training and store its log-probs (`precompute`), or
    # keep it beside the student (`live`).
    reference: Literal["precompute", "live"] = "precompute"
    # Trainable parameter groups; None = the stage's default (see modistill.train.groups).
    trainable: list[str] | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainArgs = field(default_factory=TrainArgs)
    # Keep Trainer checkpoints after the final model is written (default: remove them).
    keep_checkpoints: bool = False

    def __post_init__(self) -> None:
        needs_teacher = self.stage == "preference" or (self.stage == "mimic" and self.loss.kd_weight > 0)
        if needs_teacher and self.teacher is None and self.teacher_cache is None:
            raise ValueError(f"stage {self.stage!r} needs a `teacher` (or a `teacher_cache` for mimic)")
        if self.stage == "preference" and self.teacher is None:
            raise ValueError("stage 'preference' needs `teacher` (the reference model)")


def load_stage_config(path: str | Path, overrides: list[str] | None = None) -> StageConfig:
    return load_config(StageConfig, path, overrides)


@dataclass
class CacheConfig:
    """`modistill cache-teacher`: run the teacher once and store top-k log-probs per response token."""

    teacher: TeacherConfig
    # The student model dir whose processor renders the data in training (and whose vocabulary
    # the cache must fit). Stages 1a and 1b share it: upcycling keeps processor and vocabulary.
    student: str
    data: DataConfig
    output_dir: str
    top_k: int = 32
    temperature: float = 1.0
    batch_size: int = 8
    shard_size: int = 1024  # samples per shard


def load_cache_config(path: str | Path, overrides: list[str] | None = None) -> CacheConfig:
    return load_config(CacheConfig, path, overrides)
