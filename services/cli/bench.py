"""`exegpt bench TARGET`: benchmarks that print a table of ratios against a baseline run alongside.

Each target is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``. The engine's
benchmarks (``engine.bench``, ``engine.parallel.bench``) sit below the command line and report a
bad argument as a ``ValueError``; the mesh's (``services.bench``) raise ``CliError`` themselves.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType

from common.cli import CliError

Run = Callable[[argparse.Namespace], int]


def targets() -> dict[str, tuple[ModuleType, str]]:
    """Each target's module and help line, in ``exegpt bench --help`` order."""
    import engine.bench
    import engine.parallel.bench
    from services.bench import adapt, faults, handoff, mesh, optimizer, schedules, serve

    return {
        "engine": (engine.bench, "our engine vs Hugging Face generate, prefill and decode tokens/s"),
        "parallel": (engine.parallel.bench, "a model over a process group (TP, PP) vs one process"),
        "optimizer": (optimizer, "search vs exhaustive, ExeGPT vs static/continuous"),
        "mesh": (mesh, "mesh vs embedded server vs in-process engine"),
        "serve": (serve, "one server's streams vs its own engine step and llama.cpp's server: tok/s, TTFT, ITL, RSS"),
        "schedules": (
            schedules,
            "ExeGPT's planned schedule vs static and continuous batching, measured on two workers",
        ),
        "adapt": (
            adapt,
            "traffic switches from task S to T (or --phases: five phases under a TTFT + TPOT SLO): the "
            "re-planning scheduler vs fixed schedules",
        ),
        "handoff": (handoff, "the KV hand-off between two worker processes: NIXL vs the Redis payload"),
        "faults": (
            faults,
            "a mesh under load meets one fault at a time: what its clients saw, and how fast it recovered",
        ),
    }


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark and print its table")
    choices = parser.add_subparsers(dest="target", metavar="TARGET")
    choices.required = True
    for name, (module, help_text) in targets().items():
        target = choices.add_parser(name, help=help_text)
        module.add_arguments(target)
        run = _value_errors_as_cli_errors(module.run) if module.__name__.startswith("engine.") else module.run
        target.set_defaults(func=run)


def _value_errors_as_cli_errors(run: Run) -> Run:
    """An engine benchmark's ``ValueError`` (a bad argument, a model it cannot load) as a one-line error."""

    def checked(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except ValueError as exc:
            raise CliError(str(exc)) from exc

    return checked
