"""Named groups of parameters, and freezing everything outside the trainable groups.

Groups (by parameter name; the language model may sit inside a Llava wrapper):
    vision      the vision tower
    projector   the multimodal projector
    embeddings  input token embeddings
    attention   self-attention (incl. q/k norms)
    norms       layer norms and the final norm
    dense_mlp   the FFNs of dense (non-MoE) layers
    experts     MoE experts (and Qwen2-MoE's shared expert, empty here)
    routers     MoE routers
    lm_head     the output projection
    llm         every group of the language model (embeddings ... lm_head)

Each stage's config holds its default groups (the paper's table: stage 0 the projector, 1a the LLM +
projector, 1b and 2 experts, routers, dense FFNs and projector).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from modistill.errors import UserError
from modistill.moe import sparse_blocks

GROUPS = ("vision", "projector", "embeddings", "attention", "norms", "dense_mlp", "experts", "routers", "lm_head")
LLM_GROUPS = ("embeddings", "attention", "norms", "dense_mlp", "experts", "routers", "lm_head")


def group_of(name: str, sparse_layers: set[int]) -> str:
    """The group a parameter belongs to, from its name."""
    if "vision_tower." in name:
        return "vision"
    if "multi_modal_projector." in name:
        return "projector"
    if name.startswith("lm_head.") or ".lm_head." in name:
        return "lm_head"
    if "embed_tokens." in name:
        return "embeddings"
    if ".self_attn." in name:
        return "attention"
    match = re.search(r"layers\.(\d+)\.mlp\.(\w+)", name)
    if match:
        if int(match.group(1)) not in sparse_layers:
            return "dense_mlp"
        return "routers" if match.group(2) in ("gate", "shared_expert_gate") else "experts"
    if "norm" in name:
        return "norms"
    raise ValueError(f"parameter {name!r} belongs to no known group")  # a new architecture: extend the table


def expand_groups(groups: list[str]) -> set[str]:
    wanted: set[str] = set()
    for group in groups:
        if group == "llm":
            wanted.update(LLM_GROUPS)
        elif group in GROUPS:
            wanted.add(group)
        else:
            raise UserError(f"trainable: unknown group {group!r}; valid: {', '.join(GROUPS + ('llm',))}")
    return wanted


def set_trainable(model: nn.Module, groups: list[str]) -> dict[str, int]:
    """Freeze every parameter outside `groups`; return trainable parameter counts per group."""
    wanted = expand_groups(groups)
    sparse = set(sparse_blocks(model))
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        group = group_of(name, sparse)
        param.requires_grad_(group in wanted)
        if group in wanted:
            counts[group] = counts.get(group, 0) + param.numel()
    optional = {"experts", "routers", "dense_mlp"}
    if _tied(model):  # the LM head is the embedding matrix (SmolLM2, Qwen2-0.5B): its parameter counts once
        if "lm_head" in wanted and "embeddings" not in wanted:
            raise UserError("trainable: this model's lm_head is tied to its embeddings; train 'embeddings' instead")
        optional.add("lm_head")
    missing = [g for g in wanted if g not in counts and g not in optional]
    if missing:
        raise UserError(f"trainable: group {missing[0]!r} has no parameters in this model")
    if not counts:
        raise UserError("trainable: no parameter is trainable with these groups")
    return counts


def _tied(model: Any) -> bool:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight
