"""`modistill speculate`: the student as its teacher's speculative drafter (greedy, output unchanged)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modistill.errors import UserError
from modistill.io import write_json_atomic


def add_speculate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the teacher VLM directory (the model whose output is kept)")
    p.add_argument("--draft-model", required=True, help="the drafter: a student distilled from it (same tokenizer)")
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE.jsonl",
        help="eval file(s) whose image + question rows are the prompts; repeatable",
    )
    p.add_argument("--limit", type=int, default=20, help="first N rows of each file (default 20)")
    p.add_argument("--num-draft", type=int, default=4, help="draft tokens per teacher forward (K)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--image-root", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None, help="write the results (per prompt too) to this JSON file")


def run_speculate_command(args: argparse.Namespace) -> int:
    from modistill.eval.speculative import format_speculation, speculate_files

    result = speculate_files(
        args.model,
        args.draft_model,
        args.data,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        num_draft=args.num_draft,
        image_root=args.image_root,
        dtype=args.dtype,
    )
    print(format_speculation(result))
    if args.out:
        write_json_atomic(Path(args.out), json.loads(json.dumps(result, default=str)))
    if not result["all_identical"]:
        raise UserError(
            "speculative output differs from the teacher's greedy output (a numerical tie?); see --out per prompt"
        )
    return 0
