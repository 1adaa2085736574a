"""Timing a worker group's communication on this machine: all-reduce and point-to-point send/recv
between two local processes over torch.distributed (gloo, TCP on loopback), by message size.

``measure()`` makes this process rank 0 and starts one helper process as rank 1
(``python -m engine.parallel.collectives --rank 1 ...``); both run the same schedule. For each
size (float32 tensors) a round times one all-reduce (sum) and one ping-pong (rank 0 sends, rank 1
sends the same size back; one message is half the round trip). After two warm-up rounds, rounds
repeat up to ``repeats`` times, ending early once ``budget_s`` is spent (at least ``MIN_REPEATS``
rounds); the median of each size and kind counts. The whole measurement takes about ``budget_s``
at most, plus the helper's start.

``fit_alpha_beta`` fits ``seconds = a + bytes * b`` to such times, minimising the relative error
(sizes span three orders of magnitude, so an absolute fit would ignore the small ones).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

KIB = 1024
SIZES = tuple(KIB * 4**i for i in range(7))  # 1 KiB, 4 KiB, ... 4 MiB
REPEATS = 100
MIN_REPEATS = 3
WARMUP_ROUNDS = 2
BUDGET_S = 8.0
TIMEOUT_S = 60.0  # joining the group, and any one collective


@dataclass(frozen=True)
class AlphaBeta:
    """``seconds = latency_s + bytes / bandwidth_Bps``."""

    latency_s: float
    bandwidth_Bps: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class SizeTimes:
    """Median seconds of one all-reduce over the two processes and of one send/recv message."""

    nbytes: int
    allreduce_s: float
    p2p_s: float
    samples: int  # timed rounds of each


@dataclass(frozen=True)
class CollectiveTimes:
    sizes: tuple[SizeTimes, ...]
    backend: str
    processes: int
    wall_s: float  # the whole measurement, the helper's start included

    def p2p_fit(self) -> AlphaBeta:
        return fit_alpha_beta([s.nbytes for s in self.sizes], [s.p2p_s for s in self.sizes])

    def allreduce_fit(self) -> AlphaBeta:
        """All-reduce time as ``fixed + bytes / rate`` (its own terms, not a link's)."""
        return fit_alpha_beta([s.nbytes for s in self.sizes], [s.allreduce_s for s in self.sizes])

    def describe(self) -> str:
        lo, hi = self.sizes[0].nbytes, self.sizes[-1].nbytes
        return (
            f"{self.backend} all-reduce and send/recv of CPU tensors between {self.processes} processes on "
            f"loopback, {len(self.sizes)} sizes {size_text(lo)}..{size_text(hi)}, median of up to "
            f"{max(s.samples for s in self.sizes)} rounds each"
        )


def size_text(nbytes: float) -> str:
    for unit, scale in (("MiB", KIB * KIB), ("KiB", KIB)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes:g} B"


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float]) -> AlphaBeta:
    """Least squares of ``a + n * b`` against ``seconds``, relative error (weights 1 / t^2), with
    ``a >= 0`` and ``b > 0``. Where the times do not grow with the size (noise over too narrow a
    range), ``a`` is their weighted mean and the bandwidth is taken as the largest size per ``a``.
    Needs two sizes or more."""
    if len(nbytes) != len(seconds) or len(set(nbytes)) < 2:
        raise ValueError("fitting latency and bandwidth needs times at two message sizes or more")
    w = [1.0 / max(t, 1e-12) ** 2 for t in seconds]
    sw = sum(w)
    sn = sum(wi * n for wi, n in zip(w, nbytes))
    snn = sum(wi * n * n for wi, n in zip(w, nbytes))
    st = sum(wi * t for wi, t in zip(w, seconds))
    snt = sum(wi * n * t for wi, n, t in zip(w, nbytes, seconds))
    det = sw * snn - sn * sn
    a = (snn * st - sn * snt) / det
    b = (sw * snt - sn * st) / det
    if a < 0:  # through the origin
        a, b = 0.0, snt / snn
    if b <= 0:  # no growth with size resolved: all latency, and the largest message's bytes within it
        a = st / sw
        b = a / max(nbytes)
    return AlphaBeta(a, 1.0 / b)


