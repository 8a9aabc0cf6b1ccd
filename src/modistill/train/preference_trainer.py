"""`PreferenceTrainer`: LLaVA-MoD's preference distillation with the teacher as reference model.

    loss = preference_loss(π_S(y_w), π_S(y_l), π_T(y_w), π_T(y_l)) [+ w·CE(chosen)] + coef·balance

π_T comes from a precomputed `ReferenceStore` (default) or a live teacher forward; either way
it is the frozen *teacher*, not a copy of the student. The loss is a mean over the pairs of a
micro-batch; the Trainer divides it by the accumulation steps.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from modistill.losses.preference import preference_loss
from modistill.moe import RouterLogitsCollector, balance_loss, sparse_blocks
from modistill.train.config import LossConfig
from modistill.train.pairs import pair_inputs, pair_logps
from modistill.guards import GuardMixin, check_finite
from modistill.train.trainer import MetricsMixin, ResumeMixin


class LiveReference:
    """The teacher run beside the student: same numbers as a `ReferenceStore`, every step."""

    def __init__(self, model, mode: str, pad_id: int, chunk_size: int):
        self.model, self.mode, self.pad_id, self.chunk_size = model, mode, pad_id, chunk_size

    @torch.no_grad()
    def lookup_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        inputs, labels = pair_inputs(batch, "teacher_", self.pad_id)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        seq, _, _ = pair_logps(self.model, inputs, labels.to(device), self.mode, self.chunk_size)
        half = len(seq) // 2
        return seq[:half].float(), seq[half:].float()


class StoredReference:
    def __init__(self, store):
        self.store = store

    def lookup_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.lookup(batch["sample_ids"])


class PreferenceTrainer(GuardMixin, ResumeMixin, MetricsMixin, Trainer):
    loss_is_scaled_for_ga = False  # a per-pair mean: the Trainer divides by the accumulation steps

    def __init__(self, *args, loss_config: LossConfig, reference, pad_id: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self.reference = reference
        self.pad_id = pad_id
        self.is_moe = bool(sparse_blocks(self.model))
        self.router_collector = RouterLogitsCollector(self.model) if self.is_moe else None
        self._init_metrics()
        self._init_guard()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.loss_config
        pair, labels = pair_inputs(inputs, "", self.pad_id)
        seq, token_logps, counts = pair_logps(model, pair, labels, cfg.logps, cfg.chunk_size)
        half = len(seq) // 2
        policy_chosen, policy_rejected = seq[:half], seq[half:]
        ref_chosen, ref_rejected = (t.to(seq.device) for t in self.reference.lookup_batch(inputs))
        loss, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen.float(), policy_rejected.float(), ref_chosen, ref_rejected, beta=cfg.beta,
            kind=cfg.preference, detach_kl=cfg.kto_detach_kl,
        )
        n = half
        self._record("pref_loss", loss.item() * n, n)
        if cfg.chosen_ce_weight > 0:
            chosen_tokens = int(counts[:half].sum())
            ce = -token_logps[:chosen_tokens].float().sum() / max(chosen_tokens, 1)
            loss = loss + cfg.chosen_ce_weight * ce
            self._record("chosen_ce", ce.item() * chosen_tokens, chosen_tokens)
        if self.is_moe:
            balance = balance_loss(self.model, self.router_collector.pop(), pair["attention_mask"])
            loss = loss + cfg.balance_coef * balance
            self._record("balance", balance.item())
        margins = (chosen_rewards - rejected_rewards).detach()
        self._record("rewards/chosen", chosen_rewards.sum().item(), n)
        self._record("rewards/rejected", rejected_rewards.sum().item(), n)
        self._record("rewards/margin", margins.sum().item(), n)
        self._record("rewards/accuracy", (margins > 0).float().sum().item(), n)
        self._record("logps/chosen", policy_chosen.detach().sum().item(), n)
        self._record("logps/rejected", policy_rejected.detach().sum().item(), n)
        check_finite(loss, self.state.global_step + 1, inputs.get("sample_ids", []), self.args.output_dir)
        self._tokens_since_log += int(pair["attention_mask"].sum())
        return (loss, None) if return_outputs else loss
