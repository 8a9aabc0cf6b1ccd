"""Stage 1b, dense→sparse mimic distillation: upcycle the student into an MoE, then distil.

    modistill train configs/llava-mod-2b/stage1b_sparse.yaml [key=value ...]

Upcycling (`upcycle` below) copies the dense FFN of every chosen layer into E experts behind a new
top-k router; with identical experts and renormalised top-k weights the MoE starts as exactly the
dense model. Then:

    loss = kd_weight · KD(teacher ‖ student) + ce_weight · CE + balance_coef · Σ_layers balance

KD and CE are stage 1a's (`MimicTrainer.kd_loss`). The balance loss is the Switch/GShard
E·Σ_e P_e·f_e of each MoE layer, counted once per step; by default its statistics are taken over
all ranks' tokens (`balance_scope: global`, modistill.losses.balance), so N processes train as one.
Attention, embeddings and the LM head stay frozen; experts, routers, dense FFNs and the projector learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from modistill.errors import UserError
from modistill.losses.balance import balance_terms
from modistill.moe import RouterLogitsCollector, set_experts_implementation, sparse_blocks, top_k_of
from modistill.router_metrics import ROUTERS_FILE, RouterMonitor, save_routers
from modistill.runtime.config import UpcycleSpec
from modistill.runtime.rundir import start_stage
from modistill.runtime.student import load_student
from modistill.stages.mimic_dense import KDLoss, MimicDenseConfig, MimicTrainer, distil
from modistill.upcycle import upcycle


@dataclass
class SparseKDLoss(KDLoss):
    ce_weight: float = 1.0  # the paper's stage 1b adds CE on the dataset responses
    balance_coef: float = 0.01
    # `global`: balance statistics over all ranks' tokens of each micro-batch (the loss of the union,
    # as with one process); `local`: each rank balances its own tokens (modistill.losses.balance).
    balance_scope: Literal["global", "local"] = "global"


@dataclass
class MimicSparseConfig(MimicDenseConfig):
    stage: Literal["mimic_sparse"] = "mimic_sparse"  # type: ignore[assignment]  # narrower than 1a's
    # How to upcycle the dense student; null when `student.path` is already sparse.
    upcycle: UpcycleSpec | None = field(default_factory=UpcycleSpec)
    trainable: list[str] = field(default_factory=lambda: ["projector", "dense_mlp", "experts", "routers"])
    loss: SparseKDLoss = field(default_factory=SparseKDLoss)


class SparseMimicTrainer(MimicTrainer):
    """Stage 1a's KD + CE, plus the router balance loss; logs each MoE layer's expert load."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_collector = RouterLogitsCollector(self.model)  # LlavaModel returns no router logits
        # Created before any step: its frozen router copy is the routing at upcycling (a resumed run
        # re-upcycles with the same seed, so the copy is the same).
        self.router_monitor = RouterMonitor(self.model)
        self._load_sum = None  # top-1 token counts [layers, experts] since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, student_inputs = self.kd_loss(model, inputs, num_items_in_batch)
        cfg = self.loss_config
        router_logits, mask = self.router_collector.pop(), student_inputs["attention_mask"]
        balance = balance_terms(router_logits, top_k_of(self.model), mask, cfg.balance_scope)
        # Once per optimizer step: the Trainer does not divide this loss by the accumulation steps.
        loss = loss + cfg.balance_coef * balance.term / self.current_gradient_accumulation_steps
        self.record("balance", balance.value.item())
        counts = balance.stats.top1.detach().cpu()  # all ranks' counts with the global scope
        self._load_sum = counts if self._load_sum is None else self._load_sum + counts
        self.router_monitor.observe(router_logits, mask)
        self.check_finite(loss, inputs)
        return (loss, None) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._load_sum is not None:
            load = self._load_sum / self._load_sum.sum(dim=-1, keepdim=True).clamp_min(1)
            for layer, row in zip(sorted(sparse_blocks(self.model)), load):
                for expert, share in enumerate(row.tolist()):
                    logs[f"load/L{layer}/E{expert}"] = share
            logs["load/max_share"] = float(load.max())
            logs.update(self.router_monitor.logs())
            self._load_sum = None
        super().log(logs, *args, **kwargs)


def run(cfg: MimicSparseConfig, fresh: bool = False, resume_with_changes: bool = False) -> dict:
    # 1. Config and run directory: a finished stage is skipped, an interrupted one resumes.
    args, run_dir = start_stage(cfg, fresh, resume_with_changes)
    if run_dir.done:
        return run_dir.metrics()

    # 2. Model: the dense student, upcycled into an MoE here (every expert a copy of its dense FFN).
    student, processor = load_student(cfg.student)
    if cfg.upcycle is not None:
        u = cfg.upcycle
        student = upcycle(student, u.num_experts, u.top_k, u.layers, router_std=u.router_std, seed=u.seed)
        set_experts_implementation(student, cfg.student.experts_implementation)
    if not sparse_blocks(student):
        raise UserError(
            f"{cfg.student.path}: stage mimic_sparse needs an MoE student: set `upcycle` "
            f"(e.g. {{num_experts: 4, top_k: 2}}) or give an upcycled model"
        )
    # 3-6. As stage 1a: trainable groups, teacher, data, train, save (a plain transformers MoE checkpoint:
    #      Qwen3-MoE / Qwen2-MoE / Mixtral inside Llava).
    trainer, metrics = distil(cfg, args, run_dir, student, processor, SparseMimicTrainer)
    # The routers as upcycled, so that stage 2 can report routing drift since upcycling.
    if trainer.is_world_process_zero():
        save_routers(Path(cfg.output_dir) / ROUTERS_FILE, trainer.router_monitor.initial)
    return metrics
