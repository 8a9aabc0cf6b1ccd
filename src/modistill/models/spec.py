"""Config dataclasses describing a LLaVA-style VLM: vision tower, projector, language model.

Each part is either built from the sizes given here (tests, the demo) or loaded from a
pretrained directory / hub id (`pretrained:`), in which case the sizes are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TEXT_TYPES = ("qwen3", "qwen2", "llama", "mistral", "qwen3_moe", "qwen2_moe", "mixtral")
MOE_TEXT_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral")


@dataclass
class VisionSpec:
    """The vision tower. SigLIP uses every patch token; CLIP drops its CLS token (LLaVA's "default")."""

    type: Literal["siglip", "clip"] = "siglip"
    pretrained: str | None = None  # dir or hub id of a SigLIP/CLIP (vision) checkpoint
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    image_size: int = 48
    patch_size: int = 16
    # Which hidden layer feeds the projector (LLaVA-1.5 and the paper: -2).
    feature_layer: int = -1


@dataclass
class TextSpec:
    """The language model. MoE types build the sparse model directly (normally you upcycle instead)."""

    type: Literal["qwen3", "qwen2", "llama", "mistral", "qwen3_moe", "qwen2_moe", "mixtral"] = "qwen3"
    pretrained: str | None = None  # dir or hub id of a causal LM checkpoint
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    head_dim: int | None = None  # default hidden_size // num_heads
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # MoE types only
    num_experts: int = 4
    top_k: int = 2
    moe_layers: str = "every-other"  # "every-other" | "all" | comma list of layer indices


@dataclass
class ModelSpec:
    """A LLaVA-style VLM: vision tower -> 2-layer GELU MLP projector -> language model."""

    vision: VisionSpec = field(default_factory=VisionSpec)
    text: TextSpec = field(default_factory=TextSpec)
    # Tokenizer dir or hub id; default: the text model's own (`text.pretrained`).
    tokenizer: str | None = None
    projector_hidden_act: str = "gelu"
    trust_remote_code: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokenizer is None and self.text.pretrained is None:
            raise ValueError("model.tokenizer is required when the language model is built from sizes")
