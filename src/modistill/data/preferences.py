"""Preference pairs (RLAIF-V style) -> a validated, memory-mapped dataset.

Accepted samples:
- `{"id", "image", "question", "chosen": str, "rejected": str}` (RLAIF-V; `prompt` may replace
  `question`, as a string or a list of turns);
- `{"id", "image", "chosen": [turns], "rejected": [turns]}`: both full conversations sharing a
  prompt (their longest common run of turns); or with an explicit `prompt`/`question`, both
  continuations of it.
If the prompt holds no `<image>` tag but images are given, one tag per image is put first in the
first user turn (RLAIF-V questions have none). Rows: `{"id", "source", "images", "prompt",
"chosen", "rejected"}`, each of the last three a list of `{"role", "content"}` messages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, List, Value

from modistill.data.collate import PreferenceCollator
from modistill.data.conversations import (
    MESSAGES,
    check_ends_with_answer,
    check_image_tags,
    load_validated,
    locate_template_errors,
    same_response,
    to_messages,
)
from modistill.data.image_safety import ImageRoot
from modistill.data.render import Renderer
from modistill.data.validate import (
    MALFORMED_SAMPLE,
    MISSING_KEY,
    DataStats,
    Problem,
    Record,
    SampleProblem,
    check_images,
    resolve_images,
)
from modistill.models.chat import IMAGE_TOKEN

PREFERENCE_FEATURES = Features(
    {
        "id": Value("string"),
        "source": Value("string"),
        "images": List(Value("string")),
        "prompt": MESSAGES,
        "chosen": MESSAGES,
        "rejected": MESSAGES,
    }
)


@dataclass
class PreferenceData:
    dataset: Dataset  # rows {"id", "source", "images", "prompt", "chosen", "rejected"}
    stats: DataStats
    renderer: Renderer
    teacher_renderer: Renderer | None = None
    problems: list[Problem] = field(default_factory=list)
    skip_report: Path | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.renderer, self.teacher_renderer)


def _prompt_messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return to_messages(value, "prompt")


def _split_shared_prompt(
    chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == len(chosen) or k == len(rejected):
        raise SampleProblem(MALFORMED_SAMPLE, "chosen and rejected do not differ after their shared turns")
    return chosen[:k], chosen[k:], rejected[k:]


def _tag_first_user_turn(prompt: list[dict[str, str]], n_images: int) -> list[dict[str, str]]:
    """Put one `<image>` tag per image before the first user turn's text (when the prompt has none)."""
    if n_images == 0 or any(IMAGE_TOKEN in m["content"] for m in prompt):
        return prompt
    for k, m in enumerate(prompt):
        if m["role"] == "user":
            tagged = {"role": "user", "content": (IMAGE_TOKEN + "\n") * n_images + m["content"]}
            return prompt[:k] + [tagged] + prompt[k + 1 :]
    raise SampleProblem(MALFORMED_SAMPLE, "the prompt has no user turn to put the image in")


def normalize_pair(data: Any, sample_id: str, source: str, image_root: Path | ImageRoot) -> dict[str, Any]:
    """A raw preference sample -> a dataset row; raises `SampleProblem` for what cannot be trained on."""
    if not isinstance(data, dict):
        raise SampleProblem(MALFORMED_SAMPLE, f"expected a JSON object, found {type(data).__name__}")
    for key in ("chosen", "rejected"):
        if key not in data:
            raise SampleProblem(MISSING_KEY, repr(key))
    chosen, rejected = data["chosen"], data["rejected"]
    prompt_value = data.get("question", data.get("prompt"))
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt_value is None:
            raise SampleProblem(MISSING_KEY, "'question'")
        prompt = _prompt_messages(prompt_value)
        chosen_msgs = [{"role": "assistant", "content": chosen}]
        rejected_msgs = [{"role": "assistant", "content": rejected}]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        chosen_msgs, rejected_msgs = to_messages(chosen, "chosen"), to_messages(rejected, "rejected")
        if prompt_value is not None:
            prompt = _prompt_messages(prompt_value)
        else:
            prompt, chosen_msgs, rejected_msgs = _split_shared_prompt(chosen_msgs, rejected_msgs)
    else:
        raise SampleProblem(MALFORMED_SAMPLE, "chosen and rejected must both be strings or both lists of turns")
    if not prompt:
        raise SampleProblem(MALFORMED_SAMPLE, "the pair has no prompt")
    images = resolve_images(data.get("image"), image_root)
    prompt = _tag_first_user_turn(prompt, len(images))
    for side in (chosen_msgs, rejected_msgs):
        check_ends_with_answer(prompt + side)
        check_image_tags(prompt + side, images)
    return {
        "id": sample_id,
        "source": source,
        "images": images,
        "prompt": prompt,
        "chosen": chosen_msgs,
        "rejected": rejected_msgs,
    }


def preference_handler(
    root_of: Callable[[str], Path], renderer: Renderer, teacher: Renderer | None, stats: DataStats
) -> Callable[[Record], dict[str, Any]]:
    """Record -> validated row: both sides keep every image token and some answer token, under both renderers."""

    def handle(rec: Record) -> dict[str, Any]:
        row = normalize_pair(rec.data, rec.sample_id(), f"{rec.file}:{rec.line}", root_of(rec.file))
        check_images(row["images"])
        chosen, rejected = renderer.render_preference(row)
        teacher_seqs = []
        if teacher is not None:
            teacher_seqs = list(teacher.render_preference(row))
            same_response(chosen, teacher_seqs[0], "chosen: ")
            same_response(rejected, teacher_seqs[1], "rejected: ")
        stats.add_sample(len(row["images"]), [chosen, rejected], teacher_seqs)
        return row

    return lambda rec: locate_template_errors(rec, handle)


def load_preferences(
    files: str | Path | Sequence[str | Path],
    image_root: str | Path | None = None,
    processor: Any = None,
    max_length: int | None = 2048,
    on_bad_sample: str = "error",
    report_dir: str | Path | None = None,
    teacher_processor: Any | None = None,
    cache_dir: str | Path | None = None,
    verbose: bool = True,
    allow_outside_root: bool = False,
) -> PreferenceData:
    """Read, validate and cache preference pairs; same contract as `load_conversations`."""
    ds, stats, renderer, teacher, policy, report = load_validated(
        "preferences",
        preference_handler,
        PREFERENCE_FEATURES,
        files,
        image_root,
        processor,
        max_length,
        on_bad_sample,
        report_dir,
        teacher_processor,
        cache_dir,
        verbose,
        allow_outside_root,
    )
    return PreferenceData(ds, stats, renderer, teacher, policy.problems, report)
