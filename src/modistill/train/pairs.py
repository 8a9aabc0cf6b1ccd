"""Sequence log-probs of preference pairs: chosen and rejected in one forward of 2B rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modistill.losses.fused import chunked_token_logps
from modistill.train.forward import output_head, response_states


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


def pair_logps(model: nn.Module, inputs: dict, labels: torch.Tensor, mode: str = "sum",
               chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence log-probs [2B] (sum or mean over response tokens), token log-probs [N], counts [2B]."""
    states = response_states(model, inputs, labels)
    weight, bias = output_head(model)
    token_logps = chunked_token_logps(states.hidden, weight, states.targets, chunk_size=chunk_size, head_bias=bias)
    rows = torch.repeat_interleave(torch.arange(len(states.counts), device=token_logps.device), states.counts)
    seq = torch.zeros(len(states.counts), dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    if mode == "mean":
        seq = seq / states.counts.clamp_min(1).to(seq.dtype)
    return seq, token_logps, states.counts
