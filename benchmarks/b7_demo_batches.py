"""B7: what building a batch costs in the demo's stage 1a, against the training step it feeds.

The demo's own parts: a world of scenes (`build_world`, the demo's settings), the shipped teacher
(SigLIP 48 px + Qwen3 h192 x 3) and a student at the demo's sizes (Qwen3 h96 x 3 on the teacher's
tower), batches of 16 packed samples. Three ways to build a batch of the same rows:
- from scratch: chat template rendered and tokenized, every image decoded and processed;
- pretokenized: the tokens `load_conversations` stored at validation, images as before;
- pretokenized + pixel cache: as the second epoch of a run with `data.image_cache_mb` sees it.
and one stage-1a training step (live teacher forward, student forward, fused KD, backward, clip,
AdamW) on such a batch. Each variant handles the same `--batches` batches per repetition.

    python benchmarks/b7_demo_batches.py [--repeats 3] [--batches 20] [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import benchlib as bl
import steps
from modistill.config import from_dict
from modistill.data.collate import ConversationCollator
from modistill.data.conversations import load_conversations
from modistill.demo.pipeline import Demo
from modistill.demo.plan import FULL
from modistill.demo.shipped import install_shipped_teacher
from modistill.models.load import load_model
from modistill.models.spec import ModelSpec
from modistill.runtime.config import StudentConfig
from modistill.runtime.groups import set_trainable
from modistill.runtime.student import load_student
from modistill.teacher.live import LiveTeacher

BATCH = 16


def main(argv: list[str] | None = None) -> dict:
    parser = bl.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args(argv)
    bl.setup_threads()
    started = time.perf_counter()
    n_batches, repeats = (2, 1) if args.quick else (args.batches, args.repeats)
    tmp = Path(tempfile.mkdtemp(prefix="modistill-bench-b7-"))

    plan = replace(FULL, n_train=n_batches * BATCH, n_test=1)
    demo = Demo(tmp, plan, progress=False)  # the demo's own world settings and student spec
    demo.make_world()
    teacher_dir = install_shipped_teacher(tmp / "teacher")
    teacher = load_model(teacher_dir).model.eval().requires_grad_(False)
    spec = from_dict(ModelSpec, demo.student_build(teacher_dir, seed=0))
    student, processor = load_student(StudentConfig(build=spec))
    set_trainable(student, ["projector", "llm"])  # stage 1a's groups: the tower stays frozen
    data = load_conversations(
        tmp / "world" / "train.json",
        image_root=tmp / "world",
        processor=processor,
        max_length=192,
        cache_dir=tmp / "cache",
        verbose=False,
    )
    rows = [data.dataset[i] for i in range(len(data.dataset))]
    batches = [rows[i : i + BATCH] for i in range(0, len(rows), BATCH)]
    scratch = ConversationCollator(data.renderer, packing=plan.packing)
    pretokenized = data.collator(packing=plan.packing)
    cached = data.collator(packing=plan.packing, image_cache_mb=plan.image_cache_mb)
    for batch in batches:  # the first epoch fills the cache
        cached(batch)

    vocab = student.get_output_embeddings().weight.shape[0]
    trainer = steps.distill_trainer(student, LiveTeacher(teacher, vocab), kd_weight=1.0, ce_weight=0.0)
    runner = steps.StepRunner(student, trainer)
    collated = [pretokenized(batch) for batch in batches]

    def collate_all(collator):
        return lambda: [collator(batch) for batch in batches]

    def train_all():
        for batch in collated:
            runner.step(trainer, batch)

    variants = {
        "batches from scratch": collate_all(scratch),
        "batches, pretokenized": collate_all(pretokenized),
        "batches, pretok. + pixels": collate_all(cached),
        "stage-1a steps": train_all,
    }
    runs = bl.interleaved(variants, repeats=repeats)
    per_batch = {name: r["median_s"] / n_batches for name, r in runs.items()}
    step = per_batch["stage-1a steps"]
    rows_out = []
    for name in list(variants)[:3]:
        total = per_batch[name] + step
        rows_out.append(
            [
                name,
                per_batch[name] * 1000,
                per_batch[name] / per_batch["batches from scratch"],
                total * 1000,
                total / (per_batch["batches from scratch"] + step),
            ]
        )
    table = bl.markdown_table(
        ["batch building", "ms / batch", "vs scratch", "ms / step incl. batch", "step vs scratch"], rows_out
    )
    notes = [
        f"{n_batches} batches of {BATCH} demo training samples (packed, max_length 192, 48 px images, one "
        f"per sample); the training step alone takes {step * 1000:.0f} ms (fp32, "
        f"{bl.machine_info()['torch_threads']} threads); medians of {repeats} interleaved repetitions.",
        "'ms / step incl. batch' adds the batch to the step, as the Trainer does with dataloader_num_workers 0 "
        "(the demo's setting: on 2 cores a worker competes with the step for the cores). From the second "
        "epoch a demo run builds every batch the cached way; in the first, pretokenized.",
    ]
    data_out = {"per_batch_s": per_batch, "runs": runs, "batches": n_batches, "batch_size": BATCH}
    title = "B7 - batch building vs the stage-1a step (demo scale)"
    return bl.finish("b7_demo_batches", title, [table], notes, data_out, started, args)


if __name__ == "__main__":
    main(sys.argv[1:])
