"""`modistill data check FILE... --model DIR`: validate training data without training.

Reads every sample as training would (same rendering, truncation, image checks), prints counts,
length statistics and every problem as `file:line: sample <id>: <reason>: <detail>`. Exit code 1
when any problem is found, 0 otherwise; bad arguments are `UserError`s (exit 2 from the CLI).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transformers import AutoProcessor

from modistill.data.conversations import (
    conversation_handler,
    data_files,
    image_root_for,
    teacher_renderer_for,
)
from modistill.data.preferences import preference_handler
from modistill.data.render import Renderer
from modistill.data.validate import BadSamplePolicy, DataStats, iter_records, scan_files
from modistill.errors import UserError
from modistill.models.load import load_config
from modistill.models.vocab import check_same_token_ids

KINDS = ("auto", "conversations", "preferences")


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="data files (JSON list or JSONL)")
    parser.add_argument("--model", required=True, help="saved model directory whose processor renders the data")
    parser.add_argument(
        "--teacher",
        default=None,
        help="teacher model directory: also check that its rendering gives the same response tokens",
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="conversations (LLaVA) or preferences (RLAIF-V pairs); auto: from the first sample",
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="directory relative image paths are resolved against (default: each data file's directory)",
    )
    parser.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="accept image paths that resolve outside the image root (data.allow_outside_root)",
    )
    parser.add_argument("--max-length", type=int, default=2048, help="truncation length in tokens (default 2048)")
    parser.add_argument("--trust-remote-code", action="store_true")


def load_processor(path: str, trust_remote_code: bool = False) -> Any:
    """The processor saved with a model (a tokenizer for a text-only model), with one-line errors."""
    load_config(path, trust_remote_code)  # clear messages for a missing dir / config.json
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: cannot load its processor ({str(exc).splitlines()[0]})") from None


def detect_kind(files: list[Path]) -> str:
    """ "preferences" if the first readable sample has chosen/rejected, else "conversations"."""
    for path in files:
        for rec in iter_records(path):
            if isinstance(rec.data, dict):
                return "preferences" if "chosen" in rec.data or "rejected" in rec.data else "conversations"
    return "conversations"


def check_data(
    files: list[str | Path],
    processor: Any,
    kind: str = "auto",
    image_root: str | Path | None = None,
    max_length: int | None = 2048,
    teacher_processor: Any | None = None,
    allow_outside_root: bool = False,
) -> tuple[DataStats, list]:
    """Validate every sample; return the statistics and every problem (nothing is cached or written)."""
    paths = data_files(files)
    if kind == "auto":
        kind = detect_kind(paths)
    root_of = image_root_for(image_root, allow_outside_root)
    renderer = Renderer(processor, max_length)
    teacher = teacher_renderer_for(renderer, teacher_processor)
    stats = DataStats(tokens_per_image=renderer.tokens_per_image)
    policy = BadSamplePolicy("collect")
    handler = conversation_handler if kind == "conversations" else preference_handler
    for _ in scan_files(paths, handler(root_of, renderer, teacher, stats), policy, stats):
        pass
    stats.skipped = {}
    for p in policy.problems:
        stats.skipped[p.reason] = stats.skipped.get(p.reason, 0) + 1
    return stats, policy.problems


def run_check_command(args: argparse.Namespace) -> int:
    processor = load_processor(args.model, args.trust_remote_code)
    teacher = load_processor(args.teacher, args.trust_remote_code) if args.teacher else None
    if teacher is not None:  # another tokenizer family cannot teach this student: say so before any sample
        check_same_token_ids(
            getattr(processor, "tokenizer", processor),
            getattr(teacher, "tokenizer", teacher),
            names=(args.model, args.teacher),
        )
    stats, problems = check_data(
        args.files, processor, args.kind, args.image_root, args.max_length, teacher, args.allow_outside_root
    )
    for p in problems:
        print(p.message())
    for line in stats.summary_lines():
        print(line)
    if problems:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.skipped.items(), key=lambda kv: -kv[1]))
        print(f"problems: {len(problems)} ({counts})")
        return 1
    if stats.samples == 0:
        print("problems: no sample")
        return 1
    print("problems: none")
    return 0
