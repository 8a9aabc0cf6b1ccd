"""Writing outputs so that nothing a user made is lost: atomic directories and files."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modistill.errors import UserError

# Every directory modistill creates holds this file ({"kind", "version"}); only such a directory
# (or an empty one) is ever deleted or replaced. Directories from before the marker are recognised
# by files only modistill writes there (`legacy` names), passed by each kind of output.
MARKER = ".modistill"


def mark(path: str | Path, kind: str) -> None:
    """Write the marker that makes `path` recognisably modistill's (and replaceable by it)."""
    from modistill import __version__

    write_json_atomic(Path(path) / MARKER, {"kind": kind, "version": __version__})


def is_ours(path: str | Path, legacy: tuple[str, ...] = (), kind: str | None = None) -> bool:
    """True when `path` is absent or empty, holds the marker (of `kind`, if given), or one of the `legacy` names.

    The kind matters: a training run must not take over (and `--fresh` delete) an upcycled model.
    """
    path = Path(path)
    if not path.is_dir():
        return not path.exists()
    names = {p.name for p in path.iterdir()}
    if MARKER in names:
        try:
            written = json.loads((path / MARKER).read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            written = None
        return kind is None or written == kind
    return not names or bool(names & set(legacy))


def check_not_input(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, contains, or lies inside one of the `inputs` (replacing it would delete it)."""
    real_out = Path(os.path.realpath(out))
    for item in inputs:
        if item is None or not Path(item).exists():
            continue  # a hub id, or an input that is not a local path
        real_in = Path(os.path.realpath(item))
        if real_out == real_in or real_out in real_in.parents or real_in in real_out.parents:
            raise UserError(
                f"{out}: the output would contain or be inside the input {item}; choose an output "
                f"directory apart from the inputs"
            )


def check_output_dir(
    out: str | Path,
    overwrite: bool,
    flag: str = "--overwrite",
    inputs: Iterable[str | Path | None] = (),
    legacy: tuple[str, ...] = (),
    kind: str | None = None,
) -> Path:
    """Refuse an existing non-empty output unless overwriting is allowed and the directory is modistill's."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another output path")
    check_not_input(out, inputs)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: output directory exists and is not empty; pass {flag} or choose another path")
        if not is_ours(out, legacy, kind):
            raise UserError(
                f"{out}: not a directory modistill wrote as {kind or 'this output'} (see its {MARKER} "
                f"file); refusing to replace it with {flag}: choose another path, or remove it yourself"
            )
    return out


@contextmanager
def atomic_output_dir(
    out: str | Path,
    overwrite: bool = False,
    flag: str = "--overwrite",
    kind: str = "output",
    inputs: Iterable[str | Path | None] = (),
    legacy: tuple[str, ...] = (),
) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it (marked as `kind`) replaces `out`, on failure it is removed.

    A crash or an exception part-way leaves `out` as it was (absent, or the previous version). Only a
    directory modistill wrote is replaced (see `check_output_dir`).
    """
    inputs = list(inputs)
    out = check_output_dir(out, overwrite, flag, inputs, legacy, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
        mark(tmp, kind)
        check_output_dir(out, overwrite, flag, inputs, legacy, kind)  # again: something may have appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{token}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)
