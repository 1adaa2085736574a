"""Starting the helper processes of a group on this host: where they run from, and tying their life
to the process that started them."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import signal
import socket
import sys


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _unheld(port: int) -> bool:
    """No socket holds ``port`` on any address (IPv4, and IPv6 where there is one)."""
    families = [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if socket.has_ipv6 else [])
    for family, anywhere in families:
        try:
            with socket.socket(family) as s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((anywhere, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue  # no IPv6 on this host
            return False
    return True


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A port for a child process to listen on, free on every address and, where the kernel's
    ephemeral range allows, outside it: a port inside that range, though free when picked, can
    become another connection's local port before the child binds it."""
    e_low, e_high = _ephemeral_range()
    if not (high < e_low or low > e_high):
        low, high = (1024, e_low - 1) if e_low - 1024 >= 1000 else (e_high + 1, 65535)
    rng = random.Random()
    for _ in range(500):
        port = rng.randint(low, high)
        if _unheld(port):
            return port
    with socket.socket() as s:  # nothing free outside the range: let the kernel pick one inside it
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
