"""The demo's shipped teacher: trained once by `modistill demo --train-teacher`, reused by every run.

A real user distils from an existing teacher; the demo does the same. Its teacher (the scenes
world's SigLIP reader + Qwen3 h192 x 3, 8,000 SFT steps on world 0) takes ~25 minutes on 2 cores,
more than the demo's whole budget, and a tower re-trained on another CPU differs in its last bits.
So the package ships that one checkpoint (6.9 MB of safetensors, plain `save_pretrained` output)
and `modistill demo` copies it into its run directory. `ship_teacher` is how it was put there.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from modistill.errors import UserError
from modistill.io import atomic_output_dir

SHIPPED_TEACHER = Path(__file__).parent / "shipped_teacher"
# What a model directory needs to load and be prompted, plus how it was made (stage.yaml, metrics).
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "processor_config.json",
    "stage.yaml",
    "data.json",
    "metrics.json",
    "log_history.json",
)


def install_shipped_teacher(dest: Path, source: Path = SHIPPED_TEACHER) -> Path:
    """Copy the shipped teacher to `dest` (atomically; a finished copy is kept as it is)."""
    if (dest / "metrics.json").is_file():
        return dest
    missing = [name for name in FILES if not (source / name).is_file()]
    if missing:
        raise UserError(
            f"{source}: the shipped demo teacher lacks {', '.join(missing)} (an install without package data?); "
            "reinstall modistill from its repository, or train one with `modistill demo --train-teacher`"
        )
    with atomic_output_dir(dest, kind="run") as tmp:
        for name in (*FILES, "README.md"):
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
    return dest


def ship_teacher(run_dir: Path, dest: Path = SHIPPED_TEACHER, validation: dict | None = None) -> Path:
    """Copy RUN_DIR/teacher (a `modistill demo --train-teacher` run) to `dest`, with the run's absolute
    paths made relative to the run directory (`RUN/...`), and a model card."""
    src = run_dir / "teacher"
    if not (src / "metrics.json").is_file():
        raise UserError(f"{src}: no finished teacher (metrics.json); run `modistill demo --train-teacher` first")
    prefix = re.escape(str(run_dir.resolve()))
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if name in ("stage.yaml", "data.json", "config.json"):
            text = re.sub(prefix, "RUN", (src / name).read_text())
            (dest / name).write_text(text)
        else:
            shutil.copy2(src / name, dest / name)
    metrics = json.loads((src / "metrics.json").read_text())
    lines = [
        "# The modistill demo's teacher",
        "",
        "LlavaForConditionalGeneration: a SigLIP vision tower (h128 x 3, pretrained as a reader of the scenes",
        "world's scene graphs, frozen), a 2-layer MLP projector and a Qwen3 LLM (h192 x 3), trained on world 0's",
        f"30,000 training images for {metrics['steps']} SFT steps (`stage.yaml`; paths are relative to the run",
        "directory `RUN`). Built by `modistill demo --train-teacher --out RUN` and copied here by",
        "`python tools/ship_teacher.py RUN`. Apache-2.0, like the project.",
        "",
        f"Parameters: {metrics['parameters']['total']:,}. Training: {metrics['wall_time_s']:.0f} s on 2 CPU cores.",
    ]
    if validation:
        lines += ["", "Validation scenes of world 0:", "", "```json", json.dumps(validation, indent=1), "```"]
    (dest / "README.md").write_text("\n".join(lines) + "\n")
    return dest
