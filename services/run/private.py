"""A RabbitMQ node and a Redis of their own: the private services a fault run, a fault test or the
namespace run (deploy/multihost) starts its mesh on, never the shared 127.0.0.1:5672 and :6379
ones (those may serve other meshes, and a fault must not reach them).

The node has its own name, ports, configuration, data and log folders (owned by the ``rabbitmq``
user it runs as) and its own user with a random password; Redis keeps an append-only file, so one
killed and started again comes back with its data. By default both listen on free loopback ports
of this machine; the namespace run gives a bind address, fixed ports and a command prefix
(``ip netns exec <ns>``) that starts every process, ``rabbitmqctl`` and probe inside a network
namespace, where the node also needs an epmd of its own (the machine's is out of reach there).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.parallel.procs import free_port
from services.run.children import ChildProcess

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
RABBIT_HOME = "/var/lib/rabbitmq"  # the rabbitmq user's home: its Erlang cookie serves server and ctl
EPMD_PORT = 4369


class SetupError(RuntimeError):
    """A private service (or what a test bed builds around it) could not be started."""


def available() -> str | None:
    """Why the private services cannot run here (None: they can): RabbitMQ's and Redis's
    programs installed, and root (the node runs as the ``rabbitmq`` user)."""
    missing = [p for p in ("rabbitmq-server", "rabbitmqctl") if not (RABBIT_BIN / p).exists()]
    missing += [p for p in ("redis-server", "redis-cli") if shutil.which(p) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install -y rabbitmq-server redis-server)"
    if os.geteuid() != 0:
        return "needs root (the private RabbitMQ node runs as the rabbitmq user)"
    return None


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SetupError(f"{what}: not within {timeout_s:g} s")
        time.sleep(interval_s)


class PrivateServices:
    """A RabbitMQ node and a Redis of their own, their files under one folder.

    ``host``: the address both listen on; ``amqp_port``, ``redis_port``: None picks a free one;
    ``prefix``: put before every command (``["ip", "netns", "exec", ns]``); ``own_epmd``: start an
    epmd for the node (inside a namespace); ``heartbeat_s``: the AMQP heartbeat the broker proposes
    (None: RabbitMQ's default); ``folder``: where their files go (None: a temp folder, removed by
    ``close``); ``name``: the start of the node's name; ``ready_timeout_s``: how long the node may
    take to start.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        amqp_port: int | None = None,
        redis_port: int | None = None,
        prefix: Sequence[str] = (),
        own_epmd: bool = False,
        heartbeat_s: int | None = None,
        folder: Path | None = None,
        name: str = "exegptfaults",
        ready_timeout_s: float = 120.0,
    ) -> None:
        self._own_folder = folder is None
        self.dir = Path(tempfile.mkdtemp(prefix="exegpt-faults-")) if folder is None else folder
        os.chmod(self.dir, 0o755)  # the rabbitmq user reaches its folder through this one
        self.host, self.prefix, self.own_epmd = host, list(prefix), own_epmd
        self.heartbeat_s, self.name, self.ready_timeout_s = heartbeat_s, name, ready_timeout_s
        self.node = self._node_name()
        self._free_amqp_port = amqp_port is None  # a port picked here may be taken meanwhile: pick again
        self.amqp_port = amqp_port or free_port()
        self.dist_port = free_port()
        self.redis_port = redis_port or free_port()
        self.password = secrets.token_hex(8)
        self.rabbit: ChildProcess | None = None
        self.redis: ChildProcess | None = None
        self.epmd: ChildProcess | None = None

    def _node_name(self) -> str:
        return f"{self.name}{secrets.token_hex(3)}@localhost"

    @property
    def amqp_url(self) -> str:
        return f"amqp://mesh:{self.password}@{self.host}:{self.amqp_port}/"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    @property
    def rabbit_log(self) -> Path:
        """The node's own log (connections opened and closed, missed heartbeats)."""
        return self.dir / "rabbit" / "log" / f"{self.node}.log"

    def start(self) -> None:
        self.start_redis()
        self.start_rabbit()

    # ---- where the services are: this machine, or the namespace the prefix enters
    def _run(
        self, cmd: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *cmd], capture_output=True, text=True, timeout=timeout_s, env=env)

    def _spawn(
        self, cmd: Sequence[str], label: str, *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> ChildProcess:
        return ChildProcess(
            [*self.prefix, *cmd],
            env=env or dict(os.environ),
            label=label,
            cwd=cwd or self.dir,
            stdin=subprocess.DEVNULL,
            log_path=self.dir / f"{label}.log",
        )

    def port_open(self, port: int, host: str | None = None) -> bool:
        """Something accepts connections on ``port`` (seen from where the services run)."""
        host = host or self.host
        if not self.prefix:
            with socket.socket() as sock:
                sock.settimeout(0.5)
                return sock.connect_ex((host, port)) == 0
        probe = ["timeout", "2", "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"]
        return self._run(probe, timeout_s=10).returncode == 0

    def _wait_listening(
        self, child: ChildProcess, port: int, what: str, timeout_s: float, host: str | None = None
    ) -> None:
        """Until ``child`` accepts connections on ``port``; SetupError with its output when it
        exits or the time is up first."""
        deadline = time.monotonic() + timeout_s
        while not self.port_open(port, host):
            if not child.running() or time.monotonic() > deadline:
                state = "still starting" if child.running() else f"exited {child.popen.returncode}"
                raise SetupError(f"{what} not listening on {port} ({state}); its output:\n{child.tail(15)}")
            time.sleep(0.2)

    def sockets_on(self, *ports: int) -> str:
        """What `ss` shows holding these local ports (for an error message)."""
        query = " or ".join(f"sport = :{p}" for p in ports)
        try:
            return self._run(["ss", "-tanp", query], timeout_s=10).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"(ss: {exc})"

    # ---- Redis: killed and started again on the same append-only file
    def start_redis(self) -> None:
        data = self.dir / "redis"
        data.mkdir(exist_ok=True)
        # protected mode refuses clients from other hosts when there is no password: kept on loopback
        protected = "yes" if self.host.startswith("127.") else "no"
        self.redis = self._spawn(
            [
                "redis-server",
                *("--bind", self.host, "--port", str(self.redis_port), "--dir", str(data)),
                *("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
                *("--protected-mode", protected, "--daemonize", "no"),
            ],
            "redis",
        )
        self._wait_listening(self.redis, self.redis_port, "redis-server", 20)

    def flush_redis(self) -> int:
        """FLUSHALL; the number of keys there were."""
        cli = ["redis-cli", "-h", self.host, "-p", str(self.redis_port)]
        keys = self._run([*cli, "DBSIZE"], timeout_s=10)
        keys.check_returncode()
        self._run([*cli, "FLUSHALL"], timeout_s=10).check_returncode()
        return int(keys.stdout)

    def kill_redis(self) -> None:
        if self.redis is not None:
            self.redis.kill()

    # ---- RabbitMQ: a node of its own (name, ports, configuration, data and log folders)
    def rabbit_env(self) -> dict[str, str]:
        d = self.dir / "rabbit"
        env = {
            **os.environ,
            "HOME": RABBIT_HOME,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),  # the system-wide one is not read
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),  # the system-wide one pins 5672
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
        }
        if self.own_epmd:  # its epmd and its distribution on the namespace's own loopback
            env["ERL_EPMD_ADDRESS"] = "127.0.0.1"
            env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = "-kernel inet_dist_use_interface {127,0,0,1}"
        return env

    def ctl(self, *args: str, timeout_s: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        ctl = ["runuser", "-u", "rabbitmq", "--", str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args]
        result = self._run(ctl, timeout_s=timeout_s, env=self.rabbit_env())
        if check and result.returncode != 0:
            raise SetupError(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip()[-400:]}")
        return result

    def start_rabbit(self) -> None:
        """A node of its own; one that exits while starting (its ports, picked free, taken by
        another process meanwhile) is started again, twice at most, on fresh ports and a fresh name."""
        if self.own_epmd and self.epmd is None:
            self.epmd = self._spawn(["epmd", "-address", "127.0.0.1"], "epmd")  # in the foreground: ours to stop
            self._wait_listening(self.epmd, EPMD_PORT, "epmd", 20, host="127.0.0.1")
        for attempt in range(3):
            try:
                self._start_rabbit()
                return
            except SetupError as exc:
                if attempt == 2 or not self._free_amqp_port or self.rabbit is None or self.rabbit.running():
                    raise  # still starting after the deadline, or on ports given to it: not a port race
                print(f"private services: {exc}; starting it again on other ports", file=sys.stderr, flush=True)
                shutil.rmtree(self.dir / "rabbit", ignore_errors=True)
                self.node = self._node_name()
                self.amqp_port, self.dist_port = free_port(), free_port()

    def _write_rabbit_files(self) -> Path:
        d = self.dir / "rabbit"
        for sub in ("mnesia", "log", "plugins-expand"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq-env.conf").write_text("# empty: this node's settings are in its environment\n")
        (d / "enabled_plugins").write_text("[].\n")
        conf = [
            f"listeners.tcp.1 = {self.host}:{self.amqp_port}",
            "loopback_users = none",
            "log.console = false",
            "log.file.level = info",
        ]
        if self.heartbeat_s is not None:
            conf.append(f"heartbeat = {self.heartbeat_s}")
        (d / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(d)], check=True)
        return d

    def _start_rabbit(self) -> None:
        d = self._write_rabbit_files()
        server = ["runuser", "-u", "rabbitmq", "--", str(RABBIT_BIN / "rabbitmq-server")]
        self.rabbit = self._spawn(server, "rabbit", env=self.rabbit_env(), cwd=d)
        deadline = time.monotonic() + self.ready_timeout_s
        while self.ctl("await_startup", "--timeout", "30", check=False, timeout_s=45).returncode != 0:
            if not self.rabbit.running() or time.monotonic() > deadline:
                state = "still starting" if self.rabbit.running() else f"exited {self.rabbit.popen.returncode}"
                raise SetupError(
                    f"RabbitMQ node {self.node} did not start ({state}; ports {self.amqp_port}, "
                    f"{self.dist_port}); its output:\n{self.rabbit.tail(30)}\nits log:\n{self._rabbit_log_tail()}"
                    f"\nsockets on those ports:\n{self.sockets_on(self.amqp_port, self.dist_port)}"
                )
            time.sleep(1)
        self.ctl("add_user", "mesh", self.password)
        self.ctl("set_permissions", "-p", "/", "mesh", ".*", ".*", ".*")

    def _rabbit_log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.rabbit_log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop_broker(self) -> None:
        """The broker goes away: every connection closed, its port refusing new ones."""
        self.ctl("stop_app")

    def start_broker(self) -> None:
        self.ctl("start_app")
        wait_until(lambda: self.port_open(self.amqp_port), 30, "RabbitMQ listening again")

    def queues(self, prefix: str) -> list[str]:
        out = self.ctl("list_queues", "name", "--no-table-headers", "--quiet").stdout
        return [q for q in out.split() if q.startswith(prefix)]

    def exchanges(self, prefix: str) -> list[str]:
        out = self.ctl("list_exchanges", "name", "--no-table-headers", "--quiet").stdout
        return [e for e in out.split() if e.startswith(prefix)]

    def depth(self, queue: str) -> int:
        out = self.ctl("list_queues", "name", "messages", "--no-table-headers", "--quiet").stdout
        counts = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
        return int(counts.get(queue, 0))

    def close(self) -> None:
        """The node stopped (killed if it does not stop in time), Redis and epmd killed, the
        folder removed if it was made here."""
        if self.rabbit is not None and self.rabbit.running():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ctl("stop", check=False, timeout_s=60)
            try:
                self.rabbit.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.rabbit.kill()
        self.kill_redis()
        if self.epmd is not None:
            self.epmd.kill()
        if self._own_folder:
            shutil.rmtree(self.dir, ignore_errors=True)