# ---- the measurement (both ranks) --------------------------------------------------------------


def _schedule(rank: int, sizes: Sequence[int], repeats: int, budget_s: float) -> list[SizeTimes]:
    """Both ranks run this in step; rank 0's clock counts. Rounds go over every size in turn, so a
    burst of load from elsewhere on the machine lands on all sizes alike rather than on one."""
    peer = 1 - rank
    xs = [torch.zeros(max(n // 4, 1), dtype=torch.float32) for n in sizes]  # zeros: sums never overflow
    ar: list[list[float]] = [[] for _ in sizes]
    p2p: list[list[float]] = [[] for _ in sizes]

    def allreduce(x: torch.Tensor) -> float:
        t = time.perf_counter()
        dist.all_reduce(x)
        return time.perf_counter() - t

    def pingpong(x: torch.Tensor) -> float:
        t = time.perf_counter()
        if rank == 0:
            dist.send(x, peer)
            dist.recv(x, peer)
        else:
            dist.recv(x, peer)
            dist.send(x, peer)
        return (time.perf_counter() - t) / 2

    go = torch.ones(1, dtype=torch.int64)
    start, done = time.perf_counter(), -WARMUP_ROUNDS
    while True:
        if rank == 0:  # rank 0 decides for both whether another round runs
            go[0] = int(done < min(MIN_REPEATS, repeats) or (done < repeats and time.perf_counter() - start < budget_s))
        dist.broadcast(go, src=0)
        if not go.item():
            break
        for i, x in enumerate(xs):
            a, b = allreduce(x), pingpong(x)
            if done >= 0:
                ar[i].append(a)
                p2p[i].append(b)
        done += 1
    return [SizeTimes(n, statistics.median(a), statistics.median(b), len(a)) for n, a, b in zip(sizes, ar, p2p)]


def _join(rank: int, port: int, timeout_s: float) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def measure(
    sizes: Sequence[int] = SIZES, repeats: int = REPEATS, budget_s: float = BUDGET_S, timeout_s: float = TIMEOUT_S
) -> CollectiveTimes:
    """All-reduce and send/recv times by size between this process (rank 0) and one helper.
    This process must not be in a torch.distributed group already; it leaves the group after."""
    from engine.parallel.procs import child_env, free_port, repo_root

    sizes = tuple(sorted(set(int(s) for s in sizes)))
    if len(sizes) < 2 or sizes[0] < 4:
        raise ValueError(f"need two message sizes or more, each >= 4 bytes, got {sizes!r}")
    if dist.is_initialized():
        raise RuntimeError("this process is already in a torch.distributed group; measure from another one")
    start = time.perf_counter()
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "engine.parallel.collectives",
        "--rank",
        "1",
        "--port",
        str(port),
        "--sizes",
        ",".join(map(str, sizes)),
        "--repeats",
        str(repeats),
        "--budget",
        str(budget_s),
        "--timeout",
        str(timeout_s),
        "--parent",
        str(os.getpid()),
    ]
    helper = subprocess.Popen(argv, cwd=repo_root(), env=child_env())
    try:
        _join(0, port, timeout_s)
        try:
            times = _schedule(0, sizes, repeats, budget_s)
        finally:
            dist.destroy_process_group()
        try:
            helper.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the collective measurement's helper process did not exit in {timeout_s:g} s") from None
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    if helper.returncode != 0:
        raise RuntimeError(f"the collective measurement's helper process exited with {helper.returncode}")
    return CollectiveTimes(tuple(times), "gloo", 2, time.perf_counter() - start)


def _helper(argv: list[str] | None = None) -> int:
    """Rank 1 of ``measure``."""
    p = argparse.ArgumentParser(description="rank 1 of a collective measurement (started by measure())")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sizes", required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--timeout", type=float, default=TIMEOUT_S)
    p.add_argument("--parent", type=int, default=None)
    args = p.parse_args(argv)
    if args.parent is not None:
        from engine.parallel.procs import die_with

        die_with(args.parent)
    torch.set_num_threads(1)
    _join(args.rank, args.port, args.timeout)
    try:
        _schedule(args.rank, [int(s) for s in args.sizes.split(",")], args.repeats, args.budget)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_helper())
