"""Reading data files record by record, and what happens to a bad sample.

Every sample problem has a reason (one of the constants below) and a fix; it is reported as
`file:line: sample <id>: <reason>: <detail> (<fix>)`. `on_bad_sample="error"` stops at the first one
(a `UserError`); `"skip"` drops the sample, prints one summary (counts per reason) and writes every
skipped sample to `report_dir/skipped.jsonl`. A dataset left with zero samples is always an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features
from datasets.exceptions import DatasetGenerationError

from modistill.data.image_safety import ImageRoot, UnsafeImage, check_regular_file, open_image
from modistill.errors import UserError
from modistill.faults import crash_point

# The reasons a sample cannot be trained on (reported and counted by these exact strings).
MALFORMED_JSON = "malformed JSON"
MALFORMED_SAMPLE = "malformed sample"
MISSING_KEY = "missing key"
BAD_IMAGE = "missing or undecodable image"
IMAGE_OUTSIDE_ROOT = "image outside the image root"
NO_ASSISTANT = "no assistant turn"
IMAGE_TAG_MISMATCH = "number of <image> tags differs from number of images"
NO_VISION = "images given to a text-only model"
TEMPLATE_REJECTS = "chat template rejects the conversation"
ALL_MASKED = "all labels masked after truncation"
IMAGE_TRUNCATED = "image tokens would be truncated"
TEACHER_MISMATCH = "response tokens differ between student and teacher renderings"

FIXES = {
    MALFORMED_JSON: "fix the JSON syntax of this line",
    MALFORMED_SAMPLE: "each turn needs a role (human/gpt/user/assistant/system) and a string value",
    MISSING_KEY: "add the key, or drop the sample",
    BAD_IMAGE: "check the path and --image-root / image_root, or re-save the image",
    IMAGE_OUTSIDE_ROOT: "move the image under the image root, or set data.allow_outside_root: true",
    NO_ASSISTANT: "end the conversation with an assistant (gpt) answer",
    IMAGE_TAG_MISMATCH: "put one <image> tag in the text per image path",
    NO_VISION: "use a VLM (with an image processor) or drop the image samples",
    TEMPLATE_REJECTS: "reorder the turns as the model's chat template requires",
    ALL_MASKED: "raise max_length or shorten the prompt: no answer token fits",
    IMAGE_TRUNCATED: "raise max_length or shorten the conversation before the image",
    TEACHER_MISMATCH: "use a teacher with the student's tokenizer, or raise max_length so neither rendering is cut",
}

ON_BAD_SAMPLE = ("error", "skip")
SKIP_REPORT = "skipped.jsonl"


class SampleProblem(Exception):
    """Raised while reading or rendering one sample; becomes a `Problem` once its location is known."""

    def __init__(self, reason: str, detail: str = "", image: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.image = image  # the image at fault, for BAD_IMAGE


@dataclass
class Problem:
    file: str
    line: int
    sample_id: str
    reason: str
    detail: str = ""
    index: int | None = None  # position in a JSON list (its elements may share a line)
    image: str | None = None  # the image at fault (BAD_IMAGE): a cached outcome is stale once it is fixed

    def message(self, with_fix: bool = True) -> str:
        item = f" (item {self.index} of the list)" if self.index is not None else ""
        text = f"{self.file}:{self.line}: sample {self.sample_id}{item}: {self.reason}"
        if self.detail:
            text += f": {self.detail}"
        if with_fix and self.reason in FIXES:
            text += f" ({FIXES[self.reason]})"
        return text


@dataclass
class Record:
    """One element of a data file: the parsed JSON, or why it could not be parsed."""

    file: str
    line: int  # 1-based line where the element starts
    index: int  # 0-based position in the file
    data: Any = None
    error: str | None = None
    in_list: bool = False  # an element of a JSON list (else a JSONL line)

    def sample_id(self) -> str:
        """The sample's own id, else one made from the file name and position (unique across files)."""
        if isinstance(self.data, dict):
            for key in ("id", "idx", "question_id"):
                if self.data.get(key) not in (None, ""):
                    return str(self.data[key])
        return f"{Path(self.file).name}#{self.index}"


# ---------------------------------------------------------------- reading files

_CHUNK = 1 << 20


