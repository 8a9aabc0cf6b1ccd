"""Stage 2, preference distillation, top to bottom.

    modistill train configs/.../stage2.yaml [key=value ...]
"""

from __future__ import annotations

from pathlib import Path

from accelerate import PartialState
from transformers import set_seed

from modistill.data.preferences import load_preferences
from modistill.errors import UserError
from modistill.models.load import load_model
from modistill.moe import sparse_blocks
from modistill.teacher.compat import check_vocab_compatible
from modistill.teacher.fingerprint import data_fingerprint, model_fingerprint
from modistill.teacher.live import freeze
from modistill.teacher.reference import ReferenceStore, compute_reference, save_reference
from modistill.train.config import StageConfig
from modistill.train.groups import default_trainable, set_trainable
from modistill.train.preference_trainer import LiveReference, PreferenceTrainer, StoredReference
from modistill.train.run import MaxTimeCallback, first_samples, load_student, open_run_dir, training_arguments


def run_preference(cfg: StageConfig, fresh: bool = False, resume_with_changes: bool = False) -> dict:
    # 1. Config and run directory.
    if cfg.stage != "preference":
        raise UserError(f"stage {cfg.stage!r} is not a preference stage")
    args = training_arguments(cfg)
    run = open_run_dir(cfg, args, fresh=fresh, resume_with_changes=resume_with_changes)
    if run.done:
        print(f"{cfg.output_dir}: stage already finished (metrics.json); use --fresh to run it again")
        return run.metrics()
    set_seed(cfg.train.seed)

    # 2. Models: the sparse student (policy) and the frozen teacher (reference).
    student, processor = load_student(cfg.student)
    trainable = set_trainable(student, cfg.trainable or default_trainable("preference", bool(sparse_blocks(student))))
    teacher = load_model(cfg.teacher.path, dtype=cfg.teacher.dtype)
    check_vocab_compatible(processor.tokenizer, teacher.tokenizer, student.get_output_embeddings().weight.shape[0],
                           teacher.model.get_output_embeddings().weight.shape[0], cfg.teacher.vocab)
    freeze(teacher.model)

    # 3. Data: pairs keep every image token; the teacher renders its own inputs if its processor differs.
    data = load_preferences(
        cfg.data.train, image_root=cfg.data.image_root, processor=processor, max_length=cfg.data.max_length,
        on_bad_sample=cfg.data.on_bad_sample, report_dir=cfg.output_dir, teacher_processor=teacher.processor,
        cache_dir=cfg.data.cache_dir, allow_outside_root=cfg.data.allow_outside_root,
    )
    dataset = first_samples(data.dataset, cfg.data.max_samples)
    run.check_samples(len(dataset))  # a resume must see the samples the run started on
    collator = data.collator()
    pad_id = processor.tokenizer.pad_token_id

    # 4. Reference log-probs: computed once and stored (default), or the teacher kept beside the student.
    if cfg.reference == "precompute":
        identity = {"teacher_fingerprint": model_fingerprint(cfg.teacher.path), "logps": cfg.loss.logps,
                    "data_fingerprint": data_fingerprint(cfg.data.train, cfg.data.max_length, cfg.data.max_samples)}
        store_dir = Path(cfg.output_dir) / "reference"
        with PartialState().main_process_first():  # one process computes; the others read its result
            if not ReferenceStore.exists(store_dir):
                teacher.model.to(PartialState().device)
                ids, chosen, rejected = compute_reference(teacher.model, dataset, collator,
                                                          cfg.train.per_device_train_batch_size, cfg.loss.logps,
                                                          pad_id, cfg.loss.chunk_size)
                save_reference(store_dir, ids, chosen, rejected, identity)
        reference = StoredReference(ReferenceStore(store_dir, identity))
        del teacher  # training never holds the teacher
    else:
        reference = LiveReference(teacher.model, cfg.loss.logps, pad_id, cfg.loss.chunk_size)

    # 5. Loop.
    callbacks = ([MaxTimeCallback(cfg.train.max_time_s)] if cfg.train.max_time_s else []) + run.callbacks
    trainer = PreferenceTrainer(
        model=student, args=args, train_dataset=dataset, data_collator=collator,
        processing_class=processor, loss_config=cfg.loss, reference=reference, pad_id=pad_id, callbacks=callbacks,
    )
    if isinstance(reference, LiveReference):
        reference.model.to(trainer.accelerator.device)
    trainer.train(resume_from_checkpoint=run.resume_from)

    # 6. Checkpoint.
    trainer.accelerator.wait_for_everyone()
    metrics = {}
    if trainer.is_world_process_zero():
        metrics = run.finalize(trainer.accelerator.unwrap_model(trainer.model), processor, trainer,
                               {"trainable": trainable, "samples": len(dataset), "skipped": len(data.problems),
                                "reference": cfg.reference})
    trainer.accelerator.wait_for_everyone()
    return metrics
