"""Sparse upcycling: turn a dense language model (bare or inside a Llava VLM) into a native MoE.

Each chosen layer's dense FFN is copied into every expert of a transformers MoE block (fused 3-D
expert parameters: `gate_up_proj [E, 2I, H]` with rows 0:I the gate and I:2I the up projection,
`down_proj [E, H, I]`), and a new router is drawn from N(0, router_std). With identical experts and
top-k weights renormalised to sum to 1 (`norm_topk_prob=True`), the MoE model computes exactly the
dense model's function at initialisation. The output is a plain transformers model:

    Qwen3 -> Qwen3-MoE, Qwen2 -> Qwen2-MoE (shared expert of size 0), Llama/Mistral -> Mixtral (all layers)
"""

from __future__ import annotations

import copy
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from modistill.errors import UserError
from modistill.moe import language_model, resolve_moe_layers, text_config


@dataclass(frozen=True)
class _Target:
    config_cls: type[PretrainedConfig]
    causal_cls: type[PreTrainedModel]
    all_layers_only: bool
    # Dense settings the MoE architecture cannot express: (key, value it must have).
    must_be: tuple[tuple[str, object], ...] = ()


TARGETS = {
    "qwen3": _Target(Qwen3MoeConfig, Qwen3MoeForCausalLM, False, (("use_sliding_window", False),)),
    "qwen2": _Target(Qwen2MoeConfig, Qwen2MoeForCausalLM, False, (("use_sliding_window", False),)),
    "llama": _Target(
        MixtralConfig, MixtralForCausalLM, True, (("attention_bias", False), ("mlp_bias", False), ("pretraining_tp", 1))
    ),
    "mistral": _Target(MixtralConfig, MixtralForCausalLM, True),
}


def moe_text_config(
    dense: PretrainedConfig, num_experts: int, top_k: int, sparse_layers: list[int]
) -> PretrainedConfig:
    """The MoE config computing the dense config's function, with `sparse_layers` made sparse."""
    target = TARGETS[dense.model_type]
    for key, value in target.must_be:
        if getattr(dense, key, value) != value:
            raise UserError(
                f"{dense.model_type} with {key}={getattr(dense, key)!r} cannot be expressed by "
                f"{target.config_cls.model_type}; upcycling would change the model's function"
            )
    n = dense.num_hidden_layers
    if target.all_layers_only and sparse_layers != list(range(n)):
        raise UserError(f"{dense.model_type} upcycles to Mixtral, which makes every layer sparse; use --layers all")
    values = dense.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "layer_types", "max_window_layers"):
        if key == "layer_types" and dense.model_type == "qwen2":
            continue  # Qwen2-MoE has layer_types too
        values.pop(key, None)
    values.update(num_experts_per_tok=top_k, router_aux_loss_coef=0.01, output_router_logits=False)
    if target.config_cls is MixtralConfig:
        values.update(num_local_experts=num_experts, router_jitter_noise=0.0)
        for key, _ in target.must_be:
            values.pop(key, None)
    else:
        values.update(
            num_experts=num_experts,
            moe_intermediate_size=dense.intermediate_size,
            norm_topk_prob=True,  # False (the default) breaks the dense==MoE identity
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(n) if i not in sparse_layers],
        )
        if target.config_cls is Qwen2MoeConfig:
            values["shared_expert_intermediate_size"] = 0  # the method has no shared expert
    config = target.config_cls(**values)
    config.architectures = [target.causal_cls.__name__]
    return config


def plan_upcycle(
    config: PretrainedConfig, num_experts: int, top_k: int, layers: str | list[int]
) -> tuple[PretrainedConfig, list[int]]:
    """Check the request against the dense config alone (no weights needed): MoE config + sparse layers."""
    if num_experts < 2:
        raise UserError(f"--num-experts {num_experts}: an MoE needs at least 2 experts")
    if not 1 <= top_k <= num_experts:
        raise UserError(f"--top-k {top_k}: must be between 1 and --num-experts ({num_experts})")
    dense_cfg = text_config(config)
    if dense_cfg.model_type not in TARGETS:
        supported = ", ".join(TARGETS)
        raise UserError(f"cannot upcycle a {dense_cfg.model_type!r} language model; supported: {supported}")
    sparse_layers = resolve_moe_layers(layers, dense_cfg.num_hidden_layers)
    return moe_text_config(dense_cfg, num_experts, top_k, sparse_layers), sparse_layers


