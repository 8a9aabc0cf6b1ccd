"""Evaluate a VLM on eval files (VQA, POPE, captions): generate, score, keep every prediction, write JSON.

The kind of a file is read from its rows: "scene" -> captions (oracle-scored hallucination),
"label" -> POPE, "answer" -> VQA. Image paths in the rows are relative to an image root: the one
given, else the file's own folder or its parent (a scenes world keeps eval/*.jsonl beside images/).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modistill.data.image_safety import UnsafeImage, check_regular_file, confine
from modistill.errors import UserError
from modistill.eval.efficiency import measure_efficiency
from modistill.eval.generate import check_vlm, generate_answers, load_image
from modistill.eval.metrics import (
    caption_hallucination,
    parse_yes_no,
    pope_metrics,
    unknown_types,
    vqa_correct,
    vqa_metrics,
)
from modistill.io import write_json_atomic
from modistill.models.load import LoadedModel, load_config, load_model
from modistill.scenes.oracle import score_caption
from modistill.scenes.text import QUESTION_TYPES
from modistill.scenes.world import Scene

KINDS = ("vqa", "pope", "captions")
_REQUIRED = {
    "vqa": ("image", "text", "answer"),
    "pope": ("image", "text", "label"),
    "captions": ("image", "text", "scene"),
}


@dataclass
class EvalSet:
    """One eval file's rows, with where each came from (for error messages) and its image root."""

    name: str
    kind: str
    path: Path
    rows: list[dict[str, Any]]
    where: list[str]  # "file:line" of each row
    image_root: Path
    scenes: list[Scene] = field(default_factory=list)  # captions only


# ---------------------------------------------------------------------------------------- reading
def detect_kind(row: Mapping[str, Any]) -> str | None:
    """captions if the row has a "scene", pope if a "label", vqa if an "answer"; else None."""
    if "scene" in row:
        return "captions"
    if "label" in row:
        return "pope"
    if "answer" in row:
        return "vqa"
    return None


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """JSON lines (or one JSON array) of objects, with "file:line" / "file: item i" for each."""
    if not path.is_file():
        raise UserError(f"{path}: no such eval file")
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        pairs = [(row, f"{path}: item {i}") for i, row in enumerate(data)]
    else:
        pairs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                pairs.append((json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object"
                ) from None
    for row, where in pairs:
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not pairs:
        raise UserError(f"{path}: no rows; an eval file holds one JSON object per line")
    return [r for r, _ in pairs], [w for _, w in pairs]


def _image_root(path: Path, rows: list[dict[str, Any]], where: list[str], image_root: str | Path | None) -> Path:
    first = Path(str(rows[0]["image"]))
    if image_root is not None:
        root = Path(image_root)
        if not root.is_dir():
            raise UserError(f"--image-root {root}: no such directory")
        return root
    for root in (path.parent, path.parent.parent):
        if (root / first).is_file():
            return root
    raise UserError(
        f"{where[0]}: image {first} found neither in {path.parent} nor in {path.parent.parent}; "
        "pass --image-root DIR (the folder the image paths are relative to)"
    )


def load_eval_file(
    path: str | Path, name: str | None = None, image_root: str | Path | None = None, limit: int | None = None
) -> EvalSet:
    """Read and validate an eval file: kind, required keys, labels, scenes, every image present."""
    path = Path(path)
    rows, where = _read_rows(path)
    if limit is not None:
        rows, where = rows[:limit], where[:limit]
    kind = detect_kind(rows[0])
    if kind is None:
        raise UserError(
            f'{where[0]}: cannot tell the eval kind; a row needs "answer" (VQA), "label" (POPE) or "scene" (captions)'
        )
    for row, w in zip(rows, where):
        missing = [k for k in _REQUIRED[kind] if k not in row]
        if missing or detect_kind(row) != kind:
            raise UserError(
                f"{w}: a {kind} row needs {', '.join(_REQUIRED[kind])} (missing {', '.join(missing) or 'nothing'}; "
                f"mixed kinds in one file are not supported)"
            )
        if kind == "pope" and str(row["label"]).strip().lower() not in ("yes", "no"):
            raise UserError(f"{w}: POPE label must be yes or no, got {row['label']!r}")
    root = _image_root(path, rows, where, image_root)
    for row, w in zip(rows, where):
        image = root / str(row["image"])
        try:
            confine(image, root, fix="move it under --image-root DIR")
            check_regular_file(image)
        except UnsafeImage as exc:
            raise UserError(f"{w}: image {exc}") from None
        except OSError:
            raise UserError(
                f"{w}: image {image} not found; pass --image-root DIR (the folder the image paths are relative to)"
            ) from None
    scenes = [Scene.from_json(row["scene"], where=w) for row, w in zip(rows, where)] if kind == "captions" else []
    return EvalSet(name or kind, kind, path, rows, where, root, scenes)


def _named(eval_files: Mapping[str, str | Path] | Sequence[str | Path] | str | Path) -> list[tuple[str | None, Path]]:
    if isinstance(eval_files, (str, Path)):
        return [(None, Path(eval_files))]
    if isinstance(eval_files, Mapping):
        return [(str(k), Path(v)) for k, v in eval_files.items()]
    return [(None, Path(p)) for p in eval_files]


def _limits(limit: int | Mapping[str, int] | None, names: list[str | None]) -> list[int | None]:
    """Each file's row limit, in the order of `names` (None: every row)."""
    if not isinstance(limit, Mapping):
        if limit is not None and limit < 1:
            raise UserError(f"--limit must be >= 1 (got {limit})")
        return [limit] * len(names)
    unknown = sorted(set(limit) - {n for n in names if n is not None})
    if unknown:
        raise UserError(
            f"limit names {', '.join(unknown)}, which no eval file is called; name the files ({{name: path}})"
        )
    for name, n in limit.items():
        if n < 1:
            raise UserError(f"limit for {name} must be >= 1 (got {n})")
    return [limit.get(n) if n is not None else None for n in names]


def _unique_names(sets: list[EvalSet], given: list[str | None]) -> None:
    """Name unnamed sets by kind; two files of one kind are named by file stem (then by position)."""
    kinds = [s.kind for s in sets]
    for s, g in zip(sets, given):
        s.name = g if g is not None else (s.kind if kinds.count(s.kind) == 1 else s.path.stem)
    seen: dict[str, int] = {}
    for s in sets:
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}-{seen[s.name]}"
        else:
            seen[s.name] = 1


