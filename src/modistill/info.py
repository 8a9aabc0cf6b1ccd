"""What a model directory holds: architecture, total and activated parameters, experts, image tokens."""

from __future__ import annotations

from typing import Any

from modistill.moe import language_model, num_experts_of, sparse_blocks, text_config, top_k_of


def _numel(params) -> int:
    # Tied weights (embeddings shared with the LM head) are one tensor: count each storage once.
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def parameter_counts(model: Any) -> dict[str, int]:
    """Total and activated parameter counts, and their split by part.

    Activated = what one token uses, as the paper counts it: everything except, in each MoE
    layer, the experts a token is not routed to ((E - k) of E experts). Vision tower and projector
    count in full (every image passes through them).
    """
    total = _numel(model.parameters())
    inactive = 0
    num_experts, top_k = num_experts_of(model), top_k_of(model)
    for block in sparse_blocks(model).values():
        expert_params = _numel(block.experts.parameters())
        inactive += expert_params * (num_experts - top_k) // num_experts
    inner = getattr(model, "model", model)
    vision = getattr(inner, "vision_tower", None)
    projector = getattr(inner, "multi_modal_projector", None)
    counts = {
        "total": total,
        "activated": total - inactive,
        "vision": _numel(vision.parameters()) if vision is not None else 0,
        "projector": _numel(projector.parameters()) if projector is not None else 0,
    }
    counts["language"] = total - counts["vision"] - counts["projector"]
    return counts


def describe(model: Any, processor: Any = None) -> dict[str, Any]:
    config = model.config
    tcfg = text_config(model)
    blocks = sparse_blocks(model)
    info: dict[str, Any] = {
        "architecture": type(model).__name__,
        "text_model": tcfg.model_type,
        "layers": len(language_model(model).layers),
        "hidden_size": tcfg.hidden_size,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": parameter_counts(model),
        "experts": num_experts_of(model) if blocks else 0,
        "top_k": top_k_of(model) if blocks else 0,
        "sparse_layers": sorted(blocks),
        "vocab_size": model.get_input_embeddings().num_embeddings,
    }
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is not None:
        info["tokenizer_size"] = len(tokenizer)
    if hasattr(config, "vision_config"):
        info["vision_model"] = config.vision_config.model_type
        info["image_size"] = config.vision_config.image_size
        info["patch_size"] = config.vision_config.patch_size
        info["image_tokens"] = config.image_seq_length
        info["vision_feature_select_strategy"] = config.vision_feature_select_strategy
        info["vision_feature_layer"] = config.vision_feature_layer
    return info


def format_info(info: dict[str, Any]) -> str:
    p = info["parameters"]

    def m(n: int) -> str:
        return f"{n / 1e6:,.2f}M" if n < 1e9 else f"{n / 1e9:,.2f}B"

    lines = [
        f"architecture     {info['architecture']} (text: {info['text_model']}, {info['layers']} layers, "
        f"hidden {info['hidden_size']}, {info['dtype']})",
        f"parameters       total {m(p['total'])} ({p['total']:,}), activated {m(p['activated'])} ({p['activated']:,})",
        f"  by part        vision {m(p['vision'])}, projector {m(p['projector'])}, language {m(p['language'])}",
    ]
    if info["sparse_layers"]:
        lines.append(f"experts          {info['experts']} per MoE layer, top-{info['top_k']}")
        lines.append(f"sparse layers    {', '.join(map(str, info['sparse_layers']))}")
    else:
        lines.append("experts          none (dense)")
    vocab = f"vocab            {info['vocab_size']:,} embedding rows"
    if "tokenizer_size" in info:
        vocab += f", tokenizer {info['tokenizer_size']:,} tokens"
    lines.append(vocab)
    if "image_tokens" in info:
        lines.append(
            f"vision           {info['vision_model']}, {info['image_size']} px, patch {info['patch_size']}, "
            f"{info['image_tokens']} image tokens ({info['vision_feature_select_strategy']}, layer "
            f"{info['vision_feature_layer']})"
        )
    return "\n".join(lines)
