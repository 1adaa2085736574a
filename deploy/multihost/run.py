#!/usr/bin/env python3
"""The mesh across several "hosts" made of network namespaces on this machine; load; cut one
worker host's link mid-load; restore it; report what happened.

    sudo python deploy/multihost/run.py [--keep] [--requests N]

Topology (all of it inside namespaces this script creates; the root namespace's network is not
touched):

    exg-mh-<sfx>-core : bridge br0 10.213.X.1/24, RabbitMQ (own node, own epmd), Redis,
                        exegpt scheduler, exegpt gateway (:8000), the load client, the monitor
    exg-mh-<sfx>-hostA: eth0 10.213.X.11/24 <-veth-> core:vA (port of br0); exegpt worker(s)
    exg-mh-<sfx>-hostB: eth0 10.213.X.12/24 <-veth-> core:vB (port of br0); exegpt worker(s)

The cut is ``ip -n core link set vA down`` (the bridge side: hostA keeps its address and routes,
its packets go nowhere, like a pulled cable at the switch); ``--cut host`` downs hostA's eth0
instead, ``--cut both`` both. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script: the test bed's own code comes from this checkout

from services.run.children import ChildFailed, ChildNotReady, ChildProcess, child_env, stop_all  # noqa: E402
from services.run.private import PrivateServices, SetupError  # noqa: E402

CLIENT = HERE / "client.py"
PREFIX = "exg-mh-"
BROKER_HEARTBEAT_S = 10  # `heartbeat = 10` in our node's rabbitmq.conf (what the broker proposes)
MODEL = "tiny-llama"
OnLine = Callable[[str], None]  # called with each line a process prints


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd: str, check: bool = True, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise SetupError(f"{' '.join(cmd)} -> {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def netns_names() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]


def indented(text: str) -> str:
    """A process's last lines, set off in a message."""
    return textwrap.indent(text.rstrip("\n"), "    ") or "    (no output)"


