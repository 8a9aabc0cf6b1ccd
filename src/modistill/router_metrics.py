"""Router and expert metrics during distillation: entropy, dead experts, routing drift since upcycling.

Pure functions on router logits ([tokens, experts], the routers' raw `F.linear` outputs), and a
`RouterMonitor` the MoE trainers (stage 1b, stage 2) feed once per micro-batch and read at each log:

- router entropy: mean over tokens of the entropy (nats) of the router softmax; log E is uniform;
- dead experts: share of experts whose top-1 share is below 1 % (they stop receiving gradient);
- top-k changed: share of tokens whose top-k expert *set* differs from what the routers chose at
  upcycling, on the same hidden states. A frozen copy of the initial router weights ([E, H] each,
  tiny) scores the router's own input inside a forward hook, so no second model forward is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from modistill.moe import sparse_blocks, top_k_of

DEAD_SHARE = 0.01
ROUTERS_FILE = "routers_at_upcycling.safetensors"  # written by stage 1b beside the student


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[T] entropy (nats) of softmax(logits) per token, fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def router_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over (unmasked) tokens of the router softmax's entropy."""
    ent = token_entropy(logits)
    if mask is not None:
        ent = ent[mask.reshape(-1).bool().to(ent.device)]
    return float(ent.mean()) if ent.numel() else float("nan")


def dead_expert_share(top1_share: torch.Tensor, threshold: float = DEAD_SHARE) -> torch.Tensor:
    """Share of experts (last dim) whose top-1 share is below `threshold`; one value per leading row."""
    return (top1_share < threshold).float().mean(-1)


def topk_changed(logits: torch.Tensor, initial_logits: torch.Tensor, k: int) -> torch.Tensor:
    """[T] bool: the token's top-k expert set (order ignored) differs between the two routings."""
    now = logits.topk(k, dim=-1).indices.sort(-1).values
    before = initial_logits.topk(k, dim=-1).indices.sort(-1).values
    return (now != before).any(-1)


def initial_routers(model: nn.Module) -> dict[int, torch.Tensor]:
    """A frozen copy of each MoE layer's router weight [E, H], by layer index."""
    return {i: b.gate.weight.detach().clone().float().cpu() for i, b in sparse_blocks(model).items()}


def save_routers(path: str | Path, routers: dict[int, torch.Tensor]) -> None:
    save_file({f"L{i}": w.contiguous() for i, w in routers.items()}, str(path))


def load_routers(path: str | Path) -> dict[int, torch.Tensor]:
    return {int(k[1:]): v for k, v in load_file(str(path)).items()}


class RouterMonitor:
    """Per-layer entropy, top-1 load, dead experts and top-k drift, accumulated between logs."""

    def __init__(self, model: nn.Module, initial: dict[int, torch.Tensor] | None = None):
        blocks = sparse_blocks(model)
        self.layers = sorted(blocks)
        self.k = top_k_of(model)
        initial = initial if initial is not None else initial_routers(model)
        self._initial = {i: initial[i] for i in self.layers if i in initial}
        self._changed: dict[int, torch.Tensor] = {}  # the last forward's per-token flags
        self._handles = [blocks[i].gate.register_forward_hook(self._hook(i)) for i in self._initial]
        self.reset()

    def _hook(self, idx: int):
        def record(module, args, output):
            with torch.no_grad():
                hidden = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                logits = output[0] if isinstance(output, tuple) else output
                w0 = self._initial[idx].to(hidden.device)
                self._changed[idx] = topk_changed(logits.detach().float(), F.linear(hidden, w0), self.k)

        return record

    def reset(self) -> None:
        n = len(self.layers)
        self._entropy, self._tokens = torch.zeros(n), 0
        self._top1: torch.Tensor | None = None
        self._changed_sum = torch.zeros(n)

    @torch.no_grad()
    def observe(self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> None:
        """Add one micro-batch: its router logits (layer order) and the mask of real tokens."""
        if not router_logits:
            return
        keep = None if attention_mask is None else attention_mask.reshape(-1).bool()
        for row, (idx, logits) in enumerate(zip(self.layers, router_logits, strict=True)):
            sel = keep.to(logits.device) if keep is not None else slice(None)
            logits = logits.detach().float()[sel]
            self._entropy[row] += float(token_entropy(logits).sum())
            top1 = torch.bincount(logits.argmax(-1), minlength=logits.shape[-1]).float().cpu()
            if self._top1 is None:
                self._top1 = torch.zeros(len(self.layers), logits.shape[-1])
            self._top1[row] += top1
            changed = self._changed.get(idx)
            if changed is not None and changed.numel() == (keep.numel() if keep is not None else changed.numel()):
                self._changed_sum[row] += float(changed[sel].float().sum())
        self._tokens += int(keep.sum()) if keep is not None else router_logits[0].shape[0]
        self._changed.clear()

    def logs(self) -> dict[str, float]:
        """`router/L{l}/entropy`, `.../dead_experts`, `.../topk_changed`, and their means over layers; resets."""
        if not self._tokens or self._top1 is None:
            return {}
        share = self._top1 / self._top1.sum(-1, keepdim=True).clamp_min(1)
        entropy = self._entropy / self._tokens
        dead = dead_expert_share(share)
        changed = self._changed_sum / self._tokens
        out: dict[str, float] = {}
        for row, layer in enumerate(self.layers):
            out[f"router/L{layer}/entropy"] = float(entropy[row])
            out[f"router/L{layer}/dead_experts"] = float(dead[row])
            out[f"router/L{layer}/topk_changed"] = float(changed[row])
        out["router/entropy"] = float(entropy.mean())
        out["router/dead_experts"] = float(dead.mean())
        out["router/topk_changed"] = float(changed.mean())
        self.reset()
        return out

    @property
    def initial(self) -> dict[int, torch.Tensor]:
        """The frozen router weights metrics compare against, by layer."""
        return dict(self._initial)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
