"""Load a model directory (or hub id): a Llava VLM with its processor, or a bare causal LM."""

from __future__ import annotations

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
    PretrainedConfig,
    PreTrainedModel,
)

from modistill.errors import UserError
from modistill.models.weight_files import check_weight_files

# Text architectures modistill knows how to handle (dense ones can be upcycled).
DENSE_TEXT_TYPES = ("qwen3", "qwen2", "llama", "mistral")
MOE_TEXT_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral")
VLM_TYPES = ("llava",)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    processor: Any  # LlavaProcessor for a VLM, the tokenizer for a causal LM
    is_vlm: bool

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None


def load_config(path: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config, with one-line errors for the usual mistakes."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{path}: is a file; give the model directory (the one holding config.json)")
        if not (p / "config.json").is_file():
            raise UserError(f"{path}: no config.json here; give a directory written by save_pretrained")
    elif str(path).startswith((".", "/", "~")) or str(path).count("/") != 1 or p.parent.is_dir():
        # `models/nope` next to an existing `models/` is a mistyped path, not a hub id.
        raise UserError(f"{path}: no such directory")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"{path}: no such directory, and not loadable as a hub id ({str(exc).splitlines()[0]})"
        ) from None


def check_supported(config: PretrainedConfig, path: str | Path) -> str:
    """Return the text model type, or raise a UserError naming the unsupported architecture."""
    if config.model_type in VLM_TYPES:
        text_type = config.text_config.model_type
    else:
        text_type = config.model_type
    if text_type not in DENSE_TEXT_TYPES + MOE_TEXT_TYPES:
        raise UserError(
            f"{path}: architecture {config.model_type!r} (text model {text_type!r}) is not supported; "
            f"supported language models: {', '.join(DENSE_TEXT_TYPES + MOE_TEXT_TYPES)}, bare or inside a Llava VLM"
        )
    return text_type


def load_model(
    path: str | Path, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False
) -> LoadedModel:
    """Load a Llava VLM (+ processor) or a causal LM (+ tokenizer) from a directory or hub id."""
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    config = load_config(path, trust_remote_code)
    check_supported(config, path)
    check_weight_files(path)  # one-line errors for damaged safetensors or pickled weights
    if config.model_type in VLM_TYPES:
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        return LoadedModel(model, processor, is_vlm=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None  # a bare LM saved without its tokenizer is still a valid model
    return LoadedModel(model, tokenizer, is_vlm=False)


def save_model(model: PreTrainedModel, processor, out_dir: str | Path) -> None:
    """save_pretrained the model (safetensors) and its processor/tokenizer into `out_dir`."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(str(out_dir))