class JsonLines:
    """A client process's JSON lines, collected as it prints them (its ``on_line``)."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def __call__(self, line: str) -> None:
        try:
            self.items.append(json.loads(line))
        except json.JSONDecodeError:
            pass


# --------------------------------------------------------------------------------------------
# the test bed


class Bed:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sfx = secrets.token_hex(3)
        self.ns = {h: f"{PREFIX}{self.sfx}-{h}" for h in ("core", "hostA", "hostB")}
        self.created_ns: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.sfx}-"))
        os.chmod(self.tmp, 0o755)
        self.children: list[ChildProcess] = []
        self.lock = threading.Lock()
        self.net = ""
        self.addr: dict[str, str] = {}
        self.mesh_ns = f"mh{self.sfx}"
        self.services: PrivateServices | None = None
        self.supervisors: list[WorkerSupervisor] = []
        self.src = REPO
        self.code = ""

    def snapshot_code(self) -> None:
        """Freeze the product code this run executes: a copy of the working tree's Python packages.
        Processes start seconds to minutes apart; on a tree being edited they could otherwise run
        different code (seen here: a scheduler at message schema 4, workers started later at 5)."""
        head = sh("git", "-C", str(REPO), "rev-parse", "--short", "HEAD", check=False).stdout.strip()
        dirty = len(
            sh("git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", check=False).stdout.splitlines()
        )
        self.code = f"commit {head or '?'}" + (f" + {dirty} modified tracked files" if dirty else "")
        if self.args.no_snapshot:
            self.code += " (live tree, not snapshotted)"
            return
        self.src = self.tmp / "src"
        for pkg in ("common", "engine", "optimizer", "services", "loadgen"):
            if (REPO / pkg).is_dir():
                shutil.copytree(REPO / pkg, self.src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        self.code += f", snapshot {self.src}"

    # ---- network ---------------------------------------------------------------------------
    def pick_subnet(self) -> str:
        used = sh("ip", "-o", "addr").stdout + sh("ip", "route", "show", "table", "all").stdout
        for other in [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]:
            used += sh("ip", "-n", other, "-o", "addr", check=False).stdout
        free = [x for x in range(1, 255) if f"10.213.{x}." not in used]
        if not free:
            raise SetupError("no free 10.213.x.0/24 subnet")
        return f"10.213.{secrets.choice(free)}"

    def make_network(self) -> None:
        self.net = self.pick_subnet()
        self.addr = {"core": f"{self.net}.1", "hostA": f"{self.net}.11", "hostB": f"{self.net}.12"}
        for _, name in self.ns.items():
            sh("ip", "netns", "add", name)
            self.created_ns.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        core = self.ns["core"]
        sh("ip", "-n", core, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", core, "addr", "add", f"{self.addr['core']}/24", "dev", "br0")
        sh("ip", "-n", core, "link", "set", "br0", "up")
        for host, port in (("hostA", "vA"), ("hostB", "vB")):
            # both ends are born inside namespaces: nothing ever appears in the root namespace
            sh("ip", "-n", core, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", self.ns[host])
            sh("ip", "-n", core, "link", "set", port, "master", "br0")
            sh("ip", "-n", core, "link", "set", port, "up")
            sh("ip", "-n", self.ns[host], "addr", "add", f"{self.addr[host]}/24", "dev", "eth0")
            sh("ip", "-n", self.ns[host], "link", "set", "eth0", "up")
        for host in ("hostA", "hostB"):
            deadline = time.monotonic() + 20  # bridge ports take a moment to forward
            while not self.reachable(host, self.addr["core"]):
                if time.monotonic() > deadline:
                    raise SetupError(f"{host} cannot reach {self.addr['core']}")
                time.sleep(0.5)
        log(
            f"network {self.net}.0/24: core {self.addr['core']} (br0), hostA {self.addr['hostA']}, "
            f"hostB {self.addr['hostB']}; namespaces {', '.join(self.ns.values())}"
        )

    def reachable(self, host: str, addr: str) -> bool:
        """TCP to a closed port from inside ``host``: refused means the address answers (no ping here)."""
        probe = (
            "import socket,sys\ns=socket.socket();s.settimeout(1)\n"
            f"try:\n s.connect(({addr!r},9))\nexcept ConnectionRefusedError:\n sys.exit(0)\n"
            "except OSError:\n sys.exit(1)\n"
        )
        return sh("ip", "netns", "exec", self.ns[host], sys.executable, "-c", probe, check=False).returncode == 0

    def set_link(self, host: str, up: bool) -> None:
        state = "up" if up else "down"
        port = {"hostA": "vA", "hostB": "vB"}[host]
        if self.args.cut in ("bridge", "both"):
            sh("ip", "-n", self.ns["core"], "link", "set", port, state)
        if self.args.cut in ("host", "both"):
            sh("ip", "-n", self.ns[host], "link", "set", "eth0", state)

    # ---- processes ---------------------------------------------------------------------------
    def spawn(self, name: str, host: str, cmd: list[str], on_line: OnLine | None = None) -> ChildProcess:
        """``cmd`` inside ``host``'s namespace, on the code snapshot; its output also in logs/<name>.log."""
        logs = self.tmp / "logs"
        logs.mkdir(exist_ok=True)
        child = ChildProcess(
            ["ip", "netns", "exec", self.ns[host], *cmd],
            env=child_env({"EXG_MH_SRC": str(self.src)}, root=self.src),
            label=name,
            cwd=self.src,
            stdin=subprocess.DEVNULL,
            on_line=on_line,
            log_path=logs / f"{name}.log",
        )
        with self.lock:
            self.children.append(child)
        return child

    def wait_ready(self, child: ChildProcess, prefix: str) -> None:
        try:
            child.wait_line(prefix, self.args.ready_timeout)
        except ChildFailed as exc:
            raise SetupError(f"{exc}(log {child.log_path})") from None

    def start_services(self) -> None:
        """Redis and a RabbitMQ node of this run's own in core, on the bridge's address, with an
        epmd of their own (the root namespace's is out of reach)."""
        core = self.addr["core"]
        self.services = PrivateServices(
            host=core,
            amqp_port=5672,
            redis_port=6379,
            prefix=["ip", "netns", "exec", self.ns["core"]],
            own_epmd=True,
            heartbeat_s=BROKER_HEARTBEAT_S,
            folder=self.tmp,
            name=f"exgmh{self.sfx}",
            ready_timeout_s=self.args.ready_timeout,
        )
        self.services.start_redis()
        log(f"redis up on {core}:6379")
        self.services.start_rabbit()
        log(
            f"rabbitmq node {self.services.node} up on {core}:5672 (heartbeat = {BROKER_HEARTBEAT_S} "
            f"in its rabbitmq.conf), user mesh"
        )

    def amqp_url(self) -> str:
        assert self.services is not None
        url = self.services.amqp_url
        if self.args.client_heartbeat is not None:
            url += f"?heartbeat={self.args.client_heartbeat}"
        return url

    def redis_url(self) -> str:
        assert self.services is not None
        return self.services.redis_url

    def mesh_args(self) -> list[str]:
        return [
            "--model",
            MODEL,
            "--threads",
            "1",
            "--amqp-url",
            self.amqp_url(),
            "--redis-url",
            self.redis_url(),
            "--namespace",
            self.mesh_ns,
        ]

    def start_mesh(self) -> None:
        py = [sys.executable, "-m", "services.cli"]  # the `exegpt` console script's entry point
        self.scheduler = self.spawn("scheduler", "core", [*py, "scheduler", *self.mesh_args()])
        self.wait_ready(self.scheduler, "ready ")
        log("scheduler ready")
        for host in ("hostA", "hostB"):
            for k in range(self.args.workers_per_host):
                sup = WorkerSupervisor(self, host, k)
                self.supervisors.append(sup)
                sup.start()
        for sup in self.supervisors:
            sup.wait_first_ready(self.args.ready_timeout)
        self.gateway = self.spawn(
            "gateway",
            "core",
            [*py, "gateway", *self.mesh_args(), "--host", self.addr["core"], "--port", "8000", "--insecure"],
        )
        self.wait_ready(self.gateway, "ready gateway ")
        self.url = f"http://{self.addr['core']}:8000"
        log(f"gateway ready at {self.url}")

    def client(self, *args: str, name: str, on_line: OnLine | None = None) -> ChildProcess:
        return self.spawn(name, "core", [sys.executable, str(CLIENT), *args], on_line=on_line)

    # ---- clean-up ----------------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        """Kill everything, delete namespaces (their veths and the bridge go with them); return
        what could not be removed."""
        problems: list[str] = []
        for sup in self.supervisors:
            sup.stop_event.set()
        with self.lock:
            children = list(self.children)
        stop_all(children, timeout_s=3.0)  # workers, gateway, clients, scheduler; killed past 3 s
        if self.services is not None:
            try:
                self.services.close()  # the node stopped by rabbitmqctl (killed past 30 s), Redis, epmd
            except (OSError, subprocess.SubprocessError, SetupError) as exc:
                problems.append(f"private services: {exc}")
        for sup in self.supervisors:
            sup.join(10)
        problems += self.delete_namespaces()
        links = sh("ip", "-o", "link").stdout
        if re.search(r"\b(vA|vB|br0)\b", links) or f"{PREFIX}{self.sfx}" in links:
            problems.append("a link of ours is left in the root namespace")
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self.tmp.exists():
                problems.append(f"temp dir left: {self.tmp}")
        return problems

    def delete_namespaces(self) -> list[str]:
        problems = []
        for name in self.created_ns:
            # anything still running inside our namespaces is ours (e.g. a daemonised helper)
            pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            if pids:
                time.sleep(0.5)
            r = sh("ip", "netns", "del", name, check=False)
            if r.returncode != 0:
                problems.append(f"ip netns del {name}: {r.stderr.strip()}")
        left = [n for n in netns_names() if n.startswith(f"{PREFIX}{self.sfx}")]
        if left:
            problems.append(f"namespaces left: {left}")
        return problems


class WorkerSupervisor(threading.Thread):
    """Keeps one worker slot of a host alive: starts `exegpt worker`, and when it exits, restarts
    it after a backoff (2 s, doubling to 30 s; reset after 60 s of life). No restart limit: the
    product's `exegpt up` gives up after 3 restarts, which is the wrong policy for a host whose
    network may come back. Each incarnation gets its own worker id (<host>-w<k>-g<gen>), so a new
    one never collides with the exclusive control queue of an old connection the broker has not
    yet declared dead."""

    def __init__(self, bed: Bed, host: str, k: int) -> None:
        super().__init__(daemon=True, name=f"sup-{host}-{k}")
        self.bed, self.host, self.k = bed, host, k
        self.stop_event = threading.Event()
        self.gen = 0
        self.current: ChildProcess | None = None
        self.first_ready = threading.Event()
        self.first_error: str | None = None
        self.events: list[dict] = []  # starts, exits, readies (with wall times)

    def worker_id(self, gen: int) -> str:
        return f"{self.host}-w{self.k}-g{gen}"

    def run(self) -> None:
        backoff = 2.0
        while not self.stop_event.is_set():
            wid = self.worker_id(self.gen)
            proc = self.bed.spawn(
                f"worker-{wid}",
                self.host,
                [sys.executable, "-m", "services.cli", "worker", *self.bed.mesh_args(), "--worker-id", wid],
            )
            self.current = proc
            started = time.time()
            self.events.append({"ev": "start", "worker": wid, "t": started})
            self.watch_ready(proc, wid)
            rc = proc.popen.wait()  # the clean-up stops it too
            if self.stop_event.is_set():
                return
            proc.wait_output(5)
            self.events.append({"ev": "exit", "worker": wid, "t": time.time(), "rc": rc})
            log(
                f"supervisor: worker {wid} on {self.host} exited ({rc}); restarting in {backoff:.0f} s\n"
                f"{indented(proc.tail(8))}"
            )
            if not self.first_ready.is_set() and self.first_error is None:
                self.first_error = f"{wid} exited ({rc}) before ready:\n{indented(proc.tail(15))}"
            if time.time() - started > 60:
                backoff = 2.0
            if self.stop_event.wait(backoff):
                return
            backoff = min(backoff * 2, 30.0)
            self.gen += 1

    def watch_ready(self, proc: ChildProcess, wid: str) -> None:
        """Until the worker says it is ready (recorded) or exits."""
        while not self.stop_event.is_set():
            try:
                proc.wait_line("ready ", self.bed.args.ready_timeout)
            except ChildNotReady:
                continue  # slow: wait_first_ready reports it; it may still come
            except ChildFailed:
                return  # exited: restarted by run
            self.events.append({"ev": "ready", "worker": wid, "t": time.time()})
            self.first_ready.set()
            return

    def wait_first_ready(self, timeout_s: float) -> None:
        if not self.first_ready.wait(timeout_s):
            detail = self.first_error or (indented(self.current.tail(15)) if self.current else "")
            raise SetupError(f"worker {self.host}-{self.k} not ready within {timeout_s:.0f} s: {detail}")
        log(f"worker {self.worker_id(self.gen)} on {self.host} ready")


# --------------------------------------------------------------------------------------------
# the experiment


def host_of(worker: str | None) -> str:
    if not worker:
        return "?"
    return worker.split("-")[0]


def parse_rabbit_log(path: Path) -> list[dict]:
    """Connection closings the broker logged (missed heartbeats, resets), with unix times."""
    out = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if (
            "closing AMQP connection" not in line
            and "missed heartbeats" not in line
            and "client unexpectedly closed" not in line
        ):
            continue
        m = re.match(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?)([+-]\d\d:\d\d)?", line)
        t = None
        if m:
            try:
                stamp = m.group(1).replace(" ", "T") + (m.group(2) or "")
                t = datetime.fromisoformat(stamp).timestamp()
            except ValueError:
                t = None
        out.append({"t": t, "line": line.strip()[:300]})
    return out


def connection_timeouts(bed: Bed) -> list[tuple[str, str, str]]:
    assert bed.services is not None
    r = bed.services.ctl(
        "list_connections", "peer_host", "timeout", "user", "--no-table-headers", "--quiet", check=False, timeout_s=60
    )
    rows = []
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            rows.append((parts[0], parts[1], parts[2]))
    return rows


def run_load(bed: Bed, tag: str, n: int, cut_after: int | None) -> tuple[list[dict], float | None]:
    """``n`` requests through the load client; hostA's link cut once ``cut_after`` have completed.
    The client's records, and when the cut was (None: no cut)."""
    out = bed.tmp / f"results-{tag}.json"
    seen = JsonLines()
    proc = bed.client(
        "load",
        "--url",
        bed.url,
        "--n",
        str(n),
        "--concurrency",
        str(bed.args.concurrency),
        "--max-tokens",
        str(bed.args.max_tokens),
        "--deadline",
        str(bed.args.deadline),
        "--tag",
        tag,
        "--out",
        str(out),
        name=f"load-{tag}",
        on_line=seen,
    )
    t_cut = None
    limit = time.monotonic() + bed.args.deadline * (math.ceil(n / bed.args.concurrency) + 1) + 120
    while proc.running():
        if cut_after is not None and t_cut is None:
            ok = sum(1 for e in list(seen.items) if e.get("ev") == "end" and e.get("ok"))
            if ok >= cut_after:
                bed.set_link("hostA", up=False)
                t_cut = time.time()
                log(f"CUT hostA's link ({bed.args.cut} side) after {ok}/{n} completions")
        if time.monotonic() > limit:
            log(f"load client {tag} overran its bound; killing it")
            proc.stop(5)
            break
        time.sleep(0.1)
    proc.wait_output(10)
    if not out.exists():
        raise SetupError(f"load client {tag} wrote no results:\n{indented(proc.tail(15))}")
    records = json.loads(out.read_text())["records"]
    return records, t_cut