def iter_records(path: str | Path) -> Iterator[Record]:
    """Elements of a JSON list or lines of a JSONL file, each with the line where it starts.

    A file whose first non-blank character is `[` is a JSON list (read in chunks: a 1 GB file is
    never held as Python objects); anything else is JSONL (one object per line, blank lines ignored).
    A syntax error in a JSON list ends the file's reading, so it is a `UserError`; a bad JSONL line
    is one bad sample.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such data file")
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 byte-order mark is allowed
        while not head and f.read(1):  # a file starting with >4 KB of blanks
            head = f.read(4096).lstrip()
    if head.startswith(b"["):
        yield from _iter_json_list(path)
    else:
        yield from _iter_jsonl(path)


def _iter_jsonl(path: Path) -> Iterator[Record]:
    index = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                data, error = json.loads(raw.decode("utf-8-sig")), None
            except UnicodeDecodeError:
                data, error = None, "not UTF-8 text"
            except json.JSONDecodeError as exc:
                data, error = None, f"{exc.msg} at column {exc.colno}"
            yield Record(str(path), lineno, index, data, error)
            index += 1


def _iter_json_list(path: Path) -> Iterator[Record]:
    """Scan `[elem, elem, ...]` with `JSONDecoder.raw_decode`, reading more text when an element is cut."""
    decoder = json.JSONDecoder()
    try:
        f = open(path, encoding="utf-8-sig")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    with f:
        buf, pos, line, eof = "", 0, 1, False

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            try:
                chunk = f.read(_CHUNK)
            except UnicodeDecodeError:
                raise UserError(f"{path}: not UTF-8 text") from None
            if not chunk:
                eof = True
                return False
            buf, pos = buf[pos:] + chunk, 0  # drop what was consumed
            return True

        def skip_blanks() -> str | None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not more():
                    return None

        def syntax_error(what: str, at: int | None = None) -> UserError:
            where = line if at is None else line + buf.count("\n", pos, at)
            return UserError(f"{path}:{where}: malformed JSON list: {what} (fix the JSON syntax, or use JSONL)")

        skip_blanks()
        pos += 1  # the "[" seen by iter_records
        index = 0
        if skip_blanks() == "]":
            return
        while True:
            if skip_blanks() is None:
                raise syntax_error("the list is not closed with ]")
            while True:
                try:
                    data, end = decoder.raw_decode(buf, pos)
                    # A number cut by the chunk end parses; only trust what is followed by more text.
                    if end < len(buf) or not more():
                        break
                except json.JSONDecodeError as exc:
                    if not more():  # the element is really malformed, not just cut by the chunk
                        raise syntax_error(exc.msg, at=exc.pos) from None
            yield Record(str(path), line, index, data, None, in_list=True)
            index += 1
            line += buf.count("\n", pos, end)
            pos = end
            sep = skip_blanks()
            if sep == "]":
                return
            if sep != ",":
                found = f"expected , or ] after element {index}, found {sep!r}"
                raise syntax_error(found if sep else "unexpected end of file")
            pos += 1


# ---------------------------------------------------------------- images


NOT_FOUND = " not found"
UNDECODABLE = " cannot be decoded "


def image_problem(path: str) -> str | None:
    """Why the image at `path` cannot be used (missing, not a regular file, too large, undecodable), or None."""
    try:
        st = check_regular_file(path)  # before any open(): a FIFO would block it forever
    except UnsafeImage as exc:
        return f"{path}{UNDECODABLE}({exc})"
    except OSError:
        return f"{path}{NOT_FOUND}"
    return _verify_image(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=1 << 16)  # pairs and multi-turn samples share images; keyed by mtime so edits count
def _verify_image(path: str, mtime_ns: int, size: int) -> str | None:
    try:
        with open_image(path) as im:  # the pixel bound is checked on the header, before decoding
            im.verify()
    except UnsafeImage as exc:
        return f"{path}{UNDECODABLE}({exc})"
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError...)
        return f"{path}{UNDECODABLE}({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def resolve_images(value: Any, image_root: Path | ImageRoot) -> list[str]:
    """The `image` field (absent, a path, or a list of paths) as paths confined to the image root."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(p, str) and p for p in items):
        raise SampleProblem(MALFORMED_SAMPLE, "`image` must be a path or a list of paths")
    root = image_root if isinstance(image_root, ImageRoot) else ImageRoot(Path(image_root))
    try:
        return [root.resolve(p) for p in items]
    except UnsafeImage as exc:
        raise SampleProblem(IMAGE_OUTSIDE_ROOT, str(exc).split(" (")[0]) from None


