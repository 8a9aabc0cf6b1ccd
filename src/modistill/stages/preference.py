"""Stage 2, preference distillation: the sparse student learns from preference pairs, with the frozen
*teacher* (not a copy of the student) as the reference model.

    modistill train configs/llava-mod-2b/stage2_preference.yaml [key=value ...]

With sequence log-probs log π(y) summed over response tokens, Δ_w = log π_S(y_w) − log π_T(y_w) and
Δ_l = log π_S(y_l) − log π_T(y_l):

    loss = preference_loss(Δ_w, Δ_l)  [+ chosen_ce_weight · CE(chosen)]  + balance_coef · balance

`preference_loss` is paired KTO (the paper), sigmoid DPO, IPO or hinge (modistill.losses.preference),
a mean over the pairs of the micro-batch. The teacher contributes two numbers per pair, so by default
(`reference: precompute`) they are computed once before training and the teacher leaves memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from accelerate import PartialState

from modistill.data.preferences import load_preferences
from modistill.losses.balance import balance_terms
from modistill.losses.preference import preference_loss
from modistill.models.load import load_model
from modistill.models.vocab import check_vocab_compatible
from modistill.moe import RouterLogitsCollector, sparse_blocks, top_k_of
from modistill.router_metrics import ROUTERS_FILE, RouterMonitor, load_routers
from modistill.runtime.arguments import callbacks_for, first_samples
from modistill.runtime.config import DataConfig, StudentConfig, TeacherConfig, TrainArgs
from modistill.runtime.groups import set_trainable
from modistill.runtime.inputs import pair_inputs, pair_logps
from modistill.runtime.rundir import start_stage
from modistill.runtime.student import load_student
from modistill.runtime.trainer import StageTrainer
from modistill.teacher.fingerprint import data_fingerprint, model_fingerprint
from modistill.teacher.live import freeze
from modistill.teacher.reference import (
    LiveReference,
    ReferenceStore,
    StoredReference,
    compute_reference,
    save_reference,
)

PreferenceKind = Literal["kto_pair", "sigmoid", "ipo", "hinge"]


@dataclass
class PreferenceLoss:
    preference: PreferenceKind = "kto_pair"
    beta: float = 0.1
    logps: Literal["sum", "mean"] = "sum"  # a sequence's log-prob: sum (the paper) or mean over its tokens
    chosen_ce_weight: float = 0.0  # CE on the chosen answer keeps the policy fluent
    # kto_pair: detach the batch-mean KL terms (KTO paper, TRL). The official LLaVA-MoD code lets
    # gradient flow through them: set false to reproduce it.
    kto_detach_kl: bool = True
    balance_coef: float = 0.01  # MoE students: one balance loss over the joint chosen + rejected batch
    balance_scope: Literal["global", "local"] = "global"  # as stage 1b's: statistics over all ranks
    chunk_size: int = 256  # positions per chunk of the LM head (full-vocabulary logits never exist)


@dataclass
class PreferenceConfig:
    output_dir: str
    student: StudentConfig
    teacher: TeacherConfig  # the reference model
    data: DataConfig  # RLAIF-V style pairs: {"id", "image", "question", "chosen", "rejected"}
    stage: Literal["preference"] = "preference"
    # Run the teacher once before training and store its log-probs, or keep it beside the student.
    reference: Literal["precompute", "live"] = "precompute"
    # None: stage 1b's groups for an MoE student, projector + LLM for a dense one.
    trainable: list[str] | None = None
    loss: PreferenceLoss = field(default_factory=PreferenceLoss)
    train: TrainArgs = field(default_factory=TrainArgs)
    keep_checkpoints: bool = False  # keep Trainer checkpoints after the final save

    def __post_init__(self) -> None:
        if self.data.packing:
            raise ValueError("data.packing applies to conversation stages; preference pairs are not packed")
        if self.data.image_cache_mb:
            raise ValueError("data.image_cache_mb applies to conversation stages; set it to 0 for preference pairs")


class PreferenceTrainer(StageTrainer):
    loss_is_scaled_for_ga = False  # a per-pair mean: the Trainer divides by the accumulation steps

    def __init__(
        self,
        *args,
        loss_config: PreferenceLoss,
        reference: StoredReference | LiveReference,
        pad_id: int,
        initial_routers: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self.reference = reference
        self.pad_id = pad_id
        model = self.model
        assert model is not None  # the Trainer was given the student
        self.router_collector = RouterLogitsCollector(model) if sparse_blocks(model) else None
        # Routing drift since upcycling (stage 1b's saved routers), else since this stage's start.
        self.router_monitor = RouterMonitor(model, initial_routers) if sparse_blocks(model) else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.loss_config
        # Chosen and rejected in one forward of 2B rows; the reference gives the teacher's two numbers.
        pair, labels = pair_inputs(inputs, "", self.pad_id)
        seq, token_logps, counts = pair_logps(model, pair, labels, cfg.logps, cfg.chunk_size)
        half = len(seq) // 2
        policy_chosen, policy_rejected = seq[:half], seq[half:]
        ref_chosen, ref_rejected = (t.to(seq.device) for t in self.reference.lookup_batch(inputs))
        loss, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen.float(),
            policy_rejected.float(),
            ref_chosen,
            ref_rejected,
            beta=cfg.beta,
            kind=cfg.preference,
            detach_kl=cfg.kto_detach_kl,
        )
        n = half
        self.record("pref_loss", loss.item() * n, n)
        if cfg.chosen_ce_weight > 0:
            chosen_tokens = int(counts[:half].sum())
            ce = -token_logps[:chosen_tokens].float().sum() / max(chosen_tokens, 1)
            loss = loss + cfg.chosen_ce_weight * ce
            self.record("chosen_ce", ce.item() * chosen_tokens, chosen_tokens)
        if self.router_collector is not None:
            router_logits = self.router_collector.pop()
            balance = balance_terms(router_logits, top_k_of(self.model), pair["attention_mask"], cfg.balance_scope)
            if self.router_monitor is not None:
                self.router_monitor.observe(router_logits, pair["attention_mask"])
            loss = loss + cfg.balance_coef * balance.term
            self.record("balance", balance.value.item())
        margins = (chosen_rewards - rejected_rewards).detach()
        self.record("rewards/chosen", chosen_rewards.sum().item(), n)
        self.record("rewards/rejected", rejected_rewards.sum().item(), n)
        self.record("rewards/margin", margins.sum().item(), n)
        self.record("rewards/accuracy", (margins > 0).float().sum().item(), n)
        self.record("logps/chosen", policy_chosen.detach().sum().item(), n)
        self.record("logps/rejected", policy_rejected.detach().sum().item(), n)
        self.check_finite(loss, inputs)
        self.count_tokens(pair["attention_mask"])
        return (loss, None) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.router_monitor is not None:
            logs.update(self.router_monitor.logs())
        super().log(logs, *args, **kwargs)


def _routers_at_upcycling(student_path: str | None) -> dict | None:
    """The routers as stage 1b upcycled them (saved beside its student), or None (compare with this stage's start)."""
    path = Path(student_path) / ROUTERS_FILE if student_path else None
    return load_routers(path) if path is not None and path.is_file() else None


def run(cfg: PreferenceConfig, fresh: bool = False, resume_with_changes: bool = False) -> dict:
    # 1. Config and run directory: a finished stage is skipped, an interrupted one resumes.
    args, run_dir = start_stage(cfg, fresh, resume_with_changes)
    if run_dir.done:
        return run_dir.metrics()

    # 2. Models: the (sparse) student as policy, the frozen teacher as reference.
    student, processor = load_student(cfg.student)
    is_moe = bool(sparse_blocks(student))
    groups = cfg.trainable or (["projector", "dense_mlp", "experts", "routers"] if is_moe else ["projector", "llm"])
    trainable = set_trainable(student, groups)
    teacher = load_model(cfg.teacher.path, dtype=cfg.teacher.dtype)
    check_vocab_compatible(
        processor.tokenizer,
        teacher.tokenizer,
        student.get_output_embeddings().weight.shape[0],
        teacher.model.get_output_embeddings().weight.shape[0],
        cfg.teacher.vocab,
    )
    freeze(teacher.model)

    # 3. Data: pairs keep every image token; the teacher renders its own inputs if its processor differs.
    data = load_preferences(
        cfg.data.train,
        image_root=cfg.data.image_root,
        processor=processor,
        max_length=cfg.data.max_length,
        on_bad_sample=cfg.data.on_bad_sample,
        report_dir=cfg.output_dir,
        teacher_processor=teacher.processor,
        cache_dir=cfg.data.cache_dir,
        allow_outside_root=cfg.data.allow_outside_root,
    )
    dataset = first_samples(data.dataset, cfg.data.max_samples)
    run_dir.check_samples(len(dataset))  # a resume must see the samples the run started on
    collator = data.collator()
    pad_id = processor.tokenizer.pad_token_id

    # 4. Reference log-probs: computed once and stored (default), or the teacher kept beside the student.
    reference: StoredReference | LiveReference
    if cfg.reference == "precompute":
        identity = {
            "teacher_fingerprint": model_fingerprint(cfg.teacher.path),
            "logps": cfg.loss.logps,
            "data_fingerprint": data_fingerprint(cfg.data.train, cfg.data.max_length, cfg.data.max_samples),
        }
        store_dir = Path(cfg.output_dir) / "reference"
        with PartialState().main_process_first():  # one process computes; the others read its result
            if not ReferenceStore.exists(store_dir):
                teacher.model.to(PartialState().device)
                ids, chosen, rejected = compute_reference(
                    teacher.model,
                    dataset,
                    collator,
                    cfg.train.per_device_train_batch_size,
                    cfg.loss.logps,
                    pad_id,
                    cfg.loss.chunk_size,
                )
                save_reference(store_dir, ids, chosen, rejected, identity)
        reference = StoredReference(ReferenceStore(store_dir, identity))
        del teacher  # training never holds the teacher
    else:
        reference = LiveReference(teacher.model, cfg.loss.logps, pad_id, cfg.loss.chunk_size)

    # 5. Train.
    trainer = PreferenceTrainer(
        model=student,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        loss_config=cfg.loss,
        reference=reference,
        pad_id=pad_id,
        callbacks=callbacks_for(cfg.train) + run_dir.callbacks,
        initial_routers=_routers_at_upcycling(cfg.student.path),
    )
    if isinstance(reference, LiveReference):
        reference.model.to(trainer.accelerator.device)
    trainer.train(resume_from_checkpoint=run_dir.resume_from)

    # 6. Save.
    return run_dir.save_final(
        trainer,
        processor,
        {"trainable": trainable, "samples": len(dataset), "skipped": len(data.problems), "reference": cfg.reference},
    )
