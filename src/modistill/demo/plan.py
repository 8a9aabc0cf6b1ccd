"""What the demo runs: world size, model sizes, steps and learning rates per stage.

Budgets are in optimizer steps, not seconds, so a run's numbers do not depend on how busy the
machine is; the sizes were chosen so that the full demo fits in ~10 minutes and `--quick` in ~2
on 2 CPU cores (see the README for measured times).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class StagePlan:
    steps: int
    learning_rate: float
    batch_size: int = 32


@dataclass
class DemoPlan:
    # World (modistill data scenes).
    n_train: int = 10000
    n_test: int = 200
    caption_noise: float = 0.2
    # Teacher: SigLIP tower + Qwen3 LLM, trained from scratch (stage 0, then everything).
    vision_hidden: int = 128
    vision_layers: int = 3
    teacher_hidden: int = 256
    teacher_layers: int = 4
    teacher_align: StagePlan = field(default_factory=lambda: StagePlan(40, 1e-3))
    teacher_sft: StagePlan = field(default_factory=lambda: StagePlan(600, 1e-3))
    # Student: a smaller Qwen3 on the teacher's frozen tower; it sees fewer samples than the teacher.
    student_hidden: int = 128
    student_layers: int = 2
    student_samples: int = 3000
    student_align: StagePlan = field(default_factory=lambda: StagePlan(30, 1e-3))
    stage1a: StagePlan = field(default_factory=lambda: StagePlan(150, 1e-3))
    stage1b: StagePlan = field(default_factory=lambda: StagePlan(150, 5e-4))
    num_experts: int = 4
    top_k: int = 2
    # Preference distillation on pairs sampled from the 1b student and labelled by the oracle.
    pref_images: int = 400
    pref_samples: int = 4
    stage2: StagePlan = field(default_factory=lambda: StagePlan(40, 2e-5, batch_size=16))
    pref_beta: float = 0.1
    pref_chosen_ce: float = 0.2
    # Evaluation on held-out scenes.
    eval_limit: int = 600
    caption_samples: int = 3


FULL = DemoPlan()

QUICK = replace(
    FULL,
    n_train=2000,
    n_test=60,
    teacher_align=StagePlan(10, 1e-3),
    teacher_sft=StagePlan(120, 1e-3),
    student_samples=800,
    student_align=StagePlan(10, 1e-3),
    stage1a=StagePlan(30, 1e-3),
    stage1b=StagePlan(30, 5e-4),
    pref_images=60,
    pref_samples=2,
    stage2=StagePlan(8, 2e-5, batch_size=16),
    eval_limit=120,
    caption_samples=2,
)