def lengths(bed: Bed) -> dict[str, list[dict]]:
    env = dict(os.environ, EXG_MH_SRC=str(bed.src))
    r = sh(
        "ip",
        "netns",
        "exec",
        bed.ns["core"],
        sys.executable,
        str(CLIENT),
        "lengths",
        "--redis",
        bed.redis_url(),
        "--namespace",
        bed.mesh_ns,
        check=False,
        timeout=60,
        env=env,
    )
    by_id: dict[str, list[dict]] = {}
    try:
        for s in json.loads(r.stdout):
            by_id.setdefault(s.get("request_id"), []).append(s)
    except json.JSONDecodeError:
        log(f"could not read length samples: {r.stderr[-300:]}")
    return by_id


def grep_logs(bed: Bed, pattern: str, names: tuple[str, ...] = ("worker-hostA",), limit: int = 12) -> list[str]:
    rx = re.compile(pattern, re.I)
    hits = []
    for path in sorted((bed.tmp / "logs").glob("*.log")):
        if not path.name.startswith(names):
            continue
        for line in path.read_text(errors="replace").splitlines():
            if rx.search(line):
                hits.append(f"{path.stem}: {line.strip()[:240]}")
    return hits[:limit] + ([f"... {len(hits) - limit} more"] if len(hits) > limit else [])


