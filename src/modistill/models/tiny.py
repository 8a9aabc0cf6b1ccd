"""Tiny models and a locally trained tokenizer, for tests and the smoke run (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modistill.models.chat import CHATML_TEMPLATE, IM_END, IM_START, IMAGE_TOKEN, PAD_TOKEN
from modistill.models.spec import ModelSpec, TextSpec, VisionSpec

_CORPUS = [
    "a red circle and a blue square on the left",
    "is there a green triangle in the image? yes. no.",
    "describe the image. there are two objects: one small yellow circle, one large red square.",
    "what colour is the shape at the top right? how many objects are there? 0 1 2 3 4 5",
]


def tiny_tokenizer(out_dir: str | Path | None = None, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML and an image token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((texts or _CORPUS) * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHATML_TEMPLATE,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def tiny_spec(
    tokenizer_dir: str | Path,
    text_type: Any = "qwen3",
    vision_type: Any = "siglip",
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> ModelSpec:
    """A VLM spec with hidden sizes of a few dozen and 2 layers (TRL-style tiny models)."""
    return ModelSpec(
        vision=VisionSpec(
            type=vision_type,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=16,
        ),
        text=TextSpec(
            type=text_type,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=hidden * 2,
            moe_layers="all" if text_type == "mixtral" else "every-other",
        ),
        tokenizer=str(tokenizer_dir),
        seed=seed,
    )
