"""Starting the helper processes of a group on this host: where they run from, and tying their life
to the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env() -> dict[str, str]:
    """This process's environment, with the repository importable (``python -m engine...``)."""
    extra = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": repo_root() + (os.pathsep + extra if extra else "")}


def die_with(parent: int) -> None:
    """Get SIGTERM when the parent exits (Linux), and stop now if it already has."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:
        sys.exit(1)
