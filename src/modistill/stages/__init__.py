"""One file per training stage: its config dataclass, its Trainer subclass and its `run`.

    align         stage 0   projector alignment (CE, projector only)          stages/align.py
    sft           —         supervised fine-tuning (CE, whole LLM)             stages/sft.py
    mimic_dense   stage 1a  dense→dense mimic distillation (KD)                stages/mimic_dense.py
    mimic_sparse  stage 1b  upcycle, then dense→sparse mimic (KD + CE + balance) stages/mimic_sparse.py
    preference    stage 2   preference distillation, the teacher as reference  stages/preference.py

A stage YAML names its stage (`stage: mimic_sparse`); `load_stage_config` reads that key first and
builds that stage's config class, so each stage's keys are checked against its own schema.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modistill.config import apply_overrides, from_dict, load_yaml
from modistill.errors import UserError

# YAML `stage:` value -> (module, config class name).
STAGES = {
    "align": ("modistill.stages.align", "AlignConfig"),
    "sft": ("modistill.stages.sft", "SFTConfig"),
    "mimic_dense": ("modistill.stages.mimic_dense", "MimicDenseConfig"),
    "mimic_sparse": ("modistill.stages.mimic_sparse", "MimicSparseConfig"),
    "preference": ("modistill.stages.preference", "PreferenceConfig"),
}


def stage_from_dict(data: dict[str, Any], source: str = "<config>") -> Any:
    """The typed config of the stage `data["stage"]` names."""
    stage = data.get("stage")
    if stage not in STAGES:
        raise UserError(f"{source}: `stage` must be one of {', '.join(STAGES)}, got {stage!r}")
    module, name = STAGES[stage]
    return from_dict(getattr(importlib.import_module(module), name), data, source=source)


def load_stage_config(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read a stage YAML, apply `key=value` overrides, and build its stage's config."""
    data = load_yaml(path)
    apply_overrides(data, overrides or [])
    return stage_from_dict(data, source=str(path))


def runner_of(cfg: Any) -> Callable[..., dict]:
    """The `run(cfg, fresh=False)` of the stage a config belongs to."""
    return importlib.import_module(STAGES[cfg.stage][0]).run


def run_stage(cfg: Any, fresh: bool = False, resume_with_changes: bool = False) -> dict:
    return runner_of(cfg)(cfg, fresh=fresh, resume_with_changes=resume_with_changes)