# --------------------------------------------------------------------------------------- scoring
def _items(s: EvalSet) -> list[dict[str, Any]]:
    return [{"image": str(r["image"]), "text": str(r["text"]), "source": w} for r, w in zip(s.rows, s.where)]


def _qid(row: dict[str, Any], where: str) -> Any:
    return row.get("question_id", where)


def _score_vqa(s: EvalSet, preds: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    answers = [str(r["answer"]) for r in s.rows]
    types = [str(r.get("type", "all")) for r in s.rows]
    generic = unknown_types(types)
    if generic:  # a scenes set with rows of unknown type: say so, they are scored apart
        first = generic[0]
        print(
            f"warning: {s.where[first]}: question type {types[first]!r} is not a scenes type "
            f"({', '.join(QUESTION_TYPES)}); {len(generic)} of {len(types)} rows scored by generic exact match",
            flush=True,
        )
    correct = vqa_correct(preds, answers, types)
    per_item = [
        {"question_id": _qid(r, w), "type": t, "answer": a, "prediction": p, "correct": ok}
        for r, w, t, a, p, ok in zip(s.rows, s.where, types, answers, preds, correct)
    ]
    return vqa_metrics(preds, answers, types), per_item


def _score_pope(s: EvalSet, preds: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    labels = [str(r["label"]).strip().lower() for r in s.rows]
    splits = [str(r.get("split", "all")) for r in s.rows]
    per_item = [
        {"question_id": _qid(r, w), "split": sp, "label": g, "prediction": p, "parsed": parse_yes_no(p)}
        for r, w, sp, g, p in zip(s.rows, s.where, splits, labels, preds)
    ]
    return pope_metrics(preds, labels, splits), per_item


def _score_captions(
    s: EvalSet, preds: list[str], samples: list[list[str]] | None, temperature: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    metrics: dict[str, Any] = {"greedy": caption_hallucination(preds, s.scenes)}
    per_item = []
    for r, w, scene, p in zip(s.rows, s.where, s.scenes, preds):
        score = score_caption(p, scene)
        per_item.append(
            {
                "question_id": _qid(r, w),
                "image": r["image"],
                "prediction": p,
                "parseable": score.parseable,
                "hallucinated": score.hallucinated,
                "coverage": score.coverage,
            }
        )
    if samples is not None:
        flat = [c for per_image in samples for c in per_image]
        scenes = [scene for scene, per_image in zip(s.scenes, samples) for _ in per_image]
        metrics["sampled"] = {
            **caption_hallucination(flat, scenes),
            "samples_per_image": len(samples[0]) if samples else 0,
            "temperature": temperature,
        }
        for item, per_image in zip(per_item, samples):
            item["samples"] = per_image
    return metrics, per_item


# ------------------------------------------------------------------------------------------ entry
def load_vlm(model: str | Path | LoadedModel, dtype: str = "float32") -> tuple[LoadedModel, str]:
    """(LoadedModel, display name) of a VLM directory or an already loaded model; UserError otherwise."""
    if isinstance(model, LoadedModel):
        check_vlm(model.model, model.processor)
        return model, getattr(model.model.config, "_name_or_path", "") or type(model.model).__name__
    config = load_config(model)
    if not hasattr(config, "vision_config"):  # refuse before loading weights
        raise UserError(
            f"{model}: a {config.model_type!r} model is not a vision-language model; evaluation needs a Llava "
            "VLM directory"
        )
    loaded = load_model(model, dtype=dtype)
    check_vlm(loaded.model, loaded.processor)
    return loaded, str(model)


def _json_safe(x: Any) -> Any:
    """NaN (e.g. precision with no positive prediction) -> null: strict JSON has no NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def results_path(out: str | Path) -> Path:
    """Where results go: `out` itself, or out/results.json when `out` is a directory."""
    out = Path(out)
    return out / "results.json" if out.is_dir() else out


def evaluate(
    model: str | Path | LoadedModel,
    eval_files: Mapping[str, str | Path] | Sequence[str | Path] | str | Path,
    out: str | Path | None = None,
    *,
    image_root: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    caption_samples: int = 0,
    caption_temperature: float = 1.0,
    limit: int | Mapping[str, int] | None = None,
    efficiency: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a VLM (directory or LoadedModel) on eval files ({name: path}, paths, or one path).

    Every file is read and checked (kinds, keys, images) before the model is loaded. Greedy
    decoding for all; captions additionally sampled `caption_samples` times per image at
    `caption_temperature` (pure sampling), reported separately as metrics[name]["sampled"].
    Returns {"model", "settings", "metrics": {name: ...}, "predictions": {name: [per item]},
    "files": {name: {"path", "kind", "image_root", "n"}}, "seconds": {name: s}, "efficiency"
    (if asked)}; the same dict (NaN as null) is written atomically to `out` if given.
    `limit`: the first N rows of every file, or {set name: N} for some named files (the others whole;
    the demo scores captions on every test image but only the first questions)."""
    named = _named(eval_files)
    limits = _limits(limit, [n for n, _ in named])
    if caption_samples < 0:
        raise UserError(f"--caption-samples must be >= 0 (got {caption_samples})")
    if batch_size < 1 or max_new_tokens < 1:
        raise UserError(f"--batch-size and --max-new-tokens must be >= 1 (got {batch_size}, {max_new_tokens})")
    if not named:
        raise UserError("no eval files given; pass --data FILE.jsonl")
    sets = [load_eval_file(p, n, image_root, limits[i]) for i, (n, p) in enumerate(named)]
    _unique_names(sets, [n for n, _ in named])
    if out is not None:  # fail on an unwritable --out now, not after the generation
        try:
            results_path(out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--out {out}: cannot create its folder ({exc.strerror}); choose another path") from None
    loaded, model_name = load_vlm(model, dtype)
    mdl, proc = loaded.model, loaded.processor
    gen: dict[str, Any] = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    results: dict[str, Any] = {
        "model": model_name,
        "settings": {
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
            "caption_samples": caption_samples,
            "caption_temperature": caption_temperature,
            "limit": dict(limit) if isinstance(limit, Mapping) else limit,
            "seed": seed,
            "dtype": str(next(mdl.parameters()).dtype).replace("torch.", ""),
            "device": str(mdl.device),
            "threads": torch.get_num_threads(),
        },
        "files": {},
        "metrics": {},
        "predictions": {},
        "seconds": {},
    }
    for s in sets:
        t0 = time.perf_counter()
        items = _items(s)
        preds = generate_answers(mdl, proc, items, image_root=s.image_root, desc=f"{s.name} (greedy)", **gen)
        if s.kind == "vqa":
            metrics, per_item = _score_vqa(s, preds)
        elif s.kind == "pope":
            metrics, per_item = _score_pope(s, preds)
        else:
            samples = None
            if caption_samples:
                samples = generate_answers(
                    mdl,
                    proc,
                    items,
                    image_root=s.image_root,
                    do_sample=True,
                    temperature=caption_temperature,
                    num_samples=caption_samples,
                    desc=f"{s.name} (sampled)",
                    **gen,
                )
                if caption_samples == 1:
                    samples = [[c] for c in samples]
            metrics, per_item = _score_captions(s, preds, samples, caption_temperature)
        results["files"][s.name] = {
            "path": str(s.path),
            "kind": s.kind,
            "image_root": str(s.image_root),
            "n": len(s.rows),
        }
        results["metrics"][s.name] = metrics
        results["predictions"][s.name] = per_item
        results["seconds"][s.name] = round(time.perf_counter() - t0, 3)
    if efficiency:
        first = sets[0]
        caption_set = next((s for s in sets if s.kind == "captions"), first)
        image = load_image(caption_set.rows[0]["image"], caption_set.image_root, caption_set.where[0])
        results["efficiency"] = measure_efficiency(
            mdl,
            proc,
            image=image,
            prompt=str(caption_set.rows[0]["text"]),
            new_tokens=max(2, max_new_tokens),
            batch_size=batch_size,
        )
    if out is not None:
        write_json_atomic(results_path(out), _json_safe(results))
    return results
