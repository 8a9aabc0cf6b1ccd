"""Named points where the process can be killed as `kill -9` would, to test that every run survives it.

`MODISTILL_KILL_AT=final-save` (or `step-3`, `checkpoint-save-2`, several comma-separated) makes
the process SIGKILL itself on reaching that point: no exception, no cleanup, no atexit, as with a
power cut or the OOM killer. Unset (always, outside tests), `crash_point` only reads the variable.
"""

from __future__ import annotations

import os
import signal

ENV = "MODISTILL_KILL_AT"


def crash_point(name: str, step: int | None = None) -> None:
    """Die here if `name` (or `name-step`) is listed in MODISTILL_KILL_AT."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    points = {p.strip() for p in wanted.split(",")}
    if name in points or (step is not None and f"{name}-{step}" in points):
        os.kill(os.getpid(), signal.SIGKILL)
