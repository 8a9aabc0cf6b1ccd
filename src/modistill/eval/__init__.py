"""Evaluation: batched generation, VQA / POPE / caption-hallucination metrics, efficiency, `modistill eval`.

generate.py answers (image, question) items · metrics.py pure metric functions · efficiency.py
parameters, tokens/s, peak memory · run.py `evaluate` on eval files · cli.py the eval / chat commands.
"""

from modistill.eval.efficiency import measure_efficiency, peak_memory
from modistill.eval.generate import generate_answers
from modistill.eval.metrics import (
    binary_metrics,
    caption_hallucination,
    normalise_answer,
    parse_yes_no,
    pope_metrics,
    vqa_correct,
    vqa_metrics,
)
from modistill.eval.run import detect_kind, evaluate, load_eval_file, load_vlm

__all__ = [
    "binary_metrics",
    "caption_hallucination",
    "detect_kind",
    "evaluate",
    "generate_answers",
    "load_eval_file",
    "load_vlm",
    "measure_efficiency",
    "normalise_answer",
    "parse_yes_no",
    "peak_memory",
    "pope_metrics",
    "vqa_correct",
    "vqa_metrics",
]
