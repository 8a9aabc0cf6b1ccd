"""Distillation and preference losses: pure tensor functions, computed in fp32."""

from modistill.losses.balance import BalanceStats, BalanceTerms, balance_from_stats, balance_stats, balance_terms
from modistill.losses.divergence import (
    DIVERGENCE_KINDS,
    coarse_logprobs,
    divergence_loss,
    per_token_divergence,
    shift_for_next_token,
    teacher_topk_to_coarse,
)
from modistill.losses.fused import chunked_token_logps, fused_distill_loss, topk_from_logits
from modistill.losses.preference import PREFERENCE_KINDS, preference_loss, sequence_logps
from modistill.losses.teachers import TeacherHidden, TeacherTopK

__all__ = [
    "BalanceStats",
    "BalanceTerms",
    "DIVERGENCE_KINDS",
    "PREFERENCE_KINDS",
    "TeacherHidden",
    "TeacherTopK",
    "balance_from_stats",
    "balance_stats",
    "balance_terms",
    "chunked_token_logps",
    "coarse_logprobs",
    "divergence_loss",
    "fused_distill_loss",
    "per_token_divergence",
    "preference_loss",
    "sequence_logps",
    "shift_for_next_token",
    "teacher_topk_to_coarse",
    "topk_from_logits",
]
