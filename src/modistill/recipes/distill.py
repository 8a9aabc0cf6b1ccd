"""Stages 0 (align), SFT and 1a/1b (mimic distillation), top to bottom.

    modistill train configs/.../stage1b.yaml [key=value ...]
"""

from __future__ import annotations

from dataclasses import replace

from transformers import set_seed

from modistill.data.conversations import load_conversations
from modistill.errors import UserError
from modistill.models.load import load_model
from modistill.moe import sparse_blocks
from modistill.teacher.cache import TeacherCache, cache_identity
from modistill.teacher.compat import check_vocab_compatible
from modistill.teacher.live import LiveTeacher
from modistill.train.config import StageConfig
from modistill.train.groups import default_trainable, set_trainable
from modistill.train.run import MaxTimeCallback, first_samples, load_student, open_run_dir, training_arguments
from modistill.train.trainer import DistillTrainer


def run_distill(cfg: StageConfig, fresh: bool = False, resume_with_changes: bool = False) -> dict:
    # 1. Config and run directory: a finished stage is skipped, an interrupted one resumes.
    if cfg.stage not in ("align", "sft", "mimic"):
        raise UserError(f"stage {cfg.stage!r} is not a mimic/align/sft stage")
    args = training_arguments(cfg)
    run = open_run_dir(cfg, args, fresh=fresh, resume_with_changes=resume_with_changes)
    if run.done:
        print(f"{cfg.output_dir}: stage already finished (metrics.json); use --fresh to run it again")
        return run.metrics()
    set_seed(cfg.train.seed)

    # 2. Models: the student (trainable groups), and the teacher (frozen) or its cache.
    student, processor = load_student(cfg.student)
    is_moe = bool(sparse_blocks(student))
    groups = cfg.trainable or default_trainable(cfg.stage, is_moe)
    trainable = set_trainable(student, groups)
    uses_teacher = cfg.stage == "mimic" and cfg.loss.kd_weight > 0
    loss_cfg = cfg.loss if uses_teacher else replace(cfg.loss, kd_weight=0.0)  # align/SFT: the data alone
    if cfg.stage in ("align", "sft") and cfg.loss.ce_weight == 0:
        raise UserError(f"stage {cfg.stage!r} trains on CE: set loss.ce_weight > 0 (e.g. 1.0)")
    teacher, teacher_processor = None, None
    rows = student.get_output_embeddings().weight.shape[0]
    if uses_teacher and cfg.teacher_cache is not None:
        expected = cache_identity(cfg.data, processor.tokenizer, rows, cfg.loss.temperature)
        teacher = TeacherCache(cfg.teacher_cache, expected=expected)
    elif uses_teacher:
        loaded = load_model(cfg.teacher.path, dtype=cfg.teacher.dtype)
        check_vocab_compatible(processor.tokenizer, loaded.tokenizer, rows,
                               loaded.model.get_output_embeddings().weight.shape[0], cfg.teacher.vocab)
        teacher_processor = loaded.processor
        teacher = LiveTeacher(loaded.model, rows)

    # 3. Data: validated up front; a teacher with another processor gets its own rendering.
    data = load_conversations(
        cfg.data.train, image_root=cfg.data.image_root, processor=processor, max_length=cfg.data.max_length,
        on_bad_sample=cfg.data.on_bad_sample, report_dir=cfg.output_dir, teacher_processor=teacher_processor,
        cache_dir=cfg.data.cache_dir, allow_outside_root=cfg.data.allow_outside_root,
    )
    dataset = first_samples(data.dataset, cfg.data.max_samples)
    run.check_samples(len(dataset))  # a resume must see the samples the run started on

    # 4. Loop: the Trainer (schedules, accumulation, checkpoints, resume, distribution).
    callbacks = ([MaxTimeCallback(cfg.train.max_time_s)] if cfg.train.max_time_s else []) + run.callbacks
    trainer = DistillTrainer(
        model=student, args=args, train_dataset=dataset, data_collator=data.collator(),
        processing_class=processor, loss_config=loss_cfg, teacher=teacher, callbacks=callbacks,
    )
    if isinstance(teacher, LiveTeacher):
        teacher.model.to(trainer.accelerator.device)
    trainer.train(resume_from_checkpoint=run.resume_from)

    # 5. Checkpoint: the final student as a plain transformers model + config + metrics.
    trainer.accelerator.wait_for_everyone()
    metrics = {}
    if trainer.is_world_process_zero():
        extra = {"trainable": trainable, "samples": len(dataset), "skipped": len(data.problems)}
        metrics = run.finalize(trainer.accelerator.unwrap_model(trainer.model), processor, trainer, extra)
    trainer.accelerator.wait_for_everyone()
    return metrics