def check_images(paths: list[str]) -> None:
    for p in paths:
        why = image_problem(p)
        if why is not None:
            raise SampleProblem(BAD_IMAGE, why, image=p)


# ---------------------------------------------------------------- statistics and the bad-sample policy


@dataclass
class DataStats:
    """What a load kept and dropped. Token counts are per rendered sequence (a pair counts two)."""

    records: int = 0  # elements read, good or bad
    samples: int = 0  # kept
    with_images: int = 0
    images: int = 0
    tokens_per_image: int = 0
    sequences: int = 0
    tokens_min: int = 0
    tokens_max: int = 0
    tokens_total: int = 0
    image_tokens_total: int = 0
    response_tokens_total: int = 0
    truncated: int = 0
    teacher_tokens_max: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def add_sample(self, n_images: int, sequences: list[Any], teacher_sequences: Sequence[Any] = ()) -> None:
        """Count one kept sample from its rendered sequences (`RenderedSample`s)."""
        self.samples += 1
        self.with_images += n_images > 0
        self.images += n_images
        for seq in sequences:
            n = len(seq.input_ids)
            self.tokens_min = n if self.sequences == 0 else min(self.tokens_min, n)
            self.tokens_max = max(self.tokens_max, n)
            self.sequences += 1
            self.tokens_total += n
            self.image_tokens_total += seq.num_image_tokens
            self.response_tokens_total += seq.num_response_tokens
            self.truncated += seq.truncated
        for seq in teacher_sequences:
            self.teacher_tokens_max = max(self.teacher_tokens_max, len(seq.input_ids))

    @property
    def tokens_mean(self) -> float:
        return self.tokens_total / self.sequences if self.sequences else 0.0

    def summary_lines(self) -> list[str]:
        lines = [
            f"samples: {self.samples} kept of {self.records} read ({self.with_images} with images, "
            f"{self.samples - self.with_images} text-only; {self.images} images)",
            f"tokens per sequence: min {self.tokens_min} / mean {self.tokens_mean:.1f} / max {self.tokens_max} "
            f"({self.sequences} sequences, {self.truncated} truncated)",
            f"image tokens: {self.tokens_per_image} per image, {self.image_tokens_total} in all; "
            f"response tokens: {self.response_tokens_total}",
        ]
        if self.teacher_tokens_max:
            lines.append(f"teacher rendering: max {self.teacher_tokens_max} tokens per sequence")
        return lines


class BadSamplePolicy:
    """Applies `on_bad_sample`: raise at the first problem ("error") or record it ("skip", "collect")."""

    def __init__(self, on_bad_sample: str) -> None:
        if on_bad_sample not in ON_BAD_SAMPLE + ("collect",):
            raise UserError(f"on_bad_sample must be one of {', '.join(ON_BAD_SAMPLE)}, not {on_bad_sample!r}")
        self.mode = on_bad_sample
        self.problems: list[Problem] = []

    def add(self, problem: Problem) -> None:
        if self.mode == "error":
            raise UserError(problem.message())
        self.problems.append(problem)

    def finish(self, stats: DataStats, report_dir: str | Path | None, verbose: bool = True) -> Path | None:
        """Raise on an empty dataset; in skip mode print the summary and write the skip report (if report_dir)."""
        if self.mode == "error" and self.problems:  # replayed from a cached validation
            raise UserError(self.problems[0].message())
        stats.skipped = dict(Counter(p.reason for p in self.problems).most_common())
        report = None
        if self.mode == "skip" and report_dir is not None:  # written even when empty: no stale list survives
            report = Path(report_dir) / SKIP_REPORT
            report.parent.mkdir(parents=True, exist_ok=True)
            tmp = report.with_name(f".{report.name}.tmp")
            with open(tmp, "w") as f:
                for p in self.problems:
                    f.write(
                        json.dumps(
                            {
                                "id": p.sample_id,
                                "file": p.file,
                                "line": p.line,
                                "index": p.index,
                                "reason": p.reason,
                                "detail": p.detail,
                            }
                        )
                        + "\n"
                    )
            os.replace(tmp, report)
        if self.problems and verbose:
            counts = ", ".join(f"{n} {reason}" for reason, n in stats.skipped.items())
            where = f"; ids in {report}" if report else ""
            print(f"skipped {len(self.problems)} of {stats.records} samples ({counts}){where}", flush=True)
        if stats.samples == 0:
            first = f"; first problem: {self.problems[0].message()}" if self.problems else ""
            raise UserError(f"no usable sample in {stats.records} read{first}")
        return report


