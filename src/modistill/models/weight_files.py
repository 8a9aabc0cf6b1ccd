"""Checking a model directory's weight files before transformers reads them: one-line errors, no pickle.

A truncated download, a zero-byte file or a damaged header otherwise surfaces as a traceback from
deep inside safetensors; a pickled checkpoint (`pytorch_model.bin`) is refused by transformers'
safe loading with a traceback too. Both become a `UserError` naming the file and the fix.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from modistill.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (header and data sizes checked, no tensor read), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for a safetensors header"
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_HEADER or 8 + header_len > size:
            return f"the header claims {header_len} bytes but the file has {size}"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError):
            return "the header is not valid JSON"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    ends = [
        t["data_offsets"][1]
        for k, t in header.items()
        if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2
    ]
    if len(ends) != len([k for k in header if k != "__metadata__"]):
        return "a tensor entry of the header has no data_offsets"
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        return f"truncated: the tensors need {needed} bytes, the file has {size}"
    return None


def check_weight_files(model_dir: str | Path) -> None:
    """Raise a one-line `UserError` for a damaged safetensors file or a pickle-only model directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return  # a hub id: transformers downloads and checks it
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise UserError(
                f"{model_dir / pickled[0]}: refused to unpickle it (loading a pickle can run arbitrary "
                f"code); convert it to safetensors (save_pretrained(..., safe_serialization=True) "
                f"where you trust the file)"
            )
    for path in weights:
        why = safetensors_problem(path)
        if why is not None:
            raise UserError(f"{path}: not a valid safetensors file ({why}); re-save or re-download the model")
