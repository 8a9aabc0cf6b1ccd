"""Stage 1a, dense→dense mimic distillation: the dense student learns the teacher's token distributions.

    modistill train configs/llava-mod-2b/stage1a_dense.yaml [key=value ...]

    loss = kd_weight · KD(teacher ‖ student) + ce_weight · CE        (paper: KD only)

KD is a divergence between the teacher's and the student's next-token distributions at every
response position (shifted: the state at t predicts token t+1), summed and divided by the response
tokens of the whole accumulated batch, in fp32. The teacher is frozen: a live model beside the
student (`teacher`) or its top-k cache from `modistill cache-teacher` (`teacher_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from modistill.data.conversations import load_conversations
from modistill.errors import UserError
from modistill.losses.fused import fused_distill_loss
from modistill.moe import sparse_blocks
from modistill.runtime.arguments import callbacks_for, first_samples
from modistill.runtime.config import DataConfig, StudentConfig, TeacherConfig, TrainArgs
from modistill.runtime.groups import set_trainable
from modistill.runtime.inputs import output_head
from modistill.runtime.onpolicy import OnPolicySampler, RowsCollator, onpolicy_response_tokens
from modistill.runtime.rundir import start_stage
from modistill.runtime.student import load_student
from modistill.runtime.trainer import StageTrainer
from modistill.teacher.live import LiveTeacher
from modistill.teacher.source import TeacherSource, open_teacher

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]


@dataclass
class KDLoss:
    kd_weight: float = 1.0
    divergence: Divergence = "forward_kl"  # see modistill.losses.divergence
    temperature: float = 1.0  # on student and teacher logits for KD (no T² factor); CE is at T=1
    jsd_beta: float = 0.5  # jsd: 0 = forward KL, 1 = reverse KL (TRL's convention)
    skew_alpha: float = 0.1  # skew_kl / skew_reverse_kl mixing weight
    ce_weight: float = 0.0
    # Positions per chunk of the fused LM-head + loss (full-vocabulary logits never exist at once).
    chunk_size: int = 256
    # On-policy (GKD-style): this fraction of micro-batches distils on answers the student samples now
    # (KD on the sampled answers, CE on the dataset's); 0 = the paper's fixed responses. See runtime/onpolicy.py.
    onpolicy_fraction: float = 0.0
    onpolicy_temperature: float = 1.0  # sampling temperature of the student's answers (0 = greedy)
    onpolicy_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.onpolicy_fraction <= 1.0:
            raise ValueError(f"loss.onpolicy_fraction must be in [0, 1], not {self.onpolicy_fraction}")
        if self.onpolicy_temperature < 0:
            raise ValueError(f"loss.onpolicy_temperature must be >= 0 (0 = greedy), not {self.onpolicy_temperature}")
        if self.onpolicy_max_new_tokens < 1:
            raise ValueError(f"loss.onpolicy_max_new_tokens must be >= 1, not {self.onpolicy_max_new_tokens}")


# Stage 1a trains the language model and the projector (the paper's table; groups: modistill.runtime.groups).
TRAINABLE = ("projector", "llm")


@dataclass
class MimicDenseConfig:
    output_dir: str
    student: StudentConfig
    data: DataConfig
    stage: Literal["mimic_dense"] = "mimic_dense"
    teacher: TeacherConfig | None = None
    # A `modistill cache-teacher` directory: read the teacher's top-k log-probs instead of running it.
    teacher_cache: str | None = None
    trainable: list[str] = field(default_factory=lambda: list(TRAINABLE))
    loss: KDLoss = field(default_factory=KDLoss)
    train: TrainArgs = field(default_factory=TrainArgs)
    keep_checkpoints: bool = False  # keep Trainer checkpoints after the final save

    def __post_init__(self) -> None:
        if self.teacher is None and self.teacher_cache is None:
            raise ValueError(f"stage {self.stage!r} distils: give `teacher` (a model directory) or `teacher_cache`")
        if not self.loss.kd_weight > 0:
            raise ValueError(f"stage {self.stage!r}: loss.kd_weight must be > 0 (for CE alone use stage: sft)")
        if self.loss.onpolicy_fraction > 0 and self.teacher_cache is not None:
            raise ValueError(
                "loss.onpolicy_fraction > 0 needs a live `teacher`: a teacher_cache only holds the "
                "dataset's answers (set loss.onpolicy_fraction: 0 or give teacher.path)"
            )
        if self.loss.onpolicy_fraction > 0 and self.data.packing:
            raise ValueError("data.packing does not apply to on-policy batches: set data.packing: false")


class MimicTrainer(StageTrainer):
    """KD (+ CE) from the student's response states; `teacher` gives the teacher's side of the same rows."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated batch's token count itself

    def __init__(
        self, *args, loss_config: KDLoss, teacher: TeacherSource, onpolicy: OnPolicySampler | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self.teacher = teacher
        self.onpolicy = onpolicy
        self._micro = (-1, 0)  # (optimizer step, micro-batches seen in it): the on-policy decision's key

    def _next_micro(self) -> int:
        step, seen = self._micro
        self._micro = (self.state.global_step, seen + 1 if step == self.state.global_step else 0)
        return self._micro[1]

    def kd_loss(self, model, inputs, num_items_in_batch):
        """(loss, student inputs): KD + CE, normalised by the accumulated batch's response tokens."""
        cfg = self.loss_config
        if self.onpolicy is not None and model.training:
            micro = self._next_micro()
            on = self.onpolicy.chosen(self.state.global_step, micro)
            self.record("onpolicy", float(on))
            if on:
                key = f"{self.onpolicy.seed}:{self.state.global_step}:{micro}:{self.args.process_index}"
                return self.onpolicy_kd_loss(model, inputs, num_items_in_batch, key)
        student_inputs, states = self.student_states(model, inputs)
        teacher_target = self.teacher.targets(inputs, states)
        weight, bias = output_head(model)
        num_items = num_items_in_batch if num_items_in_batch is not None else states.targets.numel()
        losses = fused_distill_loss(
            states.hidden,
            weight,
            teacher=teacher_target,
            labels=states.targets,
            kind=cfg.divergence,
            temperature=cfg.temperature,
            ce_weight=cfg.ce_weight,
            kd_weight=cfg.kd_weight,
            chunk_size=cfg.chunk_size,
            num_items=num_items,
            student_head_bias=bias,
            beta=cfg.jsd_beta,
            alpha=cfg.skew_alpha,
        )
        # Logged per token: the normalised losses times the normaliser are this micro-batch's sums.
        tokens = states.targets.numel()
        self.record("kd", losses["kd"].item() * float(num_items), tokens)
        self.record("ce", losses["ce"].item() * float(num_items), tokens)
        self.count_tokens(student_inputs["attention_mask"])
        return self.across_devices(losses["loss"], num_items_in_batch), student_inputs

    def onpolicy_kd_loss(self, model, inputs, num_items_in_batch, key: str):
        """KD on answers the student samples now, CE on the dataset's answers (GKD-style).

        Normalisation: the Trainer's `num_items_in_batch` counts the dataset answers of the whole
        accumulated batch, before anything is sampled. Each micro-batch keeps the weight its dataset
        tokens give it (n_orig / N, as off-policy), and its KD is a mean over its sampled tokens:
        KD_sum / (n_sampled · N / n_orig). With every micro-batch off-policy this is the usual
        token normalisation; with one micro-batch per step and λ = 1 it is the mean over sampled tokens.
        """
        assert self.onpolicy is not None
        cfg = self.loss_config
        original_tokens = max(onpolicy_response_tokens(inputs["labels"]), 1)
        num_items = float(num_items_in_batch) if num_items_in_batch is not None else float(original_tokens)
        weight, bias = output_head(model)
        ce = torch.zeros((), device=weight.device)
        if cfg.ce_weight > 0:  # CE on the dataset's answers: first, so the router logits kept are the KD forward's
            _, states = self.student_states(model, inputs)
            ce = fused_distill_loss(
                states.hidden,
                weight,
                teacher=None,
                labels=states.targets,
                kd_weight=0.0,
                ce_weight=1.0,
                chunk_size=cfg.chunk_size,
                num_items=num_items,
                student_head_bias=bias,
            )["ce"]
            self.record("ce", ce.item() * num_items, states.targets.numel())
        sampled = self.onpolicy.sample(self.accelerator.unwrap_model(model), inputs, key)
        student_inputs, states = self.student_states(model, sampled.batch)
        teacher_target = self.teacher.targets(sampled.batch, states)
        kd_items = states.targets.numel() * num_items / original_tokens
        kd = fused_distill_loss(
            states.hidden,
            weight,
            teacher=teacher_target,
            labels=states.targets,
            kind=cfg.divergence,
            temperature=cfg.temperature,
            ce_weight=0.0,
            kd_weight=1.0,
            chunk_size=cfg.chunk_size,
            num_items=kd_items,
            student_head_bias=bias,
            beta=cfg.jsd_beta,
            alpha=cfg.skew_alpha,
        )["kd"]
        tokens = states.targets.numel()
        self.record("kd", kd.item() * kd_items, tokens)
        self.record("onpolicy/answer_tokens", tokens, len(sampled.texts))
        self.count_tokens(student_inputs["attention_mask"])
        loss = cfg.kd_weight * kd + cfg.ce_weight * ce
        return self.across_devices(loss, num_items_in_batch), student_inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, _ = self.kd_loss(model, inputs, num_items_in_batch)
        self.check_finite(loss, inputs)
        return (loss, None) if return_outputs else loss


def collator_and_sampler(
    loss: KDLoss, data, seed: int, packing: bool = False, image_cache_mb: float = 0
) -> tuple[object, OnPolicySampler | None]:
    """The data collator, and the on-policy sampler when loss.onpolicy_fraction > 0 (None: the paper's path)."""
    collator = data.collator(packing=packing, image_cache_mb=image_cache_mb)
    if loss.onpolicy_fraction <= 0:
        return collator, None
    rows = RowsCollator(collator)  # keeps the raw conversations: sampled answers are rendered like the data's
    sampler = OnPolicySampler(
        rows.student,
        rows.teacher,
        fraction=loss.onpolicy_fraction,
        temperature=loss.onpolicy_temperature,
        max_new_tokens=loss.onpolicy_max_new_tokens,
        seed=seed,
    )
    return rows, sampler


def run(cfg: MimicDenseConfig, fresh: bool = False, resume_with_changes: bool = False) -> dict:
    # 1. Config and run directory: a finished stage is skipped, an interrupted one resumes.
    args, run_dir = start_stage(cfg, fresh, resume_with_changes)
    if run_dir.done:
        return run_dir.metrics()

    # 2. Model: the dense student (stage 1b distils an upcycled one through the same steps below).
    student, processor = load_student(cfg.student)
    if sparse_blocks(student):
        raise UserError(
            f"{cfg.student.path}: the student is an MoE; stage mimic_dense trains a dense student "
            f"(use stage: mimic_sparse)"
        )
    _, metrics = distil(cfg, args, run_dir, student, processor, MimicTrainer)
    return metrics


def distil(cfg: MimicDenseConfig, args, run_dir, student, processor, trainer_cls: type[MimicTrainer]):
    """Steps 3-6 of a mimic stage, once its student is ready: returns (trainer, metrics)."""
    # 3. Trainable groups, and the frozen teacher or its cache.
    trainable = set_trainable(student, cfg.trainable)
    rows = student.get_output_embeddings().weight.shape[0]
    teacher, teacher_processor = open_teacher(
        cfg.teacher, cfg.teacher_cache, processor, rows, cfg.data, cfg.loss.temperature
    )

    # 4. Data: validated up front; a teacher with another processor gets its own rendering.
    data = load_conversations(
        cfg.data.train,
        image_root=cfg.data.image_root,
        processor=processor,
        max_length=cfg.data.max_length,
        on_bad_sample=cfg.data.on_bad_sample,
        report_dir=cfg.output_dir,
        teacher_processor=teacher_processor,
        cache_dir=cfg.data.cache_dir,
        allow_outside_root=cfg.data.allow_outside_root,
    )
    dataset = first_samples(data.dataset, cfg.data.max_samples)
    run_dir.check_samples(len(dataset))  # a resume must see the samples the run started on

    # 5. Train: the teacher sits on the student's device, for inference only.
    collator, onpolicy = collator_and_sampler(cfg.loss, data, args.seed, cfg.data.packing, cfg.data.image_cache_mb)
    trainer = trainer_cls(
        model=student,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        loss_config=cfg.loss,
        teacher=teacher,
        onpolicy=onpolicy,
        callbacks=callbacks_for(cfg.train) + run_dir.callbacks,
    )
    if isinstance(teacher, LiveTeacher):
        teacher.model.to(trainer.accelerator.device)
    trainer.train(resume_from_checkpoint=run_dir.resume_from)

    # 6. Save: a plain transformers checkpoint (never with the teacher), the resolved config, the metrics.
    extra = {"trainable": trainable, "samples": len(dataset), "skipped": len(data.problems)}
    return trainer, run_dir.save_final(trainer, processor, extra)
