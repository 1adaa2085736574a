"""A process's own liveness as a file's modification time.

The process touches its file every quarter of the timeout while its event loop runs
(``keep_touching``); its supervisor reads the file's age (``age_s``) and restarts a process whose
file stopped advancing: stopped (SIGSTOP), or its loop wedged. A file that does not exist yet (a
process still starting) has no age.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path


async def keep_touching(path: Path, timeout_s: float) -> None:
    while True:
        path.touch()
        await asyncio.sleep(timeout_s / 4)  # a periodic beat, not a synchronisation


def age_s(path: Path, now: float | None = None) -> float | None:
    """Seconds since ``path`` was last touched; None when it does not exist."""
    try:
        touched = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - touched
