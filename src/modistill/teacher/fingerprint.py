"""Fingerprints that tie stored teacher outputs to the exact data, tokenizer and teacher they came from."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

# Weight files larger than this are fingerprinted by name, size and mtime instead of content.
_HASH_CONTENT_LIMIT = 2 * 1024**3


def _hash_file(path: Path, h) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def files_fingerprint(paths: Sequence[str | Path]) -> str:
    """sha256 over the files' bytes (data files: a changed file must invalidate stored outputs)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        h.update(str(path.name).encode())
        _hash_file(path, h)
    return h.hexdigest()[:16]


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over a model directory's config and weights (content when small, stat when large)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    if not model_dir.is_dir():  # a hub id: its name is all we know locally
        h.update(str(model_dir).encode())
        return h.hexdigest()[:16]
    weights = sorted(model_dir.glob("*.safetensors"))
    big = sum(p.stat().st_size for p in weights) > _HASH_CONTENT_LIMIT
    for path in [model_dir / "config.json", *weights]:
        if not path.exists():
            continue
        h.update(path.name.encode())
        if big and path.suffix == ".safetensors":
            stat = path.stat()
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            _hash_file(path, h)
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id): two tokenizers agree iff their fingerprints do."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def settings_fingerprint(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(files: list[str], max_length: int, max_samples: int | None) -> str:
    """The training data as the trainer sees it: file contents and the settings that select samples."""
    return settings_fingerprint(files=files_fingerprint(files), max_length=max_length, max_samples=max_samples)
