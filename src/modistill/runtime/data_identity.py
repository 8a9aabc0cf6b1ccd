"""The training data a run directory was started on: each file's path, size and content hash, and the sample count.

Stored as `data.json` in the run directory. A resume on edited data would silently continue the
run on other samples (the Trainer skips as many batches as it had trained, whatever they now hold),
so a mismatch is refused unless the user asks for it (`--resume-with-changes`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

DATA_FILE = "data.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def data_identity(files: list[str | Path]) -> dict[str, Any]:
    """{"files": [{"path", "size", "sha256"}]} of the data files (missing ones are left to the loader)."""
    entries = []
    for name in files:
        path = Path(name)
        if path.is_file():
            entries.append({"path": str(path.resolve()), "size": path.stat().st_size, "sha256": _sha256(path)})
        else:
            entries.append({"path": str(path), "size": None, "sha256": None})
    return {"files": entries}


def describe_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between two identities ("train.json changed (size 100 -> 120)"), or None if they agree."""
    old = {f["path"]: f for f in saved.get("files", [])}
    new = {f["path"]: f for f in current.get("files", [])}
    changes = [f"{Path(p).name} added" for p in new if p not in old]
    changes += [f"{Path(p).name} removed" for p in old if p not in new]
    for p in new.keys() & old.keys():
        if (new[p]["size"], new[p]["sha256"]) != (old[p]["size"], old[p]["sha256"]):
            changes.append(f"{Path(p).name} changed (size {old[p]['size']} -> {new[p]['size']} bytes)")
    if "samples" in saved and "samples" in current and saved["samples"] != current["samples"]:
        changes.append(f"{saved['samples']} -> {current['samples']} samples")
    return "; ".join(sorted(changes)) or None


def read_identity(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / DATA_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
