"""Stage 0, projector alignment ("adaptor initialisation"): CE on the responses, projector only.

    modistill train configs/llava-mod-2b/stage0_align.yaml [key=value ...]

The student VLM is assembled here (`student.build`: a pretrained LLM + a pretrained vision tower +
a fresh 2-layer MLP projector) or loaded (`student.path`). Only the projector learns, so the LLM
learns to read the tower's features before any distillation.

    loss = CE(student, dataset response) / response tokens of the accumulated batch
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from modistill.data.conversations import load_conversations
from modistill.losses.fused import fused_distill_loss
from modistill.runtime.arguments import callbacks_for, first_samples
from modistill.runtime.config import DataConfig, StudentConfig, TrainArgs
from modistill.runtime.groups import set_trainable
from modistill.runtime.inputs import output_head
from modistill.runtime.rundir import start_stage
from modistill.runtime.student import load_student
from modistill.runtime.trainer import StageTrainer


@dataclass
class CELoss:
    # Positions per chunk of the fused LM-head + loss (full-vocabulary logits never exist at once).
    chunk_size: int = 256


@dataclass
class AlignConfig:
    output_dir: str
    student: StudentConfig
    data: DataConfig
    stage: Literal["align"] = "align"
    trainable: list[str] = field(default_factory=lambda: ["projector"])  # groups: modistill.runtime.groups
    loss: CELoss = field(default_factory=CELoss)
    train: TrainArgs = field(default_factory=TrainArgs)
    keep_checkpoints: bool = False  # keep Trainer checkpoints after the final save


class CETrainer(StageTrainer):
    """Next-token CE on the response tokens, through the chunked LM head."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated batch's token count itself

    def __init__(self, *args, loss_config: CELoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_inputs, states = self.student_states(model, inputs)
        weight, bias = output_head(model)
        num_items = num_items_in_batch if num_items_in_batch is not None else states.targets.numel()
        losses = fused_distill_loss(
            states.hidden,
            weight,
            teacher=None,
            labels=states.targets,
            kd_weight=0.0,
            ce_weight=1.0,
            chunk_size=self.loss_config.chunk_size,
            num_items=num_items,
            student_head_bias=bias,
        )
        loss = self.across_devices(losses["loss"], num_items_in_batch)
        self.record("ce", losses["ce"].item() * float(num_items), states.targets.numel())
        self.check_finite(loss, inputs)
        self.count_tokens(student_inputs["attention_mask"])
        return (loss, None) if return_outputs else loss


def run(cfg: AlignConfig, fresh: bool = False, resume_with_changes: bool = False) -> dict:
    # 1. Config and run directory: a finished stage is skipped, an interrupted one resumes.
    args, run_dir = start_stage(cfg, fresh, resume_with_changes)
    if run_dir.done:
        return run_dir.metrics()

    # 2. Model: the student (assembled or loaded), everything outside the trainable groups frozen.
    student, processor = load_student(cfg.student)
    trainable = set_trainable(student, cfg.trainable)

    # 3. Data: validated up front (bad samples stop the run, or are counted with on_bad_sample: skip).
    data = load_conversations(
        cfg.data.train,
        image_root=cfg.data.image_root,
        processor=processor,
        max_length=cfg.data.max_length,
        on_bad_sample=cfg.data.on_bad_sample,
        report_dir=cfg.output_dir,
        cache_dir=cfg.data.cache_dir,
        allow_outside_root=cfg.data.allow_outside_root,
    )
    dataset = first_samples(data.dataset, cfg.data.max_samples)
    run_dir.check_samples(len(dataset))  # a resume must see the samples the run started on

    # 4. Train: the Trainer runs schedules, accumulation, checkpoints, resume and distribution.
    trainer = CETrainer(
        model=student,
        args=args,
        train_dataset=dataset,
        data_collator=data.collator(packing=cfg.data.packing, image_cache_mb=cfg.data.image_cache_mb),
        processing_class=processor,
        loss_config=cfg.loss,
        callbacks=callbacks_for(cfg.train) + run_dir.callbacks,
    )
    trainer.train(resume_from_checkpoint=run_dir.resume_from)

    # 5. Save: a plain transformers checkpoint, the resolved config and the metrics.
    return run_dir.save_final(
        trainer, processor, {"trainable": trainable, "samples": len(dataset), "skipped": len(data.problems)}
    )