def host_health(bed: Bed, host: str) -> list[str]:
    """Each current worker of ``host``: its /health/ready (ops port, loopback of its namespace) and
    its TCP connections to the broker and to Redis as the host's kernel sees them."""
    out = []
    socks = sh("ip", "netns", "exec", bed.ns[host], "ss", "-tn", check=False).stdout
    estab = [line for line in socks.splitlines() if line.startswith("ESTAB")]
    amqp = sum(1 for line in estab if f"{bed.addr['core']}:5672" in line)
    redis = sum(1 for line in estab if f"{bed.addr['core']}:6379" in line)
    out.append(f"TCP connections from {host}: {amqp} to RabbitMQ, {redis} to Redis")
    for sup in bed.supervisors:
        if sup.host != host or sup.current is None:
            continue
        m = re.findall(r"/health/\* at (http://\S+)", "".join(sup.current.output))
        if not m:
            out.append(f"{sup.current.label}: no ops URL in its log")
            continue
        r = sh(
            "ip",
            "netns",
            "exec",
            bed.ns[host],
            sys.executable,
            str(CLIENT),
            "health",
            "--url",
            m[-1],
            check=False,
            timeout=30,
        )
        out.append(f"{sup.current.label} /health/ready: {r.stdout.strip() or r.stderr.strip()[-200:]}")
    return out


@dataclass
class Observers:
    """What listens in core while the experiment runs: the worker ids in the scheduler's
    allocation every second (``schedule``), every worker heartbeat on the status fanout
    (``heartbeats``)."""

    monitor: ChildProcess
    schedule: JsonLines
    status: ChildProcess
    heartbeats: JsonLines

    def stop(self) -> None:
        for child in (self.monitor, self.status):
            child.stop(5)
            child.wait_output(5)


@dataclass
class Run:
    """What the experiment measured, phase by phase (unix times)."""

    hb_values: list[str]  # the AMQP heartbeats the connections negotiated, at the start
    observers: Observers
    n: int = 0  # requests in phase 1
    recs: list[dict] = field(default_factory=list)  # phase 1's records
    t_load: float = 0.0
    t_load_end: float = 0.0
    t_cut: float | None = None
    t_restore: float = 0.0
    a_ids_gone_at: float | None = None  # hostA left the scheduler's allocation
    a_back_at: float | None = None  # hostA back in it
    health_after: list[str] = field(default_factory=list)
    after_recs: list[dict] = field(default_factory=list)  # phase 3's records
    by_id: dict[str, list[dict]] = field(default_factory=dict)  # length samples per request id
    conns_after: list[tuple[str, str, str]] = field(default_factory=list)


