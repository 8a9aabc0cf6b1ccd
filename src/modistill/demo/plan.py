"""What the demo runs: world size, model sizes, steps and learning rates per stage.

Budgets are in optimizer steps, not seconds, so a run's numbers do not depend on how busy the
machine is; the sizes were chosen so that `make demo` fits in 15 minutes and `--quick` in ~1.5
on 2 CPU cores (see the README for measured times). Calibration notes: docs/demo.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from modistill.demo.vision_reader import ReaderPlan


@dataclass
class StagePlan:
    steps: int
    learning_rate: float
    # 16, not 32: on the CPU a step's cost is ~proportional to its samples, and at this scale the
    # teacher reached batch 32's loss with half the samples (0.552 after 550 steps vs 0.556 after 560).
    batch_size: int = 16


@dataclass
class DemoPlan:
    # World (modistill data scenes). 30,000 images: with 10,000, a 2,000-step teacher (~3 passes) said
    # "yes" to a third of absent kinds (validation POPE F1 0.83; 0.97 at 30,000 with the same steps,
    # one seed; docs/demo.md).
    n_train: int = 30000
    # 2,000 test (and validation) images: the hallucination rates count one greedy caption per image,
    # and the rates compared are small (the shipped teacher's greedy rate is ~0.04: one standard error
    # is 0.008 at 600 images, 0.0044 at 2,000). The world grew 200 -> 600 -> 2,000; the first images,
    # the VQA and POPE questions (eval_limit keeps their first 600 rows) and the training data are the
    # same at every size, so the models are too (docs/demo.md, items 11 and 12).
    n_test: int = 2000
    # data.packing in the conversation stages: the same losses with less padding (teacher SFT 1.24x faster).
    packing: bool = True
    # Processed images kept in memory between epochs (all 30,000 48x48 images take 830 MB); with the
    # tokens rendered once at load, a stage-1a step skips its per-sample work from the second epoch on.
    image_cache_mb: float = 1024
    caption_noise: float = 0.2
    multi_turn: float = 0.2  # share of training samples with 2-3 question/answer turns about their image
    # Share of training "no" existence questions asking for an absent kind whose colour is in the image.
    # Against the colour-only shortcut: validation POPE F1 of the 2,000-step teacher 0.851 -> 0.980.
    colour_near_miss: float = 0.6
    # The shared vision tower: SigLIP pretrained as a reader of the training scene graphs (the demo's CLIP).
    reader: ReaderPlan = field(default_factory=ReaderPlan)
    # Teacher: that tower (frozen) + Qwen3 h192 x 3, LLaVA-1.5 style: stage 0, then projector + LLM.
    # 4 layers were not better in one calibration run (and cost 1.3x); 2,000 -> 8,000 steps took
    # validation VQA from 0.645 to 0.835 (docs/demo.md). "shipped": the teacher this plan trained once
    # (`modistill demo --train-teacher`, ~25 min here) ships inside the package and every run reuses
    # it, as a real user starts from an existing teacher; "train": train it (tower included) in the run.
    teacher: str = "shipped"
    teacher_hidden: int = 192
    teacher_layers: int = 3
    teacher_align: StagePlan = field(default_factory=lambda: StagePlan(30, 1e-3))
    teacher_sft: StagePlan = field(default_factory=lambda: StagePlan(8000, 1e-3))
    # Student: a narrower Qwen3 on the teacher's frozen tower, on all the teacher's training samples.
    # Depth matters more than width here: h128 x 2 stayed at chance on existence questions (POPE F1 0.49).
    # With 10,000 samples and 800 stage-1a steps, h96 x 3 answered "yes" iff the colour was in the image
    # (validation POPE F1 0.839 in every run); colour near misses in the data fixed that. From the
    # 8,000-step teacher, 1,600 steps on 20,000 samples left validation VQA at 0.663 (teacher 0.835);
    # 3,600 on 30,000 reached 0.763 (docs/demo.md). 4,500 (not 3,000) fit once the teacher is cached:
    # validation POPE F1 of seeds 1 / 2 went 0.798 / 0.789 -> 0.969 / 0.987 (student 2). 6,000, with
    # stage 1b at 1e-4 instead of 5e-4, took student 2's validation greedy hallucination from 0.113 to
    # 0.055 (teacher 0.075) and VQA from 0.737 to 0.787 (3 seeds; docs/demo.md, item 10); 9,000 did
    # better still but would not fit 15 minutes on the slower machines of this kind.
    student_hidden: int = 96
    student_layers: int = 3
    student_samples: int = 30000
    student_align: StagePlan = field(default_factory=lambda: StagePlan(40, 1e-3))
    stage1a: StagePlan = field(default_factory=lambda: StagePlan(6000, 1e-3))
    # 1e-4, not 5e-4: stage 1b restarts the schedule on an upcycled copy of a converged student, and at
    # 5e-4 it undid part of what stage 1a learned (validation greedy hallucination 0.057 -> 0.073 after
    # 9,000 stage-1a steps; 0.060 at 1e-4, 3 seeds).
    stage1b: StagePlan = field(default_factory=lambda: StagePlan(400, 1e-4))
    # Stages 1a/1b read the teacher's top-k log-probs from a cache made once (`modistill
    # cache-teacher`, ~1 minute) instead of running the teacher at every step; 0 = the live teacher.
    # Stage 1a's 3,000 steps took 166 s instead of 264 s (one machine), with the same seed-0 figures.
    teacher_top_k: int = 64
    num_experts: int = 4
    top_k: int = 2
    # Preference distillation on pairs sampled from the 1b student and labelled by the oracle.
    pref_images: int = 400
    pref_samples: int = 4
    pref_short: int = 300  # existence-question pairs on other training images (short answers)
    # Further training images captioned greedily (brief prompt); each wrong caption becomes a pair
    # against the ground truth. Off: with 2,000 images (78-131 pairs) validation greedy hallucination
    # went 0.140 / 0.075 / 0.135 -> 0.130 / 0.080 / 0.065 over 3 seeds, within noise, and T=1 rose in
    # 2 of 3 (docs/demo.md).
    pref_greedy: int = 0
    # Further training images, each a pair whose rejected caption repeats an object in place of the next
    # (`repeat_pairs`): the demo models' greedy errors are nearly all that one mistake. Off: 1,000 such
    # pairs took validation greedy hallucination from 0.113 to 0.105 (3 seeds, std 0.026) by turning
    # repeats into other wrong objects (against the shipped stage 2: 63 -> 37 repeats, 5 -> 26 other
    # errors over the 3 seeds; docs/demo.md, item 9).
    pref_repeat: int = 0
    pref_loss: str = "kto_pair"  # stage 2's loss (PreferenceLoss.preference): kto_pair (the paper) or sigmoid (DPO)
    # ~2 passes over the pairs. At 5e-5 the reward margin never turned positive (reward accuracy
    # 0.25-0.44); 1e-4 / 3e-4 / 1e-3 for 100 steps gave sampled hallucination 0.667 / 0.652 / 0.667
    # (1b student: 0.82) with VQA 0.46 / 0.45 / 0.435: 2e-4 sits in the flat part (in early calibration,
    # ~20 passes at 1e-4 collapsed the model).
    stage2: StagePlan = field(default_factory=lambda: StagePlan(100, 2e-4))
    pref_beta: float = 0.1
    pref_chosen_ce: float = 0.2
    # Evaluation on held-out scenes: the first eval_limit VQA and POPE questions; captions of all n_test images.
    eval_limit: int = 600
    caption_samples: int = 3


FULL = DemoPlan()
TEACHER_SOURCES = ("shipped", "train")

QUICK = replace(
    FULL,
    n_train=2000,
    n_test=60,
    teacher="train",  # a smoke run of the whole chain, the teacher's training included
    reader=ReaderPlan(steps=60, validation=200),
    teacher_align=StagePlan(5, 1e-3),
    teacher_sft=StagePlan(150, 1e-3),
    student_samples=800,
    student_align=StagePlan(5, 1e-3),
    stage1a=StagePlan(40, 1e-3),
    stage1b=StagePlan(30, 5e-4),
    pref_images=40,
    pref_samples=2,
    pref_short=20,
    stage2=StagePlan(6, 2e-4),
    eval_limit=60,
    caption_samples=1,
)
