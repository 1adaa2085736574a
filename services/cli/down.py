"""`exegpt down`: delete what a mesh leaves on its broker and Redis.

    exegpt down --namespace exegpt --amqp-url amqp://guest:guest@127.0.0.1:5672/ --redis-url redis://127.0.0.1:6379/0

The work queues (encode, hand-off, scheduler, dead letters, batch jobs) are durable and outlive
the processes of `exegpt up`, and so do the Redis keys (schedule, leases, statistics, results).
This deletes the namespace's durable queues, its exchanges and every ``{namespace}:`` key. Stop the
mesh first: queued requests and batch results are lost, and running services lose their queues.
"""

from __future__ import annotations

import argparse
import asyncio

from common.cli import CliError
from services.cli import add_mesh_args, mesh_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "down",
        help="delete a mesh's queues, exchanges and Redis keys (after `exegpt up`)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_mesh_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = mesh_config(args)
    if not config.distributed:
        raise CliError(
            "needs --amqp-url and --redis-url (or EXEGPT_AMQP_URL and EXEGPT_REDIS_URL); "
            "`exegpt serve` keeps nothing once it stops"
        )
    try:
        keys = asyncio.run(tear_down(config))
    except OSError as exc:  # broker or Redis not answering
        raise CliError(f"cannot reach the broker or Redis: {exc}") from None
    print(f"deleted namespace {config.namespace!r}: its queues and exchanges, and {keys} Redis keys")
    return 0


async def tear_down(config) -> int:
    """Delete the namespace's durable queues, exchanges and store keys; the number of keys deleted."""
    from common.names import Names
    from common.transport.connect import LocalHub, open_store, purge

    names = Names(config.namespace)
    store = await open_store(config)
    assert store is not None  # the configuration is distributed (checked by the command)
    try:
        keys = await store.count_prefix(names.key_prefix)
    finally:
        await store.close()
    await purge(config, names, LocalHub())  # the queues (the scheduler's too), the exchanges, the keys
    return keys
