"""Batched generation for a Llava-style VLM: one image + one question per item, answers as text.

Prompts go through the processor's chat template (a user turn with an image part and the question,
then the assistant header), batches are left-padded so every row's last prompt token sits at the
same position, and only the new tokens are decoded. Items are batched by prompt length so that
little padding is computed; answers come back in the items' order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from modistill.data.image_safety import UnsafeImage, confine
from modistill.data.images import open_rgb, to_rgb
from modistill.errors import UserError


def check_vlm(model: Any, processor: Any) -> None:
    """Raise a UserError unless (model, processor) is a VLM with an image processor."""
    is_vlm = hasattr(model, "config") and hasattr(model.config, "vision_config")
    if not is_vlm or getattr(processor, "image_processor", None) is None:
        name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UserError(
            f"evaluation needs a vision-language model (Llava with its processor); got {name!r}. "
            "Give a VLM directory written by modistill (config.json with a vision_config + processor files)"
        )


def render_prompt(processor: Any, question: str) -> str:
    """The chat-template text of one user turn (image part + question) and the assistant header."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    try:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except ValueError as exc:  # no chat template: transformers raises ValueError
        raise UserError(
            f"the model's processor cannot render a chat prompt ({str(exc).splitlines()[0]}); "
            "save the processor with a chat_template"
        ) from None


@contextmanager
def left_padding(processor: Any) -> Iterator[None]:
    """Pad on the left while generating (the next token is read at the last position of every row)."""
    tokenizer = processor.tokenizer
    before = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = before


@lru_cache(maxsize=64)
def _open_image(path: str) -> Image.Image:
    # Eval sets ask several questions per image (POPE: about a dozen): decode a file once per run
    # when possible; small bound because real photos are ~1 MB decoded (cleared after each run).
    return open_rgb(path)  # a regular file within the pixel bound, upright RGB


def load_image(image: str | Path | Image.Image, image_root: str | Path | None = None, where: str = "") -> Image.Image:
    """A PIL RGB image from a PIL image or a path (relative paths resolved against `image_root`)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image)
    prefix = f"{where}: " if where else ""
    if image_root is not None:  # an eval file's paths stay inside its image root
        path = path if path.is_absolute() else Path(image_root) / path
        try:
            confine(path, image_root, fix="move it under --image-root DIR")
        except UnsafeImage as exc:
            raise UserError(f"{prefix}image {exc}") from None
    if not path.exists():
        hint = (
            "pass --image-root DIR (the folder image paths are relative to)"
            if image_root is not None
            else "check the path"
        )
        raise UserError(f"{prefix}image {path} not found; {hint}")
    try:
        return _open_image(str(path.resolve()))
    except UnsafeImage as exc:
        raise UserError(f"{prefix}image {exc}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{prefix}cannot read image {path} ({exc.__class__.__name__}); replace or remove it") from None


def generation_kwargs(
    model: Any, processor: Any, *, max_new_tokens: int, do_sample: bool, temperature: float, min_new_tokens: int = 0
) -> dict[str, Any]:
    """generate() arguments: greedy, or pure ancestral sampling at `temperature` (no top-k/top-p cut,
    so "sampled at T=1" means the model's own distribution, not transformers' default top_k=50)."""
    tokenizer = processor.tokenizer
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "use_cache": True,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    if do_sample:
        if temperature <= 0:
            raise UserError(f"sampling temperature must be > 0 (got {temperature}); use greedy decoding instead")
        kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    return kwargs


def encode_batch(processor: Any, images: list[Image.Image], prompts: list[str], model: Any) -> dict[str, torch.Tensor]:
    """Left-padded processor inputs on the model's device, pixels in the model's dtype."""
    with left_padding(processor):
        # The chat template writes any BOS itself (as in training rendering): add none on top.
        batch = processor(images=images, text=prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    dtype = next(model.parameters()).dtype
    return {
        k: v.to(model.device, dtype=dtype) if k == "pixel_values" else v.to(model.device)
        for k, v in batch.items()
        if isinstance(v, torch.Tensor)
    }


def generate_answers(
    model: Any,
    processor: Any,
    items: Sequence[dict[str, Any]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    image_root: str | Path | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[Any]:
    """Answer each item ({"image": path or PIL image, "text": question, optional "source": "file:line"}).

    Returns one stripped string per item (special tokens skipped), or, when num_samples > 1, a list
    of num_samples strings per item (num_samples > 1 requires do_sample=True). Sampling is seeded
    with `seed` once, so a run is reproducible for a fixed batch size and item order."""
    check_vlm(model, processor)
    if batch_size < 1 or max_new_tokens < 1 or num_samples < 1:
        raise UserError(
            f"batch_size, max_new_tokens and num_samples must be >= 1 (got {batch_size}, {max_new_tokens}, "
            f"{num_samples})"
        )
    if num_samples > 1 and not do_sample:
        raise UserError("num_samples > 1 needs sampling (do_sample=True): greedy decoding gives one answer")
    prompts = [render_prompt(processor, str(item["text"])) for item in items]
    # Batch by prompt length: rows of one batch then need little padding.
    lengths = (
        [len(ids) for ids in processor.tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
    )
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    kwargs = generation_kwargs(
        model, processor, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature
    )
    if num_samples > 1:
        kwargs["num_return_sequences"] = num_samples
    answers: list[Any] = [None] * len(items)
    was_training = model.training
    model.eval()
    # Seed a forked RNG: evaluating in the middle of training must not reset the trainer's stream.
    devices = [model.device] if model.device.type == "cuda" else []
    bar = tqdm(total=len(items), desc=desc, unit="q", disable=not progress, leave=False)
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                images = [load_image(items[i]["image"], image_root, items[i].get("source", "")) for i in idx]
                batch = encode_batch(processor, images, [prompts[i] for i in idx], model)
                out = model.generate(**batch, **kwargs)
                new = out[:, batch["input_ids"].shape[1] :]
                texts = [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
                for j, i in enumerate(idx):
                    answers[i] = texts[j * num_samples : (j + 1) * num_samples] if num_samples > 1 else texts[j]
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
        _open_image.cache_clear()
    return answers