def start_observers(bed: Bed) -> Run:
    conns = connection_timeouts(bed)
    hb_values = sorted({c[1] for c in conns})
    log(f"AMQP connections on the broker (peer, negotiated heartbeat s, user): {conns}")
    schedule, heartbeats = JsonLines(), JsonLines()
    monitor = bed.client("monitor", "--url", bed.url, "--interval", "1", name="monitor", on_line=schedule)
    status = bed.client(
        "status", "--amqp", bed.amqp_url(), "--namespace", bed.mesh_ns, name="status", on_line=heartbeats
    )
    time.sleep(2)  # both observing before the load begins
    return Run(hb_values, Observers(monitor, schedule, status, heartbeats))


def load_with_cut(bed: Bed, run: Run) -> None:
    """Phase 1: the load; hostA's link cut once a third of it has completed."""
    args = bed.args
    run.n = n = args.requests
    cut_after = max(1, math.ceil(n / 3))
    log(
        f"phase 1: {n} requests, {args.concurrency} at a time, max_tokens {args.max_tokens}, "
        f"deadline {args.deadline:.0f} s; cut after {cut_after} completions"
    )
    run.t_load = time.time()
    run.recs, run.t_cut = run_load(bed, "main", n, cut_after)
    run.t_load_end = time.time()
    if run.t_cut is None:
        log("the cut never happened (too few completions)")


def restore_link(bed: Bed, run: Run) -> None:
    """Phase 2: the link back up (after ``--hold-cut``)."""
    args, t_cut = bed.args, run.t_cut
    if t_cut:
        lengths(bed)  # read while the link is still down: the samples go unused, the read's time is part of the cut
        if args.hold_cut > 0:
            remaining = t_cut + args.hold_cut - time.time()
            if remaining > 0:
                log(f"holding the cut {remaining:.0f} s more (--hold-cut {args.hold_cut:.0f})")
                time.sleep(remaining)
        bed.set_link("hostA", up=True)
    run.t_restore = time.time()
    log(f"RESTORED hostA's link ({run.t_restore - (t_cut or run.t_restore):.1f} s after the cut)")


def wait_rejoin(bed: Bed, run: Run) -> None:
    """Phase 2: until hostA is back in the scheduler's allocation (noting when it left it), then
    hostA's health."""
    args, t_cut, t_restore = bed.args, run.t_cut, run.t_restore
    deadline = time.time() + args.rejoin_timeout
    while time.time() < deadline:
        for e in list(run.observers.schedule.items):
            ws = e.get("workers")
            if ws is None:
                continue
            has_a = any(w.startswith("hostA-") for w in ws)
            if t_cut and e["t"] > t_cut and not has_a and run.a_ids_gone_at is None:
                run.a_ids_gone_at = e["t"]
            if e["t"] >= t_restore and has_a and run.a_back_at is None:
                run.a_back_at = e["t"]
        if run.a_back_at:
            break
        time.sleep(1)
    if run.a_back_at:
        log(f"hostA back in the scheduler's allocation {run.a_back_at - t_restore:.1f} s after the restore")
    else:
        log(f"hostA NOT back in the scheduler's allocation within {args.rejoin_timeout:.0f} s")
    time.sleep(2)  # let the new schedule version reach every worker

    run.health_after = host_health(bed, "hostA")
    for line in run.health_after:
        log(f"hostA after the restore: {line}")


def load_after_restore(bed: Bed, run: Run) -> None:
    """Phase 3: requests after the restore; then the length samples and connections, and the
    observers stopped."""
    log(f"phase 3: {bed.args.after} requests after the restore")
    run.after_recs, _ = run_load(bed, "after", bed.args.after, None)
    time.sleep(3)  # a worker settles (done marker + length sample, then ack) just after the answer went out
    run.by_id = lengths(bed)
    run.conns_after = connection_timeouts(bed)
    run.observers.stop()


def classify(rs: list[dict]) -> dict:
    ok = [r for r in rs if r["completed"] and r["status"] == 200]
    hung = [r for r in rs if r["hung"]]
    failed = [r for r in rs if not (r["completed"] and r["status"] == 200) and not r["hung"]]
    return {"ok": ok, "hung": hung, "failed": failed}


@dataclass
class Analysis:
    """What the records say: classified requests, the checks, the timing around the cut, who served."""

    main_c: dict
    after_c: dict
    dup_ids: list[str] = field(default_factory=list)
    multi_samples: list[str] = field(default_factory=list)
    mismatched: dict[str, int] = field(default_factory=dict)
    wrong_len: list[int] = field(default_factory=list)
    unsettled: list[dict] = field(default_factory=list)
    first_after: float | None = None
    longest: tuple[float, float, float] | None = None
    stuck: list[dict] = field(default_factory=list)
    base_lat: float = 1.0
    rabbit_events: list[dict] = field(default_factory=list)
    served_main: dict[str, int] = field(default_factory=dict)
    served_after: dict[str, int] = field(default_factory=dict)
    restarts: list[dict] = field(default_factory=list)


def analyse(bed: Bed, run: Run) -> Analysis:
    an = Analysis(classify(run.recs), classify(run.after_recs))
    check_answers(bed, run, an)
    time_the_cut(bed, run, an)
    count_served(run, an)
    an.restarts = [e for s in bed.supervisors for e in s.events if e["ev"] == "exit"]
    return an


