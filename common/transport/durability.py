"""Whether the Redis that holds batch files, batches and results keeps them across a restart.

``deploy/ensure-services.sh`` starts Redis with an append-only file (``appendonly yes``,
``appendfsync everysec``): at most about one second of writes is lost on a crash. A Redis started
elsewhere may keep nothing; the gateway then logs one warning at start. The check asks
``CONFIG GET`` and gives up quietly where the server refuses it (managed Redis, renamed commands).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0


async def persistence_risk(client: Any) -> str | None:
    """Why data in this Redis would not survive a restart, or None (persistent, or unknown).

    ``client``: a ``redis.asyncio.Redis``. Neither the append-only file nor any RDB save point:
    a restart loses everything. Any error (CONFIG forbidden or renamed, a proxy that lacks it)
    counts as unknown."""
    try:
        appendonly = await client.config_get("appendonly")
        save = await client.config_get("save")
    except Exception as exc:  # noqa: BLE001 - the check is advice, never a reason to fail
        log.debug("cannot read the Redis persistence settings: %s", exc)
        return None
    aof = str(_value(appendonly, "appendonly")).strip().lower()
    points = str(_value(save, "save")).strip()
    if aof in ("", "none"):
        return None  # the server did not say: unknown
    if aof == "no" and not points:
        return ("Redis keeps no data across a restart (appendonly no, no save points): batch files, "
                "batches and results are lost if it restarts; start it with `--appendonly yes "
                "--appendfsync everysec --dir <data dir>` (deploy/ensure-services.sh does)")
    return None


def _value(reply: Any, name: str) -> Any:
    if isinstance(reply, dict):
        value = reply.get(name, reply.get(name.encode(), None))
        return value.decode() if isinstance(value, bytes) else value
    return None


async def warn_if_not_durable(redis_url: str) -> str | None:
    """Log one warning when the Redis at ``redis_url`` persists nothing; the warning, or None."""
    try:
        from redis import asyncio as aioredis
    except ImportError:  # pragma: no cover - the Redis store needs it anyway
        return None
    client = aioredis.from_url(redis_url, socket_timeout=CHECK_TIMEOUT_S,
                               socket_connect_timeout=CHECK_TIMEOUT_S)
    try:
        risk = await asyncio.wait_for(persistence_risk(client), CHECK_TIMEOUT_S * 2)
    except Exception as exc:  # noqa: BLE001 - includes the timeout
        log.debug("cannot check the Redis persistence settings: %s", exc)
        risk = None
    finally:
        await client.aclose()
    if risk is not None:
        log.warning("batch data: %s", risk)
    return risk
