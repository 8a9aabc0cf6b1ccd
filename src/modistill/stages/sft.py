"""Supervised fine-tuning: stage 0's CE loss with the whole LLM trainable.

    modistill train SFT.yaml [key=value ...]

Not a stage of the paper: it trains the demo's teacher and the SFT baseline that the ablations
compare with KD. Loss, trainer and steps are stage 0's (`modistill.stages.align`); only the
default trainable groups differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from modistill.stages import align


@dataclass
class SFTConfig(align.AlignConfig):
    stage: Literal["sft"] = "sft"  # type: ignore[assignment]  # a narrower literal than stage 0's
    trainable: list[str] = field(default_factory=lambda: ["projector", "llm"])


def run(cfg: SFTConfig, fresh: bool = False, resume_with_changes: bool = False) -> dict:
    return align.run(cfg, fresh, resume_with_changes)
