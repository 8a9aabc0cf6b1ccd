"""MoE utilities the trainers need: which layers are sparse, router logits, balance loss, expert load.

transformers' `LlavaModel` never returns router logits (not even with `output_router_logits`), so
a forward hook on each router module collects them. The balance loss is the MoE model's own
`load_balancing_loss_func`, applied per layer and summed (the paper sums over MoE layers; calling
it once on all layers would pool them instead).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from modistill.errors import UserError


def resolve_moe_layers(layers: str | list[int], num_layers: int) -> list[int]:
    """`every-other` -> 0, 2, 4, ... (the paper); `all`; or a comma list / list of indices."""
    if isinstance(layers, str):
        key = layers.strip().lower()
        if key == "every-other":
            return list(range(0, num_layers, 2))
        if key == "all":
            return list(range(num_layers))
        try:
            indices = [int(x) for x in key.split(",") if x.strip() != ""]
        except ValueError:
            raise UserError(
                f"--layers {layers!r}: expected every-other, all, or a comma list of layer indices like 0,2,5"
            ) from None
    else:
        indices = list(layers)
    if not indices:
        raise UserError("--layers: no layer selected; give every-other, all, or indices like 0,2")
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"--layers: index {bad[0]} is out of range; the model has layers 0..{num_layers - 1}")
    return sorted(set(indices))


def language_model(model: nn.Module) -> Any:
    """The decoder stack (`...Model` with `.layers`) of a Llava VLM or a bare causal LM.

    Typed `Any`: transformers models expose their sub-modules as dynamic attributes.
    """
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    if not hasattr(inner, "layers"):
        raise UserError(f"{type(model).__name__}: cannot find the decoder layers of this model")
    return inner


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "text_config", None) or config


def sparse_blocks(model: nn.Module) -> dict[int, Any]:
    """Layer index -> MoE block (a module with a router `gate` and fused `experts`)."""
    blocks = {}
    for idx, layer in enumerate(language_model(model).layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "experts") and hasattr(mlp, "gate"):
            blocks[idx] = mlp
    return blocks


def num_experts_of(config) -> int:
    cfg = text_config(config)
    return int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", 0) or 0)


def top_k_of(config) -> int:
    return int(getattr(text_config(config), "num_experts_per_tok", 0) or 0)


class RouterLogitsCollector:
    """Collects each MoE layer's router logits ([tokens, experts]) on every forward.

    Keeps only the latest logits per layer, so activation checkpointing (which reruns forwards
    during backward) does not duplicate them. Use as a context manager or call `close()`.
    """

    def __init__(self, model: nn.Module):
        self._logits: dict[int, torch.Tensor] = {}
        self._handles = []
        for idx, block in sparse_blocks(model).items():
            self._handles.append(block.gate.register_forward_hook(self._hook(idx)))

    def _hook(self, idx: int):
        def record(module, args, output):
            # Routers return (router_logits, scores, indices) in transformers 5; older ones a tensor.
            self._logits[idx] = output[0] if isinstance(output, tuple) else output

        return record

    def pop(self) -> tuple[torch.Tensor, ...]:
        """The logits of the last forward, in layer order; clears the store."""
        logits = tuple(self._logits[i] for i in sorted(self._logits))
        self._logits.clear()
        return logits

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._logits.clear()

    def __enter__(self) -> RouterLogitsCollector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _hf_balance_loss_fn(model: nn.Module):
    """The `load_balancing_loss_func` of the model's own modeling module (Qwen3-MoE, Mixtral, ...)."""
    module = importlib.import_module(type(language_model(model)).__module__)
    fn = getattr(module, "load_balancing_loss_func", None)
    if fn is None:
        raise UserError(f"{type(language_model(model)).__name__} has no load_balancing_loss_func")
    return fn


def balance_loss(
    model: nn.Module, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard balance loss E * sum_e m_e c_e, per MoE layer, summed over layers (fp32).

    router_logits: one [batch*seq, experts] tensor per MoE layer; attention_mask: [batch, seq]
    (padding excluded). Returns a 0-d tensor (0 when there is no MoE layer).
    """
    if not router_logits:
        return torch.zeros((), dtype=torch.float32)
    fn = _hf_balance_loss_fn(model)
    num_experts, top_k = num_experts_of(model), top_k_of(model)
    total = torch.zeros((), dtype=torch.float32, device=router_logits[0].device)
    for layer_logits in router_logits:
        total = total + fn((layer_logits.float(),), num_experts, top_k, attention_mask)
    return total


@torch.no_grad()
def expert_load(
    router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-layer share of tokens whose top-1 (resp. top-k) choice is each expert.

    Returns {"top1": [layers, experts], "topk": [layers, experts]}; each top-1 row sums to 1,
    each top-k row to 1 as well (shares of the k·tokens assignments).
    """
    if not router_logits:
        return {"top1": torch.zeros(0, 0), "topk": torch.zeros(0, 0)}
    num_experts = router_logits[0].shape[-1]
    keep = None if attention_mask is None else attention_mask.reshape(-1).bool()
    top1_rows, topk_rows = [], []
    for logits in router_logits:
        logits = logits.detach().float()
        if keep is not None:
            logits = logits[keep.to(logits.device)]
        chosen = logits.topk(top_k, dim=-1).indices
        top1 = torch.bincount(chosen[:, 0], minlength=num_experts).float()
        topk = torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
        top1_rows.append(top1 / top1.sum().clamp_min(1))
        topk_rows.append(topk / topk.sum().clamp_min(1))
    return {"top1": torch.stack(top1_rows).cpu(), "topk": torch.stack(topk_rows).cpu()}


def set_experts_implementation(model: nn.Module, name: str | None) -> None:
    """Choose the experts kernel of an MoE model (no-op for dense models or `name=None`)."""
    if name is not None and sparse_blocks(model):
        language_model(model).set_experts_implementation(name)
