"""`exegpt bench TARGET`: benchmarks that print a table of ratios against a baseline run alongside.

Each target is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib

TARGETS: dict[str, tuple[str, str]] = {
    "engine": ("engine.bench", "our engine vs Hugging Face generate, prefill and decode tokens/s"),
    "parallel": ("engine.parallel.bench", "a model over a process group (TP, PP) vs one process"),
    "optimizer": ("services.bench_optimizer", "search vs exhaustive, ExeGPT vs static/continuous"),
    "mesh": ("services.bench_mesh", "mesh vs embedded server vs in-process engine"),
    "schedules": ("services.bench_schedules",
                  "ExeGPT's planned schedule vs static and continuous batching, measured on two workers"),
    "adapt": ("services.bench_adapt",
              "traffic switches from task S to T: the re-planning scheduler vs one that keeps its schedule"),
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark and print its table")
    targets = parser.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    for name, (module_name, help_text) in TARGETS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if module_name.startswith(exc.name or "\0"):
                continue  # not built in this checkout
            raise
        target = targets.add_parser(name, help=help_text)
        module.add_arguments(target)
        target.set_defaults(func=module.run)
