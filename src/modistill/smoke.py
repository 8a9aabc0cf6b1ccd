"""A tiny end-to-end check of the toolkit's plumbing (seconds, not a result).

Builds a tiny teacher and student VLM from configs, upcycles the student into a Qwen3-MoE,
saves it, reloads it with plain transformers and generates from an image.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from modistill.info import describe, format_info
from modistill.io import atomic_output_dir
from modistill.models.build import build_vlm
from modistill.models.tiny import tiny_spec, tiny_tokenizer
from modistill.upcycle import upcycle


def run_smoke(out: str | Path, seed: int = 0) -> dict:
    start = time.perf_counter()
    with atomic_output_dir(out, overwrite=True, kind="smoke", legacy=("student-moe",)) as tmp:
        tiny_tokenizer(tmp / "tokenizer")
        teacher, processor = build_vlm(tiny_spec(tmp / "tokenizer", hidden=64, layers=4, seed=seed))
        student, _ = build_vlm(tiny_spec(tmp / "tokenizer", hidden=32, layers=2, seed=seed + 1))
        moe = upcycle(student, num_experts=4, top_k=2, layers="every-other", seed=seed)
        image = Image.new("RGB", (32, 32), (200, 30, 30))
        batch = _batch(processor, image)
        with torch.no_grad():
            identity = (student.eval()(**batch).logits - moe.eval()(**batch).logits).abs().max().item()
        for name, model in (("teacher", teacher), ("student-moe", moe)):
            model.save_pretrained(tmp / name)
            processor.save_pretrained(tmp / name)
    reloaded: Any = AutoModelForImageTextToText.from_pretrained(Path(out) / "student-moe")  # a Llava MoE
    reloaded_processor = AutoProcessor.from_pretrained(Path(out) / "student-moe")
    generated = reloaded.generate(**_batch(reloaded_processor, image), max_new_tokens=8, do_sample=False)
    print(format_info(describe(reloaded, reloaded_processor)))
    result = {
        "upcycle_max_abs_logit_diff": identity,
        "generated_tokens": int(generated.shape[1] - batch["input_ids"].shape[1]),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(
        f"smoke ok: upcycle identity max |Δlogit| = {identity:.1e}, generated {result['generated_tokens']} tokens "
        f"from the reloaded MoE in {result['seconds']} s; outputs in {out}"
    )
    return result


def _batch(processor, image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt")