def check_answers(bed: Bed, run: Run, an: Analysis) -> None:
    """Duplicates, texts, token counts, and answered requests no worker settled."""
    all_recs = run.recs + run.after_recs
    ids = [r["id"] for r in all_recs if r["id"]]
    an.dup_ids = sorted({i for i in ids if ids.count(i) > 1})
    an.multi_samples = sorted(i for i, s in run.by_id.items() if len(s) > 1)
    # greedy + ignore_eos: one prompt -> one text, whatever worker served it (replays included)
    texts: dict[str, set] = {}
    for r in all_recs:
        if r["completed"]:
            texts.setdefault(r["prompt"], set()).add(r["text"])
    an.mismatched = {p: len(t) for p, t in texts.items() if len(t) > 1}
    an.wrong_len = [r["i"] for r in all_recs if r["completed"] and r["tokens"] not in (None, bed.args.max_tokens)]
    # answered, yet no worker recorded it as finished (no done marker / length sample): its work
    # message was never acked, so the broker still counts it as held by some worker
    an.unsettled = [r for r in an.main_c["ok"] + an.after_c["ok"] if not run.by_id.get(r["id"] or "")]


def time_the_cut(bed: Bed, run: Run, an: Analysis) -> None:
    """The first completion after the cut, the longest stall, the requests it held up, what the
    broker logged."""
    t_cut = run.t_cut
    ends = sorted(r["t_end"] for r in an.main_c["ok"])
    an.first_after = next((t for t in ends if t_cut and t > t_cut), None)
    gaps = []
    if t_cut:
        seq = [t_cut] + [t for t in ends if t > t_cut]
        gaps = [(b - a, a, b) for a, b in zip(seq, seq[1:])]
    an.longest = max(gaps, default=None)
    crossing = [r for r in run.recs if t_cut and (r["t_end"] or 0) > t_cut]
    lat = sorted((r["t_end"] - r["t_start"]) for r in an.main_c["ok"] if not t_cut or r["t_end"] < t_cut)
    an.base_lat = lat[len(lat) // 2] if lat else 1.0
    an.stuck = [r for r in crossing if (r["t_end"] - r["t_start"]) > max(10.0, 10 * an.base_lat)]
    assert bed.services is not None
    an.rabbit_events = [e for e in parse_rabbit_log(bed.services.rabbit_log) if e["t"] and t_cut and e["t"] > t_cut - 1]


def count_served(run: Run, an: Analysis) -> None:
    """Which host served the answered requests (from their length samples)."""

    def served(r: dict) -> str:
        s = run.by_id.get(r["id"] or "", [])
        return s[0]["worker"] if s else ""

    for r in an.main_c["ok"]:
        h = host_of(served(r))
        period = "before cut" if (run.t_cut is None or r["t_end"] < run.t_cut) else "after cut"
        an.served_main[f"{h} {period}"] = an.served_main.get(f"{h} {period}", 0) + 1
    for r in an.after_c["ok"]:
        h = host_of(served(r))
        an.served_after[h] = an.served_after.get(h, 0) + 1


Rows = list[tuple[str, str]]


def summary_rows(bed: Bed, run: Run, an: Analysis) -> Rows:
    rows = setup_rows(bed, run, an)
    if run.t_cut:
        rows += cut_rows(run, an) + detection_rows(run, an)
    return rows + rejoin_rows(bed, run, an) + check_rows(an)


def setup_rows(bed: Bed, run: Run, an: Analysis) -> Rows:
    """The code, the network, the workers, the AMQP heartbeat, phase 1's requests."""
    args, t_cut, restarts = bed.args, run.t_cut, an.restarts
    rows: Rows = []
    add = rows.append
    add(("product code", bed.code))
    add(("namespaces", ", ".join(bed.ns.values())))
    add(("network", f"{bed.net}.0/24, cut = link down on the {args.cut} side of hostA"))
    add(
        (
            "workers",
            f"{args.workers_per_host} per host; supervisor restarts with backoff: {len(restarts)}"
            + (
                ""
                if not restarts
                else " ("
                + ", ".join(
                    f"{e['worker']} rc={e['rc']} at {'+%.0fs' % (e['t'] - t_cut) if t_cut else '?'}" for e in restarts
                )
                + ")"
            ),
        )
    )
    add(
        (
            "AMQP heartbeat",
            f"broker config {BROKER_HEARTBEAT_S} s; negotiated per connection (rabbitmqctl): "
            f"{', '.join(run.hb_values) or '?'} s at start, "
            f"{', '.join(sorted({c[1] for c in run.conns_after})) or '?'} s at the end",
        )
    )
    eff = [int(v) for v in run.hb_values if v.isdigit()]
    if eff:
        h = max(eff)
        add(
            (
                "detection implied",
                f"broker drops a silent client after {h}-{2 * h} s (1-2 heartbeat "
                f"intervals); aiormq client side after ({h}+1)*3 = {(h + 1) * 3} s "
                f"without a frame",
            )
        )
    main_c = an.main_c
    add(
        (
            "phase 1 requests",
            f"sent {len(run.recs)}, completed {len(main_c['ok'])}, failed {len(main_c['failed'])}, "
            f"hung {len(main_c['hung'])} (deadline {args.deadline:.0f} s)",
        )
    )
    t_load = run.t_load
    add(("phase 1 wall time", f"{run.t_load_end - t_load:.1f} s; cut at +{(t_cut or t_load) - t_load:.1f} s"))
    return rows


def cut_rows(run: Run, an: Analysis) -> Rows:
    """How completions went on after the cut: the first, the longest stall, the requests held up."""
    t_cut = run.t_cut
    assert t_cut is not None
    first_after, longest, stuck = an.first_after, an.longest, an.stuck
    rows: Rows = []
    add = rows.append
    add(("first completion after cut", f"+{first_after - t_cut:.1f} s" if first_after else "none"))
    if longest:
        add(
            (
                "longest stall after cut",
                f"{longest[0]:.1f} s (from +{longest[1] - t_cut:.1f} to +{longest[2] - t_cut:.1f} s)",
            )
        )
    if longest and longest[0] > 5:
        add(("completions resumed", f"+{longest[2] - t_cut:.1f} s after the cut (end of the longest stall)"))
    held_ok = [r for r in stuck if not r["hung"]]
    held_hung = [r for r in stuck if r["hung"]]
    add(
        (
            "requests held up by the cut",
            f"{len(stuck)} took > {max(10.0, 10 * an.base_lat):.0f} s (median "
            f"before the cut {an.base_lat:.2f} s): {len(held_hung)} hung (deadline), "
            f"{len(held_ok)} answered late",
        )
    )
    if held_hung:
        add(
            (
                "  hung ones",
                "started "
                + ", ".join(f"+{r['t_start'] - t_cut:.0f}s" for r in held_hung)
                + " after the cut; given up at the deadline",
            )
        )
    if held_ok:
        add(
            (
                "  late ones",
                "started/answered "
                + ", ".join(f"+{r['t_start'] - t_cut:.0f}/+{r['t_end'] - t_cut:.0f}s" for r in held_ok),
            )
        )
    last_done = max((r["t_end"] for r in an.main_c["ok"]), default=t_cut)
    add(("all phase-1 requests answered at", f"+{last_done - t_cut:.1f} s after the cut"))
    return rows


def detection_rows(run: Run, an: Analysis) -> Rows:
    """When the scheduler and the broker noticed the cut, and how long it lasted."""
    t_cut, a_ids_gone_at = run.t_cut, run.a_ids_gone_at
    assert t_cut is not None
    rows: Rows = []
    add = rows.append
    add(
        (
            "scheduler dropped hostA",
            f"+{a_ids_gone_at - t_cut:.1f} s after the cut" if a_ids_gone_at else "never (still in the allocation)",
        )
    )
    if an.rabbit_events:
        for e in an.rabbit_events[:4]:
            add(("broker log", f"+{e['t'] - t_cut:.1f} s: {e['line'][-160:]}"))
    else:
        add(("broker log", "no connection closed by the broker after the cut"))
    add(("link down for", f"{run.t_restore - t_cut:.1f} s"))
    return rows


def rejoin_rows(bed: Bed, run: Run, an: Analysis) -> Rows:
    """Who served phase 1, hostA's heartbeats and health around the restore, its rejoining, phase 3."""
    t_cut, t_restore, a_back_at, after_c = run.t_cut, run.t_restore, run.a_back_at, an.after_c
    rows: Rows = []
    add = rows.append
    add(("served, phase 1", ", ".join(f"{k}: {v}" for k, v in sorted(an.served_main.items())) or "?"))
    a_status = [e for e in run.observers.heartbeats.items if str(e.get("worker", "")).startswith("hostA-")]
    before = [e for e in a_status if t_cut and e["t"] <= t_restore]
    after = [e for e in a_status if e["t"] > t_restore]
    if t_cut:
        add(
            (
                "hostA status heartbeats",
                (
                    f"last before the restore at {before[-1]['t'] - t_cut:+.1f} s rel. cut"
                    if before
                    else "none before the restore"
                )
                + (
                    f"; after the restore: {len(after)}, first at +{after[0]['t'] - t_restore:.1f} s "
                    f"({after[0]['worker']}, {after[0]['state']})"
                    if after
                    else "; NONE after the restore"
                ),
            )
        )
    for line in run.health_after:
        add(("hostA after restore", line))
    add(
        (
            "hostA rejoined",
            f"yes, {a_back_at - t_restore:.1f} s after the restore"
            if a_back_at
            else f"NO (not in the allocation within {bed.args.rejoin_timeout:.0f} s)",
        )
    )
    add(
        (
            "phase 3 requests",
            f"sent {len(run.after_recs)}, completed {len(after_c['ok'])}, failed "
            f"{len(after_c['failed'])}, hung {len(after_c['hung'])}; served: "
            + (", ".join(f"{k}: {v}" for k, v in sorted(an.served_after.items())) or "?"),
        )
    )
    return rows


def check_rows(an: Analysis) -> Rows:
    """Settled, unique, the same text for the same prompt."""
    unsettled, dup_ids, mismatched, wrong_len = an.unsettled, an.dup_ids, an.mismatched, an.wrong_len
    return [
        (
            "answered, not settled",
            f"{len(unsettled)} (answered to the client, but no done marker / length "
            f"sample in Redis: the serving worker never finished settling it)"
            + ("" if not unsettled else ": " + ", ".join(f"{r['tag']}#{r['i']}" for r in unsettled)),
        ),
        (
            "duplicates",
            f"response ids repeated: {len(dup_ids)}; requests with >1 length sample: "
            f"{len(an.multi_samples)}; ids unique: {'yes' if not dup_ids else 'NO'}",
        ),
        (
            "text check",
            "every prompt gave one text (greedy, 32 forced tokens)"
            if not mismatched and not wrong_len
            else f"DIFFERENT texts for one prompt: {mismatched}; wrong token counts at {wrong_len}",
        ),
    ]


def print_summary(bed: Bed, run: Run, rows: Rows, errors: list[dict]) -> None:
    t_cut = run.t_cut
    print()
    print("=" * 100)
    print("SUMMARY")
    print("=" * 100)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if errors:
        print("\nfailed / hung requests:")
        for r in errors:
            print(
                f"  {r['tag']}#{r['i']} id={r['id']} status={r['status']} "
                f"after {((r['t_end'] or 0) - r['t_start']):.1f} s "
                f"(started {'+%.1fs' % (r['t_start'] - t_cut) if t_cut else ''} rel. cut): {r['error']}"
            )
    excerpts = grep_logs(bed, r"warn|error|exception|traceback|reconnect|closed|stuck|lost")
    if excerpts:
        print("\nhostA worker log excerpts (warnings/errors):")
        for line in excerpts:
            print("  " + line)
    print("=" * 100)


def verdict(bed: Bed, run: Run, an: Analysis, rows: Rows, errors: list[dict]) -> int:
    """What went wrong, if anything, into summary.json and the RESULT line; the exit status."""
    main_c = an.main_c
    verdicts = []
    if errors:
        verdicts.append(f"{len(errors)} request(s) failed or hung")
    if len(main_c["ok"]) + len(main_c["failed"]) + len(main_c["hung"]) != run.n:
        verdicts.append("requests missing from the results")
    if an.dup_ids or an.multi_samples:
        verdicts.append("duplicated answers")
    if an.mismatched or an.wrong_len:
        verdicts.append("text mismatch")
    if an.unsettled:
        verdicts.append(f"{len(an.unsettled)} answered request(s) never settled by their worker")
    if not run.a_back_at:
        verdicts.append("hostA did not rejoin the scheduler's allocation")
    if an.served_after.get("hostA", 0) == 0:
        verdicts.append("hostA served none of the requests after the restore")
    summary = {"ok": not verdicts, "problems": verdicts, "t_cut": run.t_cut, "t_restore": run.t_restore, "rows": rows}
    (bed.tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    if verdicts:
        print("RESULT: FAIL - " + "; ".join(verdicts))
        return 1
    print("RESULT: OK")
    return 0


def experiment(bed: Bed) -> int:
    """Load, the cut, the restore, more load; then the summary and the verdict (the exit status)."""
    run = start_observers(bed)
    load_with_cut(bed, run)
    restore_link(bed, run)
    wait_rejoin(bed, run)
    load_after_restore(bed, run)
    an = analyse(bed, run)
    rows = summary_rows(bed, run, an)
    errors = an.main_c["failed"] + an.main_c["hung"] + an.after_c["failed"] + an.after_c["hung"]
    print_summary(bed, run, rows, errors)
    return verdict(bed, run, an, rows, errors)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, results)")
    p.add_argument("--requests", type=int, default=60, help="requests in the load phase (default 60)")
    p.add_argument("--after", type=int, default=16, help="requests after the link returns (default 16)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--deadline", type=float, default=120.0, help="per-request deadline, s (default 120)")
    p.add_argument("--workers-per-host", type=int, default=1, choices=(1, 2))
    p.add_argument(
        "--cut",
        choices=("bridge", "host", "both"),
        default="bridge",
        help="which side of hostA's veth goes down (default bridge)",
    )
    p.add_argument(
        "--hold-cut", type=float, default=0.0, help="keep the link down at least this long after the cut (s)"
    )
    p.add_argument(
        "--client-heartbeat",
        type=int,
        default=None,
        help="append ?heartbeat=N to the AMQP URL the services get (default: none, the product's client default)",
    )
    p.add_argument("--rejoin-timeout", type=float, default=300.0)
    p.add_argument(
        "--no-snapshot", action="store_true", help="run the working tree itself, not a copy frozen at the start"
    )
    p.add_argument("--ready-timeout", type=float, default=180.0)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespaces)", file=sys.stderr)
        return 2
    stale = [n for n in netns_names() if n.startswith(PREFIX)]
    if stale:
        log(f"note: namespaces of another (or an earlier, killed) run exist and are left alone: {stale}")

    bed = Bed(args)
    log(f"run {bed.sfx}: temp dir {bed.tmp}")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    rc = 2
    try:
        bed.snapshot_code()
        log(f"product code: {bed.code}")
        # model files once, before several processes race to write them
        sh(
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(bed.src)!r}); import engine; "
            f"engine.load_engine({MODEL!r}, device='cpu')",
            timeout=300,
        )
        bed.make_network()
        bed.start_services()
        bed.start_mesh()
        rc = experiment(bed)
    except SetupError as exc:
        log(f"SETUP FAILED: {exc}")
        rc = 2
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); cleaning up")
        rc = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if args.keep:
            log(f"logs kept in {bed.tmp}")
        problems = bed.cleanup()
        if problems:
            log("CLEAN-UP PROBLEMS: " + "; ".join(problems))
            rc = rc or 3
        else:
            log("clean-up done: processes killed, namespaces deleted" + ("" if args.keep else ", temp dir removed"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
