"""Run a model and keep only what the losses need: final hidden states at response positions.

The LM head is applied later, chunk by chunk (modistill.losses.fused), so full-vocabulary logits
for every position never exist. `logits_to_keep=1` makes transformers compute logits for the last
position only; the forward still goes through the (possibly DDP-wrapped) model itself.

Preference pairs run chosen and rejected in one forward of 2B rows (`pair_inputs`, `pair_logps`).
Student, live teacher and the precomputed reference all use these functions, so a sample is
rendered, moved and scored the same way wherever it is seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modistill.losses.fused import chunked_token_logps


@dataclass
class ResponseStates:
    hidden: torch.Tensor  # [N, H] final (normed) hidden state at each position that predicts a response token
    targets: torch.Tensor  # [N] the token each of those positions predicts (labels shifted by one)
    counts: torch.Tensor  # [B] response tokens per sample (rows of `hidden` are grouped by sample, in order)


def model_inputs(batch: dict, prefix: str = "") -> tuple[dict, torch.Tensor]:
    """Pick the forward inputs (`input_ids`, `attention_mask`, `pixel_values`, `position_ids`) from a batch.

    With prefix "teacher_" the teacher's own rendering is used when the collator made one
    (a teacher with a different processor), else the student's.
    """
    key = (lambda name: f"{prefix}{name}") if f"{prefix}input_ids" in batch else (lambda name: name)
    inputs = {"input_ids": batch[key("input_ids")], "attention_mask": batch[key("attention_mask")]}
    for name in ("pixel_values", "position_ids"):  # position_ids: a packed batch (data.packing)
        if key(name) in batch:
            inputs[name] = batch[key(name)]
    return inputs, batch[key("labels")]


def to_model(model: nn.Module, inputs: dict, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Move inputs and labels to `model`'s device, pixels in its dtype (a frozen teacher may run in bf16)."""
    param = next(model.parameters())
    moved = {k: v.to(param.device) for k, v in inputs.items()}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(param.dtype)
    return moved, labels.to(param.device)


def response_states(model: nn.Module, inputs: dict, labels: torch.Tensor) -> ResponseStates:
    """Forward `model` and select the hidden states of response positions (shifted: t predicts t+1).

    A packed batch (`position_ids` given) runs without its attention mask, which is how transformers
    knows to keep attention within each packed sample; its `counts` are per sample, not per row.
    """
    packed = "position_ids" in inputs
    forward = {k: v for k, v in inputs.items() if not (packed and k == "attention_mask")}
    out = model(**forward, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1]
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != -100
    counts = packed_counts(inputs["position_ids"], mask) if packed else mask.sum(dim=1)
    return ResponseStates(hidden[:, :-1][mask], shifted_labels[mask], counts)


def packed_counts(position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Response tokens per packed sample [n_samples] (a sample starts where its position is 0).

    position_ids: [R, T]; mask: [R, T-1] (the shifted response positions)."""
    starts = (position_ids == 0).flatten()
    sample_of = starts.cumsum(0).view_as(position_ids) - 1
    return torch.bincount(sample_of[:, :-1][mask], minlength=int(starts.sum()))


def output_head(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM-head weight [V, H] (and bias) of a model, unwrapping DDP-style wrappers."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, length - t.shape[1]), value=value)


def pair_inputs(batch: dict, prefix: str = "", pad_id: int = 0) -> tuple[dict, torch.Tensor]:
    """Stack chosen over rejected (right-padded to one length) -> inputs for 2B rows, labels [2B, T].

    With prefix "teacher_", the teacher's own rendering is used when the collator made one.
    """
    if f"{prefix}chosen_input_ids" not in batch:
        prefix = ""
    c, r = f"{prefix}chosen_", f"{prefix}rejected_"
    length = max(batch[c + "input_ids"].shape[1], batch[r + "input_ids"].shape[1])
    ids = torch.cat([_pad_to(batch[c + "input_ids"], length, pad_id), _pad_to(batch[r + "input_ids"], length, pad_id)])
    mask = torch.cat([_pad_to(batch[c + "attention_mask"], length, 0), _pad_to(batch[r + "attention_mask"], length, 0)])
    labels = torch.cat([_pad_to(batch[c + "labels"], length, -100), _pad_to(batch[r + "labels"], length, -100)])
    inputs = {"input_ids": ids, "attention_mask": mask}
    pixels = batch.get(f"{prefix}pixel_values", batch.get("pixel_values"))
    if pixels is not None:
        inputs["pixel_values"] = torch.cat([pixels, pixels])  # both answers see the same image(s)
    return inputs, labels


def pair_logps(
    model: nn.Module, inputs: dict, labels: torch.Tensor, mode: str = "sum", chunk_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence log-probs [2B] (sum or mean over response tokens), token log-probs [N], counts [2B]."""
    states = response_states(model, inputs, labels)
    weight, bias = output_head(model)
    token_logps = chunked_token_logps(states.hidden, weight, states.targets, chunk_size=chunk_size, head_bias=bias)
    rows = torch.repeat_interleave(torch.arange(len(states.counts), device=token_logps.device), states.counts)
    seq = torch.zeros(len(states.counts), dtype=token_logps.dtype, device=token_logps.device)
    seq = seq.index_add(0, rows, token_logps)
    if mode == "mean":
        seq = seq / states.counts.clamp_min(1).to(seq.dtype)
    return seq, token_logps, states.counts


@torch.no_grad()
def frozen_pair_logps(
    model: nn.Module, batch: dict, pad_id: int, mode: str, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen model's (the teacher's) sequence log-probs of a batch of pairs: chosen [B], rejected [B] fp32.

    The teacher reads its own rendering when the collator made one (prefix "teacher_").
    """
    inputs, labels = to_model(model, *pair_inputs(batch, "teacher_", pad_id))
    seq, _, _ = pair_logps(model, inputs, labels, mode, chunk_size)
    chosen, rejected = seq.float().chunk(2)
    return chosen, rejected
