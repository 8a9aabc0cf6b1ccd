"""The student a stage starts from: a saved model directory, or one assembled from a spec (stage 0)."""

from __future__ import annotations

import torch

from modistill.models.build import build_vlm
from modistill.models.load import load_model
from modistill.moe import set_experts_implementation
from modistill.runtime.config import StudentConfig


def load_student(cfg: StudentConfig, dtype: torch.dtype = torch.float32):
    """The student model and its processor, with the configured experts kernel if it is an MoE."""
    if cfg.path is not None:
        loaded = load_model(cfg.path, dtype=dtype)
        model, processor = loaded.model, loaded.processor
    else:
        assert cfg.build is not None  # StudentConfig requires exactly one of path / build
        model, processor = build_vlm(cfg.build, dtype=dtype)
    set_experts_implementation(model, cfg.experts_implementation)
    return model, processor
