"""`exegpt dlq list|replay|purge`: inspect, replay or empty a mesh's dead queue.

    exegpt dlq list --namespace exegpt --amqp-url amqp://guest:guest@127.0.0.1:5672/ --redis-url redis://127.0.0.1:6379/0
    exegpt dlq replay --id 3f2a9c... [--id ...]      (or --all)
    exegpt dlq purge

A message goes to the dead queue (`{namespace}.dead`) when it cannot be decoded, when its handling
fails at its last delivery attempt (`delivery_limit`, default 3), or when it was handed out more
than that many times (its consumers died holding it); its request has failed to its client. `list`
shows each one: its id, the queue it came from, the reason, the attempts it had, the request (or
job) id when it decodes, and how long ago it died. `replay` publishes it to that queue again as a
new message (its attempts start over): a replayed request runs again, but its client was already
told it failed. `purge` deletes them all. The dead queue keeps at most `dead_queue_max` messages
(default 10,000), dropping the oldest.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from common.cli import CliError
from services.cli import add_mesh_args, mesh_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dlq",
        help="list, replay or purge the dead queue (messages that could not be processed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    for name, text in (
        ("list", "show each dead message"),
        ("replay", "publish dead messages to their queues again"),
        ("purge", "delete every dead message"),
    ):
        a = actions.add_parser(name, help=text)
        add_mesh_args(a)
        if name == "replay":
            which = a.add_mutually_exclusive_group(required=True)
            which.add_argument(
                "--id",
                action="append",
                dest="ids",
                metavar="ID",
                help="a message id from `exegpt dlq list` (repeatable)",
            )
            which.add_argument("--all", action="store_true", help="every dead message")
        a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = mesh_config(args)
    if config.amqp_url is None:
        raise CliError("needs --amqp-url (or EXEGPT_AMQP_URL): `exegpt serve` keeps its dead queue in memory")
    try:
        lines = asyncio.run(
            dlq(config, args.action, None if getattr(args, "all", False) else set(getattr(args, "ids", None) or ()))
        )
    except OSError as exc:  # broker or Redis not answering
        raise CliError(f"cannot reach the broker or Redis: {exc}") from None
    for line in lines:
        print(line)
    return 0


async def dlq(config, action: str, ids: set[str] | None, hub=None) -> list[str]:
    """Run ``action`` (list, replay, purge) on the namespace's dead queue; the lines to print."""
    from common.names import Names
    from common.transport.connect import LocalHub, open_bus

    names = Names(config.namespace)
    hub = hub or LocalHub()
    bus = await open_bus(config, names, hub)
    try:
        lines = await act(bus, names, action, ids)
    finally:
        await bus.close()
    if action == "purge" and config.amqp_url is not None:  # an emptied dead queue from before its bound is replaced
        await (await open_bus(config, names, hub)).close()
    return lines


async def act(bus, names, action: str, ids: set[str] | None) -> list[str]:
    from common.transport.dead import DeadQueue

    dead = DeadQueue(bus, names)
    messages = await dead.take()
    if action == "list":
        await dead.give_back()
        return list_lines(messages)
    if action == "purge":
        return [f"purged {await dead.purge()} dead messages from {names.dead_queue}"]
    replayed, kept = await dead.replay(ids)
    lines = [f"replayed {m.id} to {m.queue} ({request_of(m.body) or 'no request id'})" for m in replayed]
    lines += [f"kept {m.id}: {why}" for m, why in kept]
    if ids:
        lines += [f"no dead message {i}" for i in sorted(ids - {m.id for m in messages})]
    lines.append(f"replayed {len(replayed)} of {len(messages)} dead messages")
    return lines


def request_of(body: bytes) -> str | None:
    """The request (or job) id of a message that decodes; None otherwise."""
    from common.messages import codec

    try:
        message = codec.decode(body)
    except Exception:
        return None
    return getattr(message, "request_id", None) or getattr(message, "job_id", None)


def list_lines(messages) -> list[str]:
    if not messages:
        return ["the dead queue is empty"]
    now = time.time()
    rows = [("ID", "QUEUE", "ATTEMPTS", "REQUEST", "AGE", "REASON")]
    for m in messages:
        age = m.age_s(now)
        rows.append(
            (
                m.id,
                m.queue or "?",
                "?" if m.attempts is None else str(m.attempts),
                request_of(m.body) or "-",
                "?" if age is None else _age(age),
                m.reason,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
