"""Router-logit collection, balance loss and expert-load statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from helpers import vlm_batch
from modistill.errors import UserError
from modistill.models.build import build_vlm
from modistill.models.tiny import tiny_spec
from modistill.moe import RouterLogitsCollector, balance_loss, expert_load, resolve_moe_layers
from modistill.upcycle import upcycle


def _bare_moe():
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    )
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for block in (model.model.layers[0].mlp, model.model.layers[2].mlp):
            block.gate.weight.normal_(0, 1.0)
    return model


def test_collector_matches_the_models_own_router_logits():
    model = _bare_moe()
    ids = torch.randint(0, 50, (2, 6))
    with RouterLogitsCollector(model) as collector:
        out = model(ids, output_router_logits=True)
        collected = collector.pop()
    assert len(collected) == 2 == len(out.router_logits)
    for mine, theirs in zip(collected, out.router_logits):
        assert mine.shape == (12, 4)
        assert torch.allclose(mine, theirs)
    assert collector.pop() == ()  # pop clears


def test_collector_works_inside_llava_which_returns_no_router_logits(tok_dir):
    model, processor = build_vlm(tiny_spec(tok_dir, layers=3))
    moe = upcycle(model, layers="every-other")
    batch = vlm_batch(processor, n=2)
    with RouterLogitsCollector(moe) as collector:
        out = moe(**batch, output_router_logits=True)
        logits = collector.pop()
    assert getattr(out, "router_logits", None) is None  # the wrapper drops them: why the hook exists
    tokens = batch["input_ids"].numel()
    assert [t.shape for t in logits] == [(tokens, 4), (tokens, 4)]
    loss = balance_loss(moe, logits, batch["attention_mask"])
    loss.backward()
    assert moe.model.language_model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def _reference_balance(logits: np.ndarray, top_k: int, mask: np.ndarray) -> float:
    """E * sum_e m_e c_e for one layer, in float64 (c_e: share of top-k assignments per token)."""
    logits = logits[mask.astype(bool)]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1)[:, :top_k]
    num_experts = logits.shape[1]
    counts = np.zeros(num_experts)
    for row in chosen:
        counts[row] += 1
    c = counts / len(logits)
    m = probs.mean(0)
    return float(num_experts * (c * m).sum())


def test_balance_loss_is_summed_per_layer_and_matches_float64():
    model = _bare_moe()
    rng = np.random.default_rng(0)
    layers = tuple(torch.tensor(rng.normal(size=(10, 4)), dtype=torch.float32) for _ in range(2))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    got = balance_loss(model, layers, mask).item()
    want = sum(_reference_balance(layer.double().numpy(), 2, mask.reshape(-1).numpy()) for layer in layers)
    assert got == pytest.approx(want, rel=1e-5)
    # Uniform router probabilities give E * sum_e c_e / E = k per layer, whatever the choices.
    uniform = tuple(torch.zeros(8, 4) for _ in range(2))
    assert balance_loss(model, uniform).item() == pytest.approx(2 * 2, rel=1e-5)


def test_expert_load_counts_top1_and_topk_choices():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0], [5.0, 0.0, 4.0, 0.0], [0.0, 0.0, 4.0, 5.0], [9.0, 9.5, 0, 0]])
    load = expert_load((logits,), top_k=2)
    assert load["top1"].tolist() == [[0.5, 0.25, 0.0, 0.25]]
    assert load["topk"].tolist() == [[0.375, 0.25, 0.25, 0.125]]
    masked = expert_load((logits,), top_k=2, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    assert masked["top1"][0].tolist() == pytest.approx([2 / 3, 0.0, 0.0, 1 / 3])


def test_resolve_moe_layers():
    assert resolve_moe_layers("every-other", 5) == [0, 2, 4]
    assert resolve_moe_layers("all", 3) == [0, 1, 2]
    assert resolve_moe_layers("3, 1", 4) == [1, 3]
    with pytest.raises(UserError, match="out of range"):
        resolve_moe_layers("4", 4)
    with pytest.raises(UserError, match="comma list"):
        resolve_moe_layers("odd", 4)
