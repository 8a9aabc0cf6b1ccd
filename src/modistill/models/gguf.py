"""Language models given as a `.gguf` file (llama.cpp's format, e.g. SmolLM2 or Gemma-3 on PyPI).

transformers reads a GGUF (with the `gguf` package installed) and dequantises its tensors to floats,
but marks the model as gguf-quantised, and `save_pretrained` refuses such a model. modistill takes
the config without that mark and moves the tensors into a plain model of the same architecture, so
what it builds and saves is an ordinary safetensors checkpoint; the GGUF is only read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from modistill.errors import UserError


def is_gguf(path: str | Path | None) -> bool:
    return path is not None and str(path).lower().endswith(".gguf")


def _split(path: str | Path) -> tuple[str, str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{path}: no such GGUF file; give the path of a local .gguf file")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise UserError(f"{path}: reading a GGUF file needs the `gguf` package: pip install gguf") from None
    return str(p.parent), p.name


def gguf_config(path: str | Path) -> PretrainedConfig:
    """The model's config as a plain (not quantised) one."""
    folder, name = _split(path)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{path}: transformers cannot read this GGUF ({str(exc).splitlines()[0]})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def gguf_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    folder, name = _split(path)
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{path}: cannot read a tokenizer from this GGUF ({str(exc).splitlines()[0]})") from None


def gguf_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The GGUF's language model, dequantised, as a plain transformers model that `save_pretrained` accepts."""
    folder, name = _split(path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{path}: transformers cannot load this GGUF ({str(exc).splitlines()[0]})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    # Built on the meta device and filled by assignment: the dequantised tensors are held once.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    for name_, buf in loaded.named_buffers():  # rotary inv_freq etc. are not in state dicts
        module_name, _, buf_name = name_.rpartition(".")
        plain.get_submodule(module_name)._buffers[buf_name] = buf
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    return plain.to(dtype).eval()


def gguf_to_checkpoint(path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the GGUF's model and tokenizer as a save_pretrained directory (safetensors) and return it."""
    out = Path(out_dir)
    gguf_causal_lm(path, dtype).save_pretrained(str(out), safe_serialization=True)
    gguf_tokenizer(path).save_pretrained(str(out))
    return out
