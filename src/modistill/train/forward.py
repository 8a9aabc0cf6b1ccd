"""Run a model and keep only what the losses need: final hidden states at response positions.

The LM head is applied later, chunk by chunk (modistill.losses.fused), so full-vocabulary logits
for every position never exist. `logits_to_keep=1` makes transformers compute logits for the last
position only; the forward still goes through the (possibly DDP-wrapped) model itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ResponseStates:
    hidden: torch.Tensor  # [N, H] final (normed) hidden state at each position that predicts a response token
    targets: torch.Tensor  # [N] the token each of those positions predicts (labels shifted by one)
    counts: torch.Tensor  # [B] response tokens per sample (rows of `hidden` are grouped by sample, in order)


def model_inputs(batch: dict, prefix: str = "") -> tuple[dict, torch.Tensor]:
    """Pick the forward inputs (`input_ids`, `attention_mask`, `pixel_values`) from a batch.

    With prefix "teacher_" the teacher's own rendering is used when the collator made one
    (a teacher with a different processor), else the student's.
    """
    key = (lambda name: f"{prefix}{name}") if f"{prefix}input_ids" in batch else (lambda name: name)
    inputs = {"input_ids": batch[key("input_ids")], "attention_mask": batch[key("attention_mask")]}
    if key("pixel_values") in batch:
        inputs["pixel_values"] = batch[key("pixel_values")]
    return inputs, batch[key("labels")]


def response_states(model: nn.Module, inputs: dict, labels: torch.Tensor) -> ResponseStates:
    """Forward `model` and select the hidden states of response positions (shifted: t predicts t+1)."""
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1]
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != -100
    return ResponseStates(hidden[:, :-1][mask], shifted_labels[mask], mask.sum(dim=1))


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM-head weight [V, H] (and bias) of a model, unwrapping DDP-style wrappers."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)