def upcycle(
    model: PreTrainedModel,
    num_experts: int = 4,
    top_k: int = 2,
    layers: str | list[int] = "every-other",
    router_std: float = 0.02,
    seed: int = 0,
) -> PreTrainedModel:
    """Return a new MoE model (Llava or causal LM, like the input); the input is left untouched."""
    moe_cfg, sparse_layers = plan_upcycle(model.config, num_experts, top_k, layers)
    dense_cfg = text_config(model)

    is_vlm = isinstance(model, LlavaForConditionalGeneration)
    new_config: Any
    new_cls: Any
    if is_vlm:
        new_config = copy.deepcopy(model.config)
        new_config.text_config = moe_cfg
        new_cls = LlavaForConditionalGeneration
    else:
        new_config, new_cls = moe_cfg, TARGETS[dense_cfg.model_type].causal_cls
    dtype = next(model.parameters()).dtype
    new_config.dtype = dtype

    # Build on the meta device and move tensors in, so a large model is not held twice.
    with torch.device("meta"):
        new_model = new_cls(new_config)
    lm_prefix = _prefix_of(model, language_model(model))
    generator = torch.Generator().manual_seed(seed)
    state = _upcycled_state_dict(model.state_dict(), lm_prefix, sparse_layers, num_experts, router_std, generator)
    state.update(_moe_extras(new_model, lm_prefix, sparse_layers, state))
    new_model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq, position ids) are not in state dicts: carry them over.
    for name, buf in model.named_buffers():
        _set_buffer(new_model, name, buf.clone())
    if getattr(moe_cfg, "tie_word_embeddings", False):
        new_model.tie_weights()
    leftover = [n for n, t in list(new_model.named_parameters()) + list(new_model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"upcycle left tensors uninitialised: {leftover[:3]}")  # a bug, not user input
    new_model.generation_config = copy.deepcopy(model.generation_config)
    new_model.train(model.training)
    return new_model


def _prefix_of(root: torch.nn.Module, sub: torch.nn.Module) -> str:
    for name, module in root.named_modules():
        if module is sub:
            return f"{name}." if name else ""
    raise RuntimeError("language model not found inside the model")


def _upcycled_state_dict(
    dense: dict[str, torch.Tensor],
    lm_prefix: str,
    sparse_layers: list[int],
    num_experts: int,
    router_std: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    pattern = re.compile(rf"^{re.escape(lm_prefix)}layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
    out: dict[str, torch.Tensor] = {}
    ffn: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in dense.items():
        match = pattern.match(key)
        if match and int(match.group(1)) in sparse_layers:
            ffn.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        else:
            out[key] = tensor
    for idx in sparse_layers:
        parts = ffn.get(idx)
        if parts is None or set(parts) != {"gate", "up", "down"}:
            raise UserError(f"layer {idx}: no gated dense FFN (gate/up/down projections) to upcycle")
        base = f"{lm_prefix}layers.{idx}.mlp."
        gate_up = torch.cat([parts["gate"], parts["up"]], dim=0)  # [2I, H]
        out[base + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(num_experts, 1, 1).contiguous()
        out[base + "experts.down_proj"] = parts["down"].unsqueeze(0).repeat(num_experts, 1, 1).contiguous()
        hidden = parts["gate"].shape[1]
        router = torch.randn(num_experts, hidden, generator=generator) * router_std
        out[base + "gate.weight"] = router.to(parts["gate"].dtype)
    return out


def _moe_extras(
    new_model: PreTrainedModel, lm_prefix: str, sparse_layers: list[int], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Tensors the MoE architecture has beyond the dense one (Qwen2-MoE's empty shared expert)."""
    extras = {}
    dtype = next(iter(state.values())).dtype
    for name, param in new_model.state_dict().items():
        if name not in state and name.startswith(lm_prefix) and ".shared_expert" in name:
            extras[name] = torch.zeros(param.shape, dtype=dtype)
    return extras


def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, buf_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if buf_name in module._buffers:
        module._buffers[buf_name] = value


# ------------------------------------------------------------------ model-only input directories

# What a processor or tokenizer may have written beside a model (upcycling keeps them unchanged).
PROCESSOR_FILE_PATTERNS = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "*.tiktoken",
)


def load_dense_model(path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model of a directory or hub id, Llava or causal LM, without its processor (upcycling needs none)."""
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    auto = AutoModelForImageTextToText if config.model_type == "llava" else AutoModelForCausalLM
    return auto.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)


def copy_processor_files(src: str | Path, dst: str | Path, trust_remote_code: bool = False) -> Any:
    """Put whatever processor/tokenizer files `src` has into `dst`; return the processor they load as, or None.

    A local directory's files are copied byte for byte (nothing is re-serialised, so a processor this
    transformers version writes differently stays as it was); from a hub id the processor is loaded
    and saved. A directory holding only the model yields None, and the MoE is saved alone.
    """
    src_dir, dst_dir = Path(src), Path(dst)
    if src_dir.is_dir():
        for pattern in PROCESSOR_FILE_PATTERNS:
            for file in sorted(src_dir.glob(pattern)):
                target = dst_dir / file.relative_to(src_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)
        return _processor_of(dst_dir, trust_remote_code)
    processor = _processor_of(str(src), trust_remote_code)
    if processor is not None:
        processor.save_pretrained(str(dst_dir))
    return processor


def _processor_of(path: str | Path, trust_remote_code: bool) -> Any:
    for auto in (AutoProcessor, AutoTokenizer):
        try:
            return auto.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError, KeyError):
            continue  # no processor (or no tokenizer) files: a valid model directory all the same
    return None
