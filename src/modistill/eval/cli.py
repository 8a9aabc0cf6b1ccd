"""`modistill eval` (score a VLM on eval files) and `modistill chat` (one greedy answer about one image)."""

from __future__ import annotations

import argparse
import math
from typing import Any


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="VLM directory (save_pretrained: config.json + processor files)")
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE.jsonl",
        help="eval file (VQA, POPE or captions; kind read from its rows); repeatable",
    )
    parser.add_argument("--out", default=None, help="write all metrics and per-item predictions to this JSON file")
    parser.add_argument(
        "--image-root",
        default=None,
        help="folder the rows' image paths are relative to (default: the file's folder, then its parent)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--caption-samples",
        type=int,
        default=0,
        help="also sample N captions per image (pure sampling at --caption-temperature), reported beside greedy",
    )
    parser.add_argument("--caption-temperature", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows of each file")
    parser.add_argument(
        "--efficiency", action="store_true", help="also measure parameters, decode tokens/s and peak memory"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of sampled decoding")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="VLM directory")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("question", help='the question or instruction, e.g. "Describe the image."')
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _caption_line(m: dict[str, Any]) -> str:
    return (
        f"response {_f(m.get('response_hallucination'))}  mention {_f(m.get('mention_hallucination'))}  "
        f"coverage {_f(m.get('coverage'))}  unparseable {_f(m.get('unparseable'))}"
    )


def format_results(results: dict[str, Any]) -> str:
    """A compact plain-text table of `evaluate`'s results."""
    lines = []
    for name, m in results["metrics"].items():
        kind, n = results["files"][name]["kind"], results["files"][name]["n"]
        head = f"{name:<12} {kind:<8} n={n:<6}"
        if kind == "vqa":
            per = "  ".join(f"{t} {_f(v['accuracy'], 2)}" for t, v in m["per_type"].items())
            lines.append(f"{head} accuracy {_f(m['accuracy'])}   ({per})")
        elif kind == "pope":
            o = m["overall"]
            lines.append(
                f"{head} accuracy {_f(o['accuracy'])}  precision {_f(o['precision'])}  recall {_f(o['recall'])}  "
                f"F1 {_f(o['f1'])}  yes-ratio {_f(o['yes_ratio'])}  unparseable {_f(o['unparseable'])}"
            )
            for split, s in m["splits"].items():
                lines.append(
                    f"{'':<29}{split:<12} accuracy {_f(s['accuracy'])}  F1 {_f(s['f1'])}  yes-ratio "
                    f"{_f(s['yes_ratio'])}"
                )
        else:
            lines.append(f"{head} {'greedy':<17}{_caption_line(m['greedy'])}")
            if "sampled" in m:
                s = m["sampled"]
                label = f"sampled T={s['temperature']:g} x{s['samples_per_image']}"
                lines.append(f"{'':<29}{label:<17}{_caption_line(s)}")
    eff = results.get("efficiency")
    if eff:
        p = eff["parameters"]
        mem = eff.get("peak_memory", {})
        lines.append(
            f"efficiency   parameters {_count(p['total'])} total / {_count(p['activated'])} activated; "
            f"decode tokens/s {_f(eff['batch1']['decode_tokens_per_s'], 1)} (batch 1), "
            f"{_f(eff['batched']['decode_tokens_per_s'], 1)} (batch {eff['batched']['batch_size']}); "
            f"memory peak {_mb(mem.get('peak_bytes'))}, +{_mb(mem.get('delta_bytes'))} during generation "
            f"({mem.get('method', 'n/a')})"
        )
    return "\n".join(lines)


def run_eval_command(args: argparse.Namespace) -> int:
    from modistill.eval.run import evaluate, results_path

    results = evaluate(
        args.model,
        args.data,
        args.out,
        image_root=args.image_root,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        caption_samples=args.caption_samples,
        caption_temperature=args.caption_temperature,
        limit=args.limit,
        efficiency=args.efficiency,
        seed=args.seed,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    print(format_results(results))
    if args.out is not None:
        print(f"wrote {results_path(args.out)}")
    return 0


def run_chat_command(args: argparse.Namespace) -> int:
    from modistill.eval.generate import generate_answers, load_image
    from modistill.eval.run import load_vlm

    image = load_image(args.image)  # a missing image fails before the model loads
    loaded, _ = load_vlm(args.model, args.dtype)
    answer = generate_answers(
        loaded.model,
        loaded.processor,
        [{"image": image, "text": args.question}],
        batch_size=1,
        max_new_tokens=args.max_new_tokens,
        progress=False,
    )
    print(answer[0])
    return 0
