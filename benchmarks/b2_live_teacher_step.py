"""B2: a live-teacher KD training step vs (student CE step + teacher forward), and the peers on the same batch.

Text-only Qwen3 student (hidden 256 x 4 layers) and teacher (hidden 512 x 6 layers), vocabulary
151,936, batch 4 x 512, fp32 (the peer set-up of benchmarks/RESULTS.md). Every token of the batch is a response token
(no prompt), so the CE step's full logits and the KD path's response rows cover the same positions.
Variants, each a whole step (forward, backward, clip, AdamW step):
- student CE step: transformers' Trainer with the model's own loss (full logits);
- teacher forward: the teacher's plain forward, no gradient (full logits);
- modistill KD (live teacher): DistillTrainer.training_step, forward KL, the teacher run beside it;
- modistill KD + CE (stage 1b's loss without the MoE);
- plain KD: full fp32 logits of both, F.kl_div;
- TRL GKDTrainer (lmbda=0, beta=0): its own training_step / compute_loss (generalized_jsd_loss).

    python benchmarks/b2_live_teacher_step.py [--repeats 3] [--quick] [--no-peers]
"""

from __future__ import annotations

import sys
import time

import benchlib as bl
import steps
from modistill.teacher.live import LiveTeacher

TARGET = 1.05


def main(argv: list[str] | None = None) -> dict:
    parser = bl.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-peers", action="store_true", help="skip plain KD and TRL GKD (the slow rows)")
    args = parser.parse_args(argv)
    bl.setup_threads()
    started = time.perf_counter()
    vocab, batch_size, length = 151_936, 4, 512
    student_size, teacher_size = (256, 4), (512, 6)
    repeats = args.repeats
    if args.quick:
        vocab, batch_size, length, student_size, teacher_size, repeats = 4096, 2, 64, (64, 2), (128, 2), 1

    student = bl.qwen3_lm(*student_size, vocab, seed=0)
    teacher = bl.qwen3_lm(*teacher_size, vocab, seed=1)
    teacher.eval().requires_grad_(False)
    batch = bl.token_batch(batch_size, length, vocab, seed=2)
    warm = bl.token_batch(batch_size, 16, vocab, seed=3)

    ce = steps.ce_trainer(student)
    kd = steps.distill_trainer(student, LiveTeacher(teacher, vocab), kd_weight=1.0, ce_weight=0.0)
    kd_ce = steps.distill_trainer(student, LiveTeacher(teacher, vocab), kd_weight=1.0, ce_weight=1.0)
    runner = steps.StepRunner(student, kd)

    def variants(b: dict) -> dict:
        table = {
            "student CE step": runner.bind(ce, steps.model_batch(b)),
            "teacher forward": steps.teacher_forward(teacher, b),
            "modistill KD (live teacher)": runner.bind(kd, b),
            "modistill KD + CE": runner.bind(kd_ce, b),
        }
        if not args.no_peers:
            gkd = steps.gkd_trainer(student, teacher) if "gkd" not in cache else cache["gkd"]
            cache["gkd"] = gkd
            table["plain KD (full logits, F.kl_div)"] = steps.plain_kd_step(runner, teacher, b)
            table["TRL GKDTrainer (lmbda=0, beta=0)"] = runner.bind(gkd, steps.model_batch(b))
        return table

    cache: dict = {}
    print("B2 warm-up (small batch: optimizer state, lazy initialisation)")
    bl.interleaved(variants(warm), repeats=1, warmup=0)
    print(
        f"B2: batch {batch_size} x {length}, vocabulary {vocab:,}, student {bl.parameter_count(student) / 1e6:.1f}M, "
        f"teacher {bl.parameter_count(teacher) / 1e6:.1f}M, {repeats} interleaved repetitions"
    )
    runs = bl.interleaved(variants(batch), repeats=repeats, warmup=0)

    base = runs["student CE step"]
    budget = base["median_s"] + runs["teacher forward"]["median_s"]
    rows = []
    for name, r in runs.items():
        per_budget = "" if name in ("student CE step", "teacher forward") else r["median_s"] / budget
        rows.append(
            [
                name,
                r["median_s"],
                per_budget,
                r["median_peak_extra_bytes"] / bl.GB,
                r["median_peak_extra_bytes"] / base["median_peak_extra_bytes"],
            ]
        )
    table = bl.markdown_table(
        ["step", "s/step", "/ (CE step + teacher fwd)", "peak extra GB", "peak extra / CE step's"], rows
    )
    ratio = runs["modistill KD (live teacher)"]["median_s"] / budget
    notes = [
        f"Student {bl.parameter_count(student) / 1e6:.1f}M (hidden {student_size[0]} x {student_size[1]}), teacher "
        f"{bl.parameter_count(teacher) / 1e6:.1f}M (hidden {teacher_size[0]} x {teacher_size[1]}), vocabulary "
        f"{vocab:,}, "
        f"batch {batch_size} x {length}, fp32, every token a response token; medians of {repeats} interleaved "
        "repetitions.",
        f"modistill KD / (CE step + teacher forward) = {ratio:.2f} (target <= {TARGET}: "
        f"{'met' if ratio <= TARGET else 'MISSED'}).",
        "Peak extra = RSS peak during the step minus RSS before it (weights, gradients of the previous step and "
        "optimizer state excluded; process-wide weights + AdamW state are the same for every row).",
    ]
    data = {
        "vocab": vocab,
        "batch": [batch_size, length],
        "student_params": bl.parameter_count(student),
        "teacher_params": bl.parameter_count(teacher),
        "runs": runs,
        "ratio_kd_over_ce_plus_teacher": ratio,
    }
    return bl.finish(
        "b2_live_teacher_step",
        "B2 - live-teacher KD step vs CE step + teacher forward (peer set-up)",
        [table],
        notes,
        data,
        started,
        args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
