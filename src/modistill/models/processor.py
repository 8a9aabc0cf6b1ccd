"""Processor assembly: tokenizer + image processor + chat template + image token -> LlavaProcessor."""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    SiglipImageProcessorPil,
)

from modistill.errors import UserError
from modistill.models.chat import CHATML_TEMPLATE, IM_END, IM_START, IMAGE_TOKEN, PAD_TOKEN, accept_content_parts
from modistill.models.gguf import gguf_tokenizer, is_gguf

# How many extra tokens the tower emits beside its patches, and how LLaVA selects features:
# SigLIP has no CLS token (use every patch: "full"); CLIP has one, which LLaVA drops ("default").
# A mismatch here is what makes transformers fail with "Image features and image tokens do not match".
TOWER_FEATURES = {
    "siglip": {"vision_feature_select_strategy": "full", "num_additional_image_tokens": 0},
    "clip": {"vision_feature_select_strategy": "default", "num_additional_image_tokens": 1},
}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory, hub id or `.gguf` file."""
    if is_gguf(name_or_path):
        return gguf_tokenizer(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{name_or_path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer what a LLaVA-style VLM needs: an image token, a pad token, a chat template.

    A tokenizer that already has them (ours, or a chat model's) is left as it is; a base model's
    tokenizer (e.g. Qwen2-0.5B) gains `<image>` and, if it has no template, ChatML. A template of its
    own (SmolLM2's, Qwen2's, Llama-3's) is wrapped so that it also takes content lists with image and
    text parts (see `models.chat`). Adding tokens grows `len(tokenizer)`: the builder sizes embeddings from it.
    """
    if image_token_of(tokenizer) not in tokenizer.get_vocab():
        _add_special(tokenizer, IMAGE_TOKEN)
    if tokenizer.chat_template is None:
        for tok in (IM_START, IM_END):
            if tok not in tokenizer.get_vocab():
                _add_special(tokenizer, tok)
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.chat_template = accept_content_parts(tokenizer.chat_template, image_token_of(tokenizer))
    if tokenizer.pad_token is None:
        if PAD_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        else:
            tokenizer.pad_token = PAD_TOKEN
    return tokenizer


def _add_special(tokenizer: PreTrainedTokenizerBase, token: str) -> None:
    tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)


def image_token_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's own image token if it names one (e.g. `extra_special_tokens`), else `<image>`.

    Only the processor saves the image token's name (processor_config.json), so a plain tokenizer
    loaded on its own may not know it.
    """
    return getattr(tokenizer, "image_token", None) or IMAGE_TOKEN


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    token = image_token_of(tokenizer)
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"the image token {token!r} is not a single token in this tokenizer")
    return ids[0]


def build_image_processor(tower: str, image_size: int, pretrained: str | None = None) -> Any:
    """The PIL image processor for a tower (transformers 5's default processors need torchvision)."""
    if pretrained is not None:
        try:
            # A Llava dir's processor_config.json holds its image processor; a vision dir has its own file.
            return AutoImageProcessor.from_pretrained(pretrained, backend="pil")
        except (OSError, ValueError, TypeError):
            pass  # a vision dir without preprocessor_config.json: build the default below
    if tower == "siglip":
        return SiglipImageProcessorPil(
            size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def build_processor(
    tokenizer: PreTrainedTokenizerBase, image_processor: Any, tower: str, patch_size: int
) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        chat_template=tokenizer.chat_template,
        image_token=image_token_of(tokenizer),
        **TOWER_FEATURES[tower],
    )


def image_size_of(image_processor: Any) -> int:
    """The square side the processor resizes images to (what the tower's position table expects)."""
    size = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None) or {}
    if hasattr(size, "to_dict"):
        size = size.to_dict()
    size = {k: v for k, v in dict(size).items() if v is not None}
    for key in ("height", "shortest_edge"):
        if key in size:
            return int(size[key])
    raise UserError(f"cannot tell the image size from image processor {type(image_processor).__name__}")
