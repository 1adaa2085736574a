"""The `exegpt` command line.

Each command lives in its own module that exposes ``register(subparsers)``; the module adds its
parser and sets ``func`` to a callable taking the parsed namespace and returning an exit code.
Modules import heavy dependencies (torch, fastapi) inside their run functions, so that
``exegpt --help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType

from common.cli import CliError

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    """The flags that name a running mesh: its namespace, broker and store."""
    parser.add_argument("--namespace", help="the mesh's namespace (default: EXEGPT_NAMESPACE, else exegpt)")
    parser.add_argument("--amqp-url", help="RabbitMQ URL (default: EXEGPT_AMQP_URL)")
    parser.add_argument("--redis-url", help="Redis URL (default: EXEGPT_REDIS_URL)")


def mesh_config(args: argparse.Namespace):
    """The MeshConfig of ``add_mesh_args``'s flags (the environment fills the rest); a bad value is
    a one-line CliError."""
    from pydantic import ValidationError

    from common.config import MeshConfig

    overrides = {
        k: v
        for k, v in (("namespace", args.namespace), ("amqp_url", args.amqp_url), ("redis_url", args.redis_url))
        if v
    }
    try:
        return MeshConfig(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CliError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def command_modules() -> tuple[ModuleType, ...]:
    """The modules that register commands, in ``exegpt --help`` order. Imported here rather than at
    the top: they import this package's helpers (``add_mesh_args``)."""
    from loadgen import cli as loadgen_cli
    from services.cli import batch, bench, dlq, down, generate, keys, plan, profile, schedule, serve

    return (
        generate,  # exegpt generate
        bench,  # exegpt bench engine|...
        profile,  # exegpt profile
        plan,  # exegpt plan
        serve,  # exegpt serve | gateway | encoder | decoder | scheduler | up
        down,  # exegpt down
        dlq,  # exegpt dlq list|replay|purge
        batch,  # exegpt batch submit|status|...
        schedule,  # exegpt schedule show|set-bound|replan|pin
        keys,  # exegpt keys new|hash
        loadgen_cli,  # exegpt loadgen
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exegpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in command_modules():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed reader shows here, not at interpreter exit
        return code
    except CliError as exc:
        print(f"exegpt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `exegpt plan --json | head`: the reader closed stdout early; stop quietly, as other
        # command-line tools do. A broken pipe elsewhere (a socket) is a real error.
        if not _stdout_closed():
            raise
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _stdout_closed() -> bool:
    """True when stdout is a pipe or socket whose reader has gone away."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    try:
        import select

        poller = select.poll()
    except (ImportError, AttributeError):  # no poll(): trust the error
        return True
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _discard_stdout() -> None:
    """Point stdout at the null device, so that flushing what is still buffered at exit does not
    fail a second time (Python would print "Exception ignored ... BrokenPipeError")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
