"""The config sections every stage shares: student, teacher, data and the Trainer's arguments.

Each stage file in `modistill.stages` owns its top-level config dataclass and its loss section and
composes these. `from_dict` (modistill.config) rejects unknown keys and wrong types with the key
path and the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from modistill.models.spec import ModelSpec


def _at_least(section: object, low: float, *names: str) -> None:
    """Raise ValueError naming the first field of `section` below `low` (from_dict adds the file and section)."""
    for name in names:
        value = getattr(section, name)
        if value < low:
            raise ValueError(f"{name}: {value}: must be >= {low}")


@dataclass
class UpcycleSpec:
    """How stage 1b upcycles its dense student (the same operation as `modistill upcycle`)."""

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
    # MoE experts kernel (transformers' `set_experts_implementation`). On CPUs "eager" trained ~15 %
    # faster than the default "grouped_mm" in our measurements; None keeps the library's default.
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
    # Concatenate each batch's samples into rows of up to max_length tokens, attention kept within each
    # sample (position_ids restart per sample): the same loss with less padding. Conversation stages only.
    packing: bool = False
    # Keep up to this many MiB of processed images in memory for later epochs (0 = off): worth it
    # when images are small and seen several times, as in the demo. Conversation stages only.
    image_cache_mb: float = 0

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("data.train: give at least one data file")
        _at_least(self, 1, "max_length")
        if self.image_cache_mb < 0:
            raise ValueError(f"data.image_cache_mb must be >= 0 (0 = off), not {self.image_cache_mb}")
        if self.max_samples is not None:
            _at_least(self, 1, "max_samples")


# TrainingArguments' samplers. The length-aware ones read the dataset's `length` column.
LENGTH_SAMPLERS = ("group_by_length", "batch_rebalance")
SAMPLING_STRATEGIES = ("random", "sequential", *LENGTH_SAMPLERS)


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
    # "group_by_length" batches samples of like length (less padding; conversations carry a length
    # column). On CPU a step's cost follows its padded tokens.
    train_sampling_strategy: str = "random"
    ddp_find_unused_parameters: bool | None = None
    # Train on the CPU even if a GPU is there. Needed for CPU data parallelism (`torchrun
    # --nproc_per_node N` on a machine without GPUs): without it each process trains alone.
    use_cpu: bool = False
    # FSDP through the Trainer: e.g. fsdp: full_shard and fsdp_config: {version: 2,
    # transformer_layer_cls_to_wrap: [Qwen3MoeDecoderLayer]} (a dict, or the path of a JSON file).
    fsdp: str | None = None
    fsdp_config: str | dict[str, Any] | None = None
    deepspeed: str | None = None
    # Stop after this many seconds of training (saves a checkpoint; equal-time comparisons).
    max_time_s: float | None = None

    def __post_init__(self) -> None:
        # Caught here, at config time, not after the models and the data have loaded.
        _at_least(self, 1, "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps")
        _at_least(self, 0, "learning_rate", "warmup_steps", "weight_decay", "max_grad_norm")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"max_steps: {self.max_steps}: give a positive number of steps, or -1 (use num_train_epochs)"
            )
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs: {self.num_train_epochs}: must be > 0 (or set max_steps)")
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(
                f"train_sampling_strategy: {self.train_sampling_strategy!r}: "
                f"choose one of {', '.join(SAMPLING_STRATEGIES)}"
            )
