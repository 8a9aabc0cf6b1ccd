"""The MoE load-balancing loss over the global batch (all ranks), as pure tensor functions.

Switch/GShard balance loss of one MoE layer over a set of N tokens, E experts, top-k routing:

    L = E * sum_e f_e * P_e,   f_e = c_e / N   (c_e: top-k assignments to e, detached counts)
                               P_e = S_e / N   (S_e: sum over tokens of softmax probability of e)

summed over MoE layers (as `transformers`' `load_balancing_loss_func` per layer; f sums to k).

`local` scope: each rank computes L on its own tokens and DDP/FSDP averages the ranks'
gradients, which is *not* the gradient of L over the union of the ranks' tokens. `global` scope
(Megatron-style "global-batch balance"): the detached statistics c_e, S_e and N are summed over
ranks (one all_reduce of a [layers, 3E+1] tensor per micro-batch), and each rank's differentiable
term is

    term_r = W * E * sum_e f_e^G * S_e^r / N^G      (W = world size; f^G, N^G over all ranks)

Because f^G and N^G are constants, sum_r term_r / W = E * sum_e f^G_e * P^G_e = L(union): the
averaged gradient of term_r is exactly the gradient of the balance loss of all ranks' tokens.

Gradient accumulation: inside the Trainer's per-micro-batch `compute_loss` the counts of later
micro-batches are unknown (routers depend on the whole forward, so a counting first pass would
cost a second forward). The global statistics are therefore taken over all ranks *per
micro-batch*, and the step's loss is the mean over its micro-batches. This equals a 1-process
run whose micro-batches are the union of the ranks' micro-batches (same global batch, same
accumulation steps) exactly, and it is exactly the global-batch loss when there is no
accumulation. The logged expert load uses the counts summed over ranks and all micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class BalanceStats:
    """Per-layer routing statistics of a set of tokens (one rank's micro-batch, or all ranks').

    counts:    [L, E] top-k assignments per expert (detached; padding excluded)
    top1:      [L, E] tokens whose first choice is each expert (detached; for load metrics)
    prob_sums: [L, E] sum over tokens of the router softmax probability (differentiable)
    tokens:    [] number of (unpadded) tokens N
    """

    counts: torch.Tensor
    top1: torch.Tensor
    prob_sums: torch.Tensor
    tokens: torch.Tensor


def balance_stats(
    router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None
) -> BalanceStats:
    """Routing statistics of one forward.

    router_logits: one [T, E] tensor per MoE layer (T = batch*seq tokens, pre-softmax);
    attention_mask: [batch, seq] with batch*seq = T, or None (every token counts).
    Computed in fp32 whatever the logits' dtype.
    """
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    weight = (
        torch.ones(router_logits[0].shape[0], device=device)
        if attention_mask is None
        else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    )
    counts, top1, prob_sums = [], [], []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        chosen = probs.detach().topk(top_k, dim=-1).indices  # [T, k]
        one_hot = torch.zeros_like(probs, dtype=torch.float32).scatter_(1, chosen, 1.0)  # [T, E]
        counts.append((one_hot * weight[:, None]).sum(0))
        first = torch.zeros(num_experts, device=device).scatter_add_(0, chosen[:, 0], weight)
        top1.append(first)
        prob_sums.append((probs * weight[:, None]).sum(0))
    return BalanceStats(torch.stack(counts), torch.stack(top1), torch.stack(prob_sums), weight.sum())


def balance_from_stats(
    local_prob_sums: torch.Tensor, global_counts: torch.Tensor, global_tokens: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """scale * E * sum_layers sum_e (c^G_e / N^G) * (S^local_e / N^G): a 0-d fp32 tensor.

    local_prob_sums: [L, E] (differentiable); global_counts: [L, E] and global_tokens: [] are
    treated as constants. With local == global statistics and scale 1 this is the balance loss.
    """
    num_experts = local_prob_sums.shape[-1]
    tokens = global_tokens.detach().clamp_min(1.0)
    fractions = global_counts.detach() / tokens
    return scale * num_experts * (fractions * local_prob_sums.float() / tokens).sum()


def all_reduce_stats(stats: BalanceStats) -> BalanceStats:
    """The statistics summed over all ranks (detached; a no-op without an initialised group).

    One all_reduce of a [L, 3E+1] tensor; prob_sums of the result carry no gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return BalanceStats(stats.counts, stats.top1, stats.prob_sums.detach(), stats.tokens)
    layers, experts = stats.counts.shape
    packed = torch.cat(
        [stats.counts, stats.top1, stats.prob_sums.detach(), stats.tokens.reshape(1, 1).expand(layers, 1)], dim=1
    ).contiguous()
    dist.all_reduce(packed)
    e = experts
    return BalanceStats(packed[:, :e], packed[:, e : 2 * e], packed[:, 2 * e : 3 * e], packed[0, 3 * e])


@dataclass
class BalanceTerms:
    """What a trainer needs from one micro-batch's routing.

    term:  0-d differentiable term to add to this rank's loss (before the balance coefficient)
    value: 0-d detached balance loss of the scope's tokens (all ranks for global), for logging
    stats: the scope's statistics (global: summed over ranks), for the expert-load metrics
    """

    term: torch.Tensor
    value: torch.Tensor
    stats: BalanceStats


def balance_terms(
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    scope: str = "global",
) -> BalanceTerms:
    """The balance term of this rank for `scope` `global` (statistics over all ranks) or `local`.

    For `global` every rank must call this for every micro-batch (it runs a collective). The
    term is scaled by the world size because DDP/FSDP average the ranks' gradients.
    """
    local = balance_stats(router_logits, top_k, attention_mask)
    if scope == "local":
        term = balance_from_stats(local.prob_sums, local.counts, local.tokens)
        return BalanceTerms(term, term.detach(), local)
    if scope != "global":
        raise ValueError(f"balance scope {scope!r}: expected 'global' or 'local'")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    total = all_reduce_stats(local)
    term = balance_from_stats(local.prob_sums, total.counts, total.tokens, scale=float(world))
    value = balance_from_stats(total.prob_sums, total.counts, total.tokens)
    return BalanceTerms(term, value.detach(), total)