def fingerprint(parts: Any) -> str:
    """A short hash of the JSON of `parts` (what the cached dataset depends on)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_identity(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def problems_to_json(problems: list[Problem]) -> list[dict[str, Any]]:
    return [asdict(p) for p in problems]


def problems_from_json(items: list[dict[str, Any]]) -> list[Problem]:
    return [Problem(**item) for item in items]


def scan_files(
    files: list[Path],
    handle: Callable[[Record], Any],
    policy: BadSamplePolicy,
    stats: DataStats,
) -> Iterator[Any]:
    """Yield `handle(record)` for every good record; bad ones go to `policy` as located problems."""
    for path in files:
        for rec in iter_records(path):
            stats.records += 1
            index = rec.index if rec.in_list else None
            if rec.error is not None:
                policy.add(Problem(rec.file, rec.line, rec.sample_id(), MALFORMED_JSON, rec.error, index))
                continue
            try:
                row = handle(rec)
            except SampleProblem as exc:
                policy.add(Problem(rec.file, rec.line, rec.sample_id(), exc.reason, exc.detail, index, exc.image))
                continue
            yield row


# Bump when what a cached dataset holds (row layout, checks) changes.
# 2: images confined to the root, regular files, pixel bound; problems name the image; 3: length; 4: tokens
CACHE_FORMAT = 4


class _NoSample(Exception):
    """Internal: the scan kept nothing (datasets cannot hold an empty generated split)."""


def build_dataset(
    kind: str,
    files: list[Path],
    handle: Callable[[Record], dict[str, Any]],
    features: Features,
    policy: BadSamplePolicy,
    stats: DataStats,
    fingerprint_parts: dict[str, Any],
    cache_dir: str | Path | None,
    _rebuilding: bool = False,
) -> Dataset | None:
    """Scan `files` into a memory-mapped arrow dataset (`Dataset.from_generator`), or None if nothing is kept.

    The arrow file is cached under a fingerprint of the files (path, size, mtime) and the rendering
    settings; the validation outcome (stats, problems) is saved beside it, so a rerun on unchanged
    data replays it instead of re-reading every image.
    """
    fp = fingerprint(
        {"kind": kind, "files": [file_identity(f) for f in files], "format": CACHE_FORMAT, **fingerprint_parts}
    )
    root = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    sidecar = root / "modistill" / f"{kind}-{fp}.json"
    ran = False

    def generate() -> Iterator[dict[str, Any]]:
        nonlocal ran
        ran = True
        yield from scan_files(files, handle, policy, stats)
        crash_point("dataset-build")  # rows written to the arrow cache, split not yet published
        if stats.samples == 0:
            raise _NoSample()
        # Written before datasets publishes the split, so a process waiting on its lock finds it.
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_name(f".{sidecar.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"stats": asdict(stats), "problems": problems_to_json(policy.problems)}))
        os.replace(tmp, sidecar)

    try:
        ds = Dataset.from_generator(generate, features=features, cache_dir=str(root), fingerprint=fp)
    except DatasetGenerationError as exc:
        cause = exc.__cause__
        if isinstance(cause, _NoSample):
            return None
        if isinstance(cause, UserError):
            raise cause from None
        raise
    if ran:
        return ds
    saved = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    problems = problems_from_json(saved["problems"]) if saved else []
    # The cache key holds the data files, not the images: a missing image that now exists means
    # the user fixed it, so the cached outcome is stale. (Images that vanished fail at collate time.)
    fixed = any(p.image is not None and image_problem(p.image) is None for p in problems)
    if saved is None or fixed:
        if _rebuilding:
            raise UserError(f"cannot rebuild the cached dataset under {root}; remove it or pass another cache_dir")
        _drop_cached(ds)
        sidecar.unlink(missing_ok=True)
        return build_dataset(kind, files, handle, features, policy, stats, fingerprint_parts, cache_dir, True)
    for key, value in saved["stats"].items():
        setattr(stats, key, value)
    policy.problems = problems
    return ds


def _drop_cached(ds: Dataset) -> None:
    """Remove the arrow files of a stale cached build (their directory) so the same fingerprint rebuilds."""
    dirs = {Path(f["filename"]).parent for f in ds.cache_files}
    del ds
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
