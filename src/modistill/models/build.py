"""Build a native `LlavaForConditionalGeneration` from config objects, or assemble one from parts.

Two ways in, one result (a plain transformers VLM + its `LlavaProcessor`):
- from sizes (tests, the demo): every part is built from `ModelSpec`;
- from pretrained parts (real users): `text.pretrained: Qwen/Qwen2-0.5B` (a dir, hub id or `.gguf`
  file, dequantised) and `vision.pretrained: <a SigLIP/CLIP dir>`; their weights are loaded, the
  projector is fresh.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from modistill.errors import UserError
from modistill.models.gguf import gguf_causal_lm, gguf_config, is_gguf
from modistill.models.processor import (
    TOWER_FEATURES,
    build_image_processor,
    build_processor,
    image_size_of,
    image_token_id,
    load_tokenizer,
    prepare_tokenizer,
)
from modistill.models.spec import ModelSpec, TextSpec, VisionSpec
from modistill.moe import resolve_moe_layers

VISION_CLASSES = {
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
    "clip": (CLIPVisionConfig, CLIPVisionModel),
}


def text_config_from_spec(spec: TextSpec, vocab_size: int) -> PretrainedConfig:
    """A transformers text config with the spec's sizes (dense, or MoE for the *_moe/mixtral types)."""
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    head_dim = spec.head_dim or spec.hidden_size // spec.num_heads
    if spec.type in ("qwen3", "llama", "mistral", "qwen3_moe", "mixtral"):
        common["head_dim"] = head_dim
    moe: dict[str, Any] = dict(num_experts_per_tok=spec.top_k)
    if spec.type in ("qwen3_moe", "qwen2_moe"):
        sparse = resolve_moe_layers(spec.moe_layers, spec.num_layers)
        moe.update(
            num_experts=spec.num_experts,
            moe_intermediate_size=spec.intermediate_size,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(spec.num_layers) if i not in sparse],
        )
    if spec.type == "qwen3":
        return Qwen3Config(**common)
    if spec.type == "qwen2":
        return Qwen2Config(**common)
    if spec.type == "llama":
        return LlamaConfig(**common)
    if spec.type == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if spec.type == "qwen3_moe":
        return Qwen3MoeConfig(**common, **moe)
    if spec.type == "qwen2_moe":
        return Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=0)
    if spec.type == "mixtral":
        if spec.moe_layers != "all":
            raise UserError("text.moe_layers: Mixtral makes every layer sparse; set moe_layers: all")
        return MixtralConfig(**common, num_local_experts=spec.num_experts, num_experts_per_tok=spec.top_k)
    raise UserError(f"text.type {spec.type!r} is not supported")


def _is_llava(path: str) -> bool:
    return AutoConfig.from_pretrained(path).model_type == "llava"


def vision_config_from_spec(spec: VisionSpec) -> PretrainedConfig:
    if spec.pretrained is not None:
        config = AutoConfig.from_pretrained(spec.pretrained)
        # A full CLIP/SigLIP checkpoint (or a Llava VLM) holds more than the tower: keep its vision config.
        return getattr(config, "vision_config", config)
    config_cls, _ = VISION_CLASSES[spec.type]
    return config_cls(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )


def build_vlm(
    spec: ModelSpec, dtype: torch.dtype = torch.float32
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build (or assemble from pretrained parts) a LLaVA-style VLM and its processor."""
    tokenizer = prepare_tokenizer(
        load_tokenizer(spec.tokenizer or spec.text.pretrained, trust_remote_code=spec.trust_remote_code)
    )
    vocab_size = len(tokenizer)
    vision_config = vision_config_from_spec(spec.vision)
    tower = "clip" if "clip" in vision_config.model_type else "siglip"
    if is_gguf(spec.text.pretrained):
        text_config = gguf_config(spec.text.pretrained)
    elif spec.text.pretrained is not None:
        text_config = AutoConfig.from_pretrained(spec.text.pretrained, trust_remote_code=spec.trust_remote_code)
    else:
        text_config = text_config_from_spec(spec.text, vocab_size)
    image_processor = build_image_processor(tower, vision_config.image_size, spec.vision.pretrained)
    if image_size_of(image_processor) != vision_config.image_size:
        raise UserError(
            f"image processor resizes to {image_size_of(image_processor)} px but the vision tower expects "
            f"{vision_config.image_size} px; fix the preprocessor_config.json of {spec.vision.pretrained}"
        )
    processor = build_processor(tokenizer, image_processor, tower, vision_config.patch_size)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id(tokenizer),
        image_seq_length=patches,
        vision_feature_layer=spec.vision.feature_layer,
        vision_feature_select_strategy=TOWER_FEATURES[tower]["vision_feature_select_strategy"],
        projector_hidden_act=spec.projector_hidden_act,
    )
    torch.manual_seed(spec.seed)
    if spec.text.pretrained is None and spec.vision.pretrained is None:
        model = LlavaForConditionalGeneration(config).to(dtype)
    else:
        model = _assemble_pretrained(config, spec, tower, dtype)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        # The tokenizer gained tokens (image token, chat markers): give them embedding rows.
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    _align_generation_config(model, tokenizer)
    return model, processor


def _assemble_pretrained(
    config: LlavaConfig, spec: ModelSpec, tower: str, dtype: torch.dtype
) -> LlavaForConditionalGeneration:
    """Build the VLM skeleton on the meta device, then put pretrained modules into it.

    The parts are moved in as modules (not copied), so a 7B language model is held once in memory;
    only the projector (and any part given by sizes) is freshly initialised.
    """
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    if spec.text.pretrained is not None:
        if is_gguf(spec.text.pretrained):
            lm = gguf_causal_lm(spec.text.pretrained, dtype)
        else:
            lm = AutoModelForCausalLM.from_pretrained(
                spec.text.pretrained, dtype=dtype, trust_remote_code=spec.trust_remote_code
            )
        model.model.language_model = lm.model
        model.lm_head = lm.lm_head
    else:
        text_lm = AutoModelForCausalLM.from_config(config.text_config, dtype=dtype)
        model.model.language_model = text_lm.model
        model.lm_head = text_lm.lm_head
    _, vision_cls = VISION_CLASSES[tower]
    if spec.vision.pretrained is not None and _is_llava(spec.vision.pretrained):
        # Share another VLM's tower (LLaVA-MoD's student uses the teacher's vision encoder).
        donor = LlavaForConditionalGeneration.from_pretrained(spec.vision.pretrained, dtype=dtype)
        model.model.vision_tower = donor.model.vision_tower
        del donor
    elif spec.vision.pretrained is not None:
        model.model.vision_tower = vision_cls.from_pretrained(spec.vision.pretrained, dtype=dtype)
    else:
        model.model.vision_tower = vision_cls(config.vision_config).to(dtype)
    projector_cls = type(model.model.multi_modal_projector)
    model.model.multi_modal_projector = projector_cls(config).to(dtype)
    return model


def _align_generation_config(model: LlavaForConditionalGeneration, tokenizer) -> None:
    """Stop generation at the chat template's end-of-turn token and pad with the pad token."""
    gen = model.generation_config
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eos is None or eos == tokenizer.unk_token_id:
        eos = tokenizer.eos_token_id
    gen.eos_token_id = eos
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
