"""Global-batch balance loss: against transformers' `load_balancing_loss_func`, and rank splits.

The 2-process training run that checks the all_reduce inside the Trainer is in
tests/test_distributed.py; here two "ranks" are token halves of one batch, combined by hand
exactly as `all_reduce_stats` combines them.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_balance
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func as qwen3_balance

from modistill.losses.balance import (
    BalanceStats,
    all_reduce_stats,
    balance_from_stats,
    balance_stats,
    balance_terms,
)

LAYERS, EXPERTS, TOP_K = 3, 4, 2


def router_logits(tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple((2 * torch.randn(tokens, EXPERTS, generator=g)).requires_grad_() for _ in range(LAYERS))


def hf_balance(logits, mask, fn=qwen3_balance) -> torch.Tensor:
    """The MoE models' own loss, per layer and summed (the project's convention)."""
    return sum(fn((layer,), EXPERTS, TOP_K, mask) for layer in logits)


@pytest.mark.parametrize("fn", [qwen3_balance, mixtral_balance])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_one_process_one_micro_batch_equals_transformers(fn, masked, scope):
    logits = router_logits(12)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]) if masked else None
    want = hf_balance(logits, mask, fn)
    want_grads = torch.autograd.grad(want, logits)
    got = balance_terms(logits, TOP_K, mask, scope=scope)
    assert torch.allclose(got.term, want, rtol=1e-6, atol=0)
    assert torch.allclose(got.value, want.detach(), rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(got.term, logits), want_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_stats_count_topk_top1_and_skip_padding():
    logits = (torch.tensor([[5.0, 4.0, 0.0, 0.0], [5.0, 0.0, 4.0, 0.0], [0.0, 0.0, 4.0, 5.0], [9.0, 9.5, 0, 0]]),)
    stats = balance_stats(logits, 2, torch.tensor([[1, 1, 1, 0]]))
    assert stats.counts.tolist() == [[2.0, 1.0, 2.0, 1.0]]
    assert stats.top1.tolist() == [[2.0, 0.0, 0.0, 1.0]]
    assert float(stats.tokens) == 3.0
    assert torch.allclose(stats.prob_sums, torch.softmax(logits[0][:3], -1).sum(0, keepdim=True))


def combine(parts: list[BalanceStats]) -> BalanceStats:
    """What all_reduce_stats returns on every rank: the sum of the ranks' detached statistics."""
    return BalanceStats(
        sum(p.counts for p in parts),
        sum(p.top1 for p in parts),
        sum(p.prob_sums.detach() for p in parts),
        sum(p.tokens for p in parts),
    )


def test_global_terms_of_ranks_average_to_the_union_loss_and_gradient():
    world, per_rank = 2, 10
    union = router_logits(world * per_rank, seed=1)
    mask = torch.ones(world * per_rank, dtype=torch.long)
    mask[7:10] = 0  # rank 0 has padding, rank 1 none: the token counts differ
    want = hf_balance(union, mask[None])
    want_grads = torch.autograd.grad(want, union)

    ranks = [tuple(layer[r * per_rank : (r + 1) * per_rank] for layer in union) for r in range(world)]
    masks = [mask[r * per_rank : (r + 1) * per_rank][None] for r in range(world)]
    local = [balance_stats(ranks[r], TOP_K, masks[r]) for r in range(world)]
    total = combine(local)
    # Each rank's term with the global counts; DDP averages the ranks' gradients (hence / world).
    terms = [balance_from_stats(s.prob_sums, total.counts, total.tokens, scale=world) for s in local]
    averaged = sum(terms) / world
    assert torch.allclose(averaged, want, rtol=1e-6, atol=0)
    assert torch.allclose(balance_from_stats(total.prob_sums, total.counts, total.tokens), want.detach(), rtol=1e-6)
    for a, b in zip(torch.autograd.grad(averaged, union, retain_graph=True), want_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)

    # The local scope (each rank on its own tokens, gradients averaged) is a different loss.
    local_avg = sum(balance_from_stats(s.prob_sums, s.counts, s.tokens) for s in local) / world
    local_grads = torch.autograd.grad(local_avg, union)
    assert max(float((a - b).abs().max()) for a, b in zip(local_grads, want_grads)) > 1e-3


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        union = router_logits(16, seed=2)
        mine = tuple(layer[rank * 8 : (rank + 1) * 8] for layer in union)
        got = balance_terms(mine, TOP_K, None, scope="global")
        queue.put(
            (rank, float(got.value), float(got.term), all_reduce_stats(balance_stats(mine, TOP_K)).counts.tolist())
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_all_reduce_over_two_gloo_processes_gives_the_union_statistics():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_worker, args=(2, _free_port(), queue), nprocs=2, join=True)
    results = sorted(queue.get() for _ in range(2))
    union = router_logits(16, seed=2)
    want = float(hf_balance(union, None))
    counts = balance_stats(union, TOP_K).counts
    for _, value, _, reduced in results:
        assert value == pytest.approx(want, rel=1e-6)  # every rank logs the union's loss
        assert reduced == counts.tolist()
    assert sum(r[2] for r in results) / 2 == pytest.approx(want, rel=1e-6)  # the terms average to it
