"""Preference-distillation losses on sequence log-probs (LLaVA-MoD stage 2).

The policy is the sparse student, the reference the frozen dense teacher (docs/method.md). Every
function takes per-sequence log-probs, so the teacher's two numbers per pair can be precomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PREFERENCE_KINDS: tuple[str, ...] = ("kto_pair", "sigmoid", "ipo", "hinge")


def sequence_logps(token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Sequence log-prob from per-token log-probs.

    Args:
        token_logps: [B, T] log p(token) (already shifted: position t scores token t+1).
        mask: [B, T] bool, True on response tokens.
        average: False sums over response tokens (log pi(y)); True takes their mean (0 for a
            sequence without response tokens).

    Returns:
        [B] fp32 (fp64 for fp64 input).
    """
    if token_logps.dim() != 2 or token_logps.shape != mask.shape:
        raise ValueError(
            f"token_logps and mask must both be [B, T], got {tuple(token_logps.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    values = token_logps.to(torch.promote_types(token_logps.dtype, torch.float32))
    # masked_fill, not multiplication: padding positions may hold -inf (0 * -inf is NaN).
    total = values.masked_fill(~mask, 0.0).sum(-1)
    if average:
        return total / mask.sum(-1).clamp_min(1).to(total.dtype)
    return total


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    kind: str = "kto_pair",
    detach_kl: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Paired preference loss between policy and reference sequence log-probs.

    With Δ_w = policy_chosen - ref_chosen and Δ_l = policy_rejected - ref_rejected, all [B]:
      "kto_pair" (LLaVA-MoD's shipped loss): KL_w = max(0, mean_B Δ_w), KL_l = max(0, mean_B Δ_l);
          loss = mean over the 2B values [1 - σ(β(Δ_w - KL_l))] ++ [1 - σ(β(KL_w - Δ_l))].
          The KL terms are a reference point, not something to optimise: with detach_kl=True
          (default) they carry no gradient, as the KTO paper prescribes and TRL's KTOTrainer does,
          so the policy is not rewarded for moving the batch mean instead of each sample.
          detach_kl=False lets gradient flow through them, which reproduces TRL's old DPOTrainer
          "kto_pair" and LLaVA-MoD's official code (neither detaches).
      "sigmoid" (DPO): -log σ(β(Δ_w - Δ_l)), mean.
      "ipo": (Δ_w - Δ_l - 1/(2β))², mean (TRL's IPO convention).
      "hinge": relu(1 - β(Δ_w - Δ_l)), mean.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [B].
        beta: > 0.
        kind: one of PREFERENCE_KINDS.

    Returns:
        (loss [], chosen_rewards [B], rejected_rewards [B]); rewards are β·Δ, detached. fp32
        (fp64 if an input is fp64).
    """
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"unknown preference loss kind {kind!r}; valid kinds: {', '.join(PREFERENCE_KINDS)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    inputs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(x.shape) for x in inputs}
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1 or policy_chosen_logps.shape[0] == 0:
        raise ValueError(
            f"the four log-prob tensors must all be [B] with B >= 1, got shapes {[tuple(x.shape) for x in inputs]}"
        )
    dtype = torch.float32
    for x in inputs:
        dtype = torch.promote_types(dtype, x.dtype)
    pc, pr, rc, rr = (x.to(dtype) for x in inputs)
    chosen_delta = pc - rc
    rejected_delta = pr - rr

    if kind == "kto_pair":
        kl_chosen = chosen_delta.mean().clamp(min=0)
        kl_rejected = rejected_delta.mean().clamp(min=0)
        if detach_kl:
            kl_chosen, kl_rejected = kl_chosen.detach(), kl_rejected.detach()
        losses = torch.cat(
            [
                1 - torch.sigmoid(beta * (chosen_delta - kl_rejected)),
                1 - torch.sigmoid(beta * (kl_chosen - rejected_delta)),
            ]
        )
    else:
        margin = chosen_delta - rejected_delta
        if kind == "sigmoid":
            losses = -F.logsigmoid(beta * margin)
        elif kind == "ipo":
            losses = (margin - 1 / (2 * beta)) ** 2
        else:  # hinge
            losses = torch.relu(1 - beta * margin)

    return losses.mean(), beta * chosen_delta.detach(), beta * rejected_delta.detach()
