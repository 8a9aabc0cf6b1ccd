"""Parameter counts: activated = what one token uses, checked against a count by hand."""

from __future__ import annotations

import json

import pytest
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from helpers import run_cli
from modistill.info import parameter_counts
from modistill.models.build import build_vlm
from modistill.models.tiny import tiny_spec
from modistill.upcycle import upcycle


def test_activated_parameters_match_a_hand_count():
    V, H, I, MI, L, NH, NKV, HD, E, K = 50, 32, 64, 48, 3, 4, 2, 8, 4, 2  # noqa: E741  (I: intermediate size)
    cfg = Qwen3MoeConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=I,
        moe_intermediate_size=MI,
        num_hidden_layers=L,
        num_attention_heads=NH,
        num_key_value_heads=NKV,
        head_dim=HD,
        num_experts=E,
        num_experts_per_tok=K,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(cfg)
    attention = H * NH * HD + 2 * H * NKV * HD + NH * HD * H + 2 * HD  # q, k, v, o, q_norm, k_norm
    norms = 2 * H
    dense_mlp = 3 * H * I
    router, expert = E * H, 3 * H * MI
    embeddings = 2 * V * H + H  # input embeddings, untied LM head, final norm
    total = embeddings + L * (attention + norms) + dense_mlp + 2 * (router + E * expert)
    activated = embeddings + L * (attention + norms) + dense_mlp + 2 * (router + K * expert)
    counts = parameter_counts(model)
    assert counts["total"] == total
    assert counts["activated"] == activated
    assert counts["vision"] == counts["projector"] == 0


@pytest.mark.slow
def test_info_cli_on_an_upcycled_vlm(tok_dir, tmp_path):
    model, processor = build_vlm(tiny_spec(tok_dir, layers=2))
    moe = upcycle(model, num_experts=4, top_k=2)
    moe.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    result = run_cli("info", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["experts"] == 4 and info["top_k"] == 2 and info["sparse_layers"] == [0]
    assert info["image_tokens"] == 4 and info["vocab_size"] == len(processor.tokenizer)
    p = info["parameters"]
    experts = sum(t.numel() for t in moe.model.language_model.layers[0].mlp.experts.parameters())
    assert p["total"] - p["activated"] == experts // 2
    assert p["total"] == sum(t.numel() for t in moe.parameters())
    text = run_cli("info", str(tmp_path)).stdout
    assert "activated" in text and "sparse layers    0" in text
