"""Trainable groups on a language model whose LM head is its embedding matrix (SmolLM2, Qwen2-0.5B)."""

from __future__ import annotations

import dataclasses

import pytest

from modistill.errors import UserError
from modistill.models.build import build_vlm
from modistill.models.tiny import tiny_spec
from modistill.runtime.groups import set_trainable


def test_llm_group_trains_tied_embeddings_once(tok_dir):
    spec = tiny_spec(tok_dir, text_type="llama")
    tied = dataclasses.replace(spec, text=dataclasses.replace(spec.text, tie_word_embeddings=True))
    model, _ = build_vlm(tied)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    counts = set_trainable(model, ["llm"])
    assert "lm_head" not in counts and counts["embeddings"] == model.lm_head.weight.numel()
    assert model.lm_head.weight.requires_grad
    untied, _ = build_vlm(spec)  # an untied model still must have the head it is asked to train
    assert set_trainable(untied, ["lm_head"])["lm_head"] == untied.lm_head.weight.numel()
    with pytest.raises(UserError, match="tied to its embeddings"):  # else it would silently train nothing
        set_trainable(model, ["lm_head"])
