"""LLaVA-format conversation data: JSON list or JSONL files -> a validated, memory-mapped dataset.

A sample is `{"id", "image": path | [paths] | absent, "conversations": [{"from", "value"}, ...]}`
with roles human/gpt (or user/assistant) and an optional system turn; `<image>` tags in the text
mark where each image goes. Rows of the dataset are normalised:
`{"id", "source": "file:line", "images": [paths], "messages": [{"role", "content"}]}`, plus the
tokens validation rendered (`input_ids`, `labels`, and `teacher_*` for a teacher that renders
differently), so training does not render a sample again each epoch; images are decoded only
when a batch is collated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, List, Value

from modistill.data.collate import ConversationCollator, same_rendering
from modistill.data.image_safety import ImageRoot
from modistill.data.render import RenderedSample, Renderer, TemplateError
from modistill.data.validate import (
    IMAGE_TAG_MISMATCH,
    MALFORMED_SAMPLE,
    MISSING_KEY,
    NO_ASSISTANT,
    TEACHER_MISMATCH,
    BadSamplePolicy,
    DataStats,
    Problem,
    Record,
    SampleProblem,
    build_dataset,
    check_images,
    resolve_images,
)
from modistill.errors import UserError
from modistill.models.chat import IMAGE_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

MESSAGES = List({"role": Value("string"), "content": Value("string")})
TOKENS = List(Value("int32"))
# `length`: the sample's rendered tokens (the longer of student and teacher), the column that
# `train.train_sampling_strategy: group_by_length` reads, so batches of like length pad less.
# `teacher_input_ids` / `teacher_labels` are empty when the teacher shares the student's rendering.
CONVERSATION_FEATURES = Features(
    {
        "id": Value("string"),
        "source": Value("string"),
        "images": List(Value("string")),
        "messages": MESSAGES,
        "length": Value("int32"),
        "input_ids": TOKENS,
        "labels": TOKENS,
        "teacher_input_ids": TOKENS,
        "teacher_labels": TOKENS,
    }
)


@dataclass
class ConversationData:
    dataset: Dataset  # rows {"id", "source", "images", "messages", "length"}
    stats: DataStats
    renderer: Renderer
    teacher_renderer: Renderer | None = None
    problems: list[Problem] = field(default_factory=list)  # the skipped samples
    skip_report: Path | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def collator(self, packing: bool = False, image_cache_mb: float = 0) -> ConversationCollator:
        return ConversationCollator(
            self.renderer, self.teacher_renderer, packing=packing, pretokenized=True, image_cache_mb=image_cache_mb
        )


def to_messages(turns: Any, key: str = "conversations") -> list[dict[str, str]]:
    """LLaVA turns (`from`/`value`, or `role`/`content`) -> chat-template messages (`role`/`content`)."""
    if not isinstance(turns, list) or not turns:
        raise SampleProblem(MALFORMED_SAMPLE, f"`{key}` must be a non-empty list of turns")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SampleProblem(MALFORMED_SAMPLE, f"{key}[{k}] is not an object")
        role = turn.get("from", turn.get("role"))
        if role is None:
            raise SampleProblem(MISSING_KEY, f"{key}[{k}] has no 'from'")
        if role not in ROLES:
            raise SampleProblem(MALFORMED_SAMPLE, f"{key}[{k}]: unknown role {role!r}")
        value = turn.get("value", turn.get("content"))
        if value is None:
            raise SampleProblem(MISSING_KEY, f"{key}[{k}] has no 'value'")
        if not isinstance(value, str):
            raise SampleProblem(MALFORMED_SAMPLE, f"{key}[{k}]: 'value' must be a string")
        messages.append({"role": ROLES[role], "content": value})
    return messages


def check_ends_with_answer(messages: list[dict[str, str]]) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleProblem(NO_ASSISTANT, "no gpt/assistant turn")
    if messages[-1]["role"] != "assistant":
        raise SampleProblem(NO_ASSISTANT, "the conversation does not end with an assistant answer")


def check_image_tags(messages: list[dict[str, str]], images: list[str]) -> None:
    tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if tags != len(images):
        raise SampleProblem(IMAGE_TAG_MISMATCH, f"{tags} <image> tag(s) for {len(images)} image(s)")


def normalize_conversation(data: Any, sample_id: str, source: str, image_root: Path | ImageRoot) -> dict[str, Any]:
    """A raw LLaVA sample -> a dataset row; raises `SampleProblem` for what cannot be trained on."""
    if not isinstance(data, dict):
        raise SampleProblem(MALFORMED_SAMPLE, f"expected a JSON object, found {type(data).__name__}")
    if "conversations" not in data:
        raise SampleProblem(MISSING_KEY, "'conversations'")
    messages = to_messages(data["conversations"])
    check_ends_with_answer(messages)
    images = resolve_images(data.get("image"), image_root)
    check_image_tags(messages, images)
    return {"id": sample_id, "source": source, "images": images, "messages": messages}


def same_response(student: RenderedSample, teacher: RenderedSample, what: str = "") -> None:
    if student.response_tokens() != teacher.response_tokens():
        raise SampleProblem(
            TEACHER_MISMATCH,
            f"{what}{student.num_response_tokens} response tokens for the student, {teacher.num_response_tokens} "
            f"for the teacher ({len(student.input_ids)} vs {len(teacher.input_ids)} tokens in all)",
        )


# ---------------------------------------------------------------- shared by both loaders


def data_files(files: str | Path | list[str | Path]) -> list[Path]:
    paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
    if not paths:
        raise UserError("no data file given")
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: no such data file")
    return paths


def image_root_for(image_root: str | Path | None, allow_outside: bool = False) -> Callable[[str], ImageRoot]:
    """Where a data file's image paths are resolved and confined: `image_root`, else the file's directory."""
    if image_root is not None:
        root = Path(image_root)
        if not root.is_dir():
            raise UserError(f"image root {root}: no such directory")
        return lambda _file: ImageRoot(root, allow_outside)
    return lambda file: ImageRoot(Path(file).parent, allow_outside)


def teacher_renderer_for(renderer: Renderer, teacher_processor: Any | None) -> Renderer | None:
    """The teacher's renderer if its processor renders differently from the student's, else None."""
    if teacher_processor is None or same_rendering(renderer.processor, teacher_processor):
        return None
    return Renderer(teacher_processor, renderer.max_length)


def locate_template_errors(rec: Record, handle: Callable[[Record], Any]) -> Any:
    """Run `handle(rec)`, naming the sample in a template error (which stops loading in every mode)."""
    try:
        return handle(rec)
    except TemplateError as exc:
        raise TemplateError(f"{rec.file}:{rec.line}: sample {rec.sample_id()}: {exc}") from None


def fingerprint_parts(
    image_root: str | Path | None, renderer: Renderer, teacher: Renderer | None, allow_outside: bool = False
) -> dict[str, Any]:
    return {
        "image_root": str(Path(image_root).resolve()) if image_root is not None else None,
        "allow_outside_root": allow_outside,
        "student": renderer.signature(),
        "teacher": teacher.signature() if teacher is not None else None,
    }


# ---------------------------------------------------------------- loading


def conversation_handler(
    root_of: Callable[[str], Path], renderer: Renderer, teacher: Renderer | None, stats: DataStats
) -> Callable[[Record], dict[str, Any]]:
    """Record -> validated row (raises `SampleProblem`); counts what it keeps into `stats`."""

    def handle(rec: Record) -> dict[str, Any]:
        row = normalize_conversation(rec.data, rec.sample_id(), f"{rec.file}:{rec.line}", root_of(rec.file))
        check_images(row["images"])
        student = renderer.render_conversation(row)
        teacher_seqs = []
        if teacher is not None:
            teacher_seqs = [teacher.render_conversation(row)]
            same_response(student, teacher_seqs[0])
        stats.add_sample(len(row["images"]), [student], teacher_seqs)
        own = teacher_seqs[0] if teacher_seqs else None  # the teacher's tokens, when it renders its own
        tokens = {
            "input_ids": student.input_ids,
            "labels": student.labels,
            "teacher_input_ids": own.input_ids if own else [],
            "teacher_labels": own.labels if own else [],
        }
        return {**row, "length": max(len(seq.input_ids) for seq in [student, *teacher_seqs]), **tokens}

    return lambda rec: locate_template_errors(rec, handle)


def load_validated(
    kind: str,
    handler_for: Callable,
    features: Features,
    files,
    image_root,
    processor,
    max_length: int | None,
    on_bad_sample: str,
    report_dir,
    teacher_processor,
    cache_dir,
    verbose: bool,
    allow_outside_root: bool = False,
) -> tuple[Dataset, DataStats, Renderer, Renderer | None, BadSamplePolicy, Path | None]:
    """The loading sequence both data kinds share: render, validate every sample, cache, report."""
    if processor is None:
        raise UserError(f"loading {kind} needs the student's processor")
    paths = data_files(files)
    root_of = image_root_for(image_root, allow_outside_root)
    policy = BadSamplePolicy(on_bad_sample)
    renderer = Renderer(processor, max_length)
    teacher = teacher_renderer_for(renderer, teacher_processor)
    stats = DataStats(tokens_per_image=renderer.tokens_per_image)
    ds = build_dataset(
        kind,
        paths,
        handler_for(root_of, renderer, teacher, stats),
        features,
        policy,
        stats,
        fingerprint_parts(image_root, renderer, teacher, allow_outside_root),
        cache_dir,
    )
    report = policy.finish(stats, report_dir, verbose)  # raises when nothing is left
    if verbose and stats.truncated:  # `data check` reports it too; training must not cut answers silently
        print(
            f"truncated {stats.truncated} of {stats.sequences} sequences to max_length {max_length} "
            f"(their answers are cut; raise data.max_length to keep them)",
            flush=True,
        )
    assert ds is not None
    return ds, stats, renderer, teacher, policy, report


def load_conversations(
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
) -> ConversationData:
    """Read, validate and cache LLaVA conversations for training.

    `processor` is the student's (`LlavaProcessor`, or a tokenizer for a text-only model). With a
    `teacher_processor` that renders differently, every sample is rendered under both and its
    response tokens must agree. `on_bad_sample`: "error" stops at the first bad sample (UserError
    `file:line: sample <id>: <reason>: <detail> (<fix>)`); "skip" drops bad samples, prints a
    summary and writes `report_dir/skipped.jsonl`. Zero samples left is always an error. Image paths
    must resolve inside the image root unless `allow_outside_root`.
    """
    ds, stats, renderer, teacher, policy, report = load_validated(
        "conversations",
        conversation_handler,
        CONVERSATION_FEATURES,
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
    return ConversationData(ds, stats, renderer, teacher, policy.problems, report)
