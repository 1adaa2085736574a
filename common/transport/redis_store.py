"""The store over Redis (redis-py asyncio)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.typing import EncodableT

RETRIES = 3  # per command, on a fresh connection each time
HEALTH_CHECK_S = 5.0  # a connection idle this long is pinged before use
SOCKET_TIMEOUT_S = 10.0  # no command of the store takes long; a silent peer is a dead one


def _ms(ttl_s: float | None) -> int | None:
    return None if ttl_s is None else _ttl_ms(ttl_s)


def _ttl_ms(ttl_s: float) -> int:
    return max(int(ttl_s * 1000), 1)


# KEYS: key, list_key. ARGV: value, ttl ms, item ("" for none), max_len.
_SET_ONCE_AND_RECORD = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
if ARGV[3] ~= '' then
  redis.call('LPUSH', KEYS[2], ARGV[3])
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
end
return 1
"""


# KEYS: counter. ARGV: most to take. Takes what is there, up to ARGV[1]; never below zero.
_TAKE = """
local have = tonumber(redis.call('GET', KEYS[1]) or '0')
local taken = math.min(tonumber(ARGV[1]), have)
if taken <= 0 then return 0 end
redis.call('DECRBY', KEYS[1], taken)
return taken
"""


# KEYS: lease. ARGV: owner, ttl ms. Take the lease if free, extend it if the owner holds it.
_ACQUIRE_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


# KEYS: lease. ARGV: owner. Delete the lease only if the owner holds it.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


# KEYS: key, lease. ARGV: value, owner. A fenced write: set only while the owner holds the lease.
_SET_WHILE_LEASED = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


class RedisStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._set_once_and_record = client.register_script(_SET_ONCE_AND_RECORD)
        self._take = client.register_script(_TAKE)
        self._acquire_lease = client.register_script(_ACQUIRE_LEASE)
        self._release_lease = client.register_script(_RELEASE_LEASE)
        self._set_while_leased = client.register_script(_SET_WHILE_LEASED)

    @classmethod
    async def connect(cls, url: str) -> RedisStore:
        """A client that survives Redis going away: a connection idle for a while is checked
        before use, a failed command is retried on a fresh connection with backoff, and no call
        waits on a dead peer longer than ``SOCKET_TIMEOUT_S``."""
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES)
        client = aioredis.Redis.from_url(
            url,
            decode_responses=False,
            retry=retry,
            health_check_interval=HEALTH_CHECK_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            socket_keepalive=True,
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError],
        )
        await client.ping()
        return cls(client)

    async def get(self, key: str) -> bytes | None:
        return cast(bytes | None, await self._redis.get(key))  # the client gives bytes (no decode_responses)

    async def get_many(self, *keys: str) -> list[bytes | None]:
        return cast(list[bytes | None], list(await self._redis.mget(keys))) if keys else []

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        await self._redis.set(key, value, px=_ms(ttl_s))

    async def set_if_absent(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        return bool(await self._redis.set(key, value, px=_ms(ttl_s), nx=True))

    async def set_once_and_record(
        self, key: str, value: bytes, *, ttl_s: float, list_key: str, item: bytes | None, max_len: int
    ) -> bool:
        args: list[EncodableT] = [value, _ttl_ms(ttl_s), b"" if item is None else item, max_len]
        return bool(await self._set_once_and_record(keys=[key, list_key], args=args))

    async def acquire_lease(self, key: str, owner: str, *, ttl_s: float) -> bool:
        return bool(await self._acquire_lease(keys=[key], args=[owner, _ttl_ms(ttl_s)]))

    async def release_lease(self, key: str, owner: str) -> bool:
        return bool(await self._release_lease(keys=[key], args=[owner]))

    async def set_while_leased(self, key: str, value: bytes, *, lease_key: str, owner: str) -> bool:
        return bool(await self._set_while_leased(keys=[key, lease_key], args=[value, owner]))

    async def delete(self, *keys: str) -> None:
        if keys:
            await self._redis.delete(*keys)

    async def hset(self, key: str, mapping: dict[str, str], *, ttl_s: float | None = None) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=_hash(mapping))
            if ttl_s is not None:
                pipe.pexpire(key, _ttl_ms(ttl_s))
            await pipe.execute()

    async def set_with_hash(
        self, key: str, value: bytes, hash_key: str, mapping: dict[str, str], *, ttl_s: float
    ) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(key, value, px=_ms(ttl_s))
            pipe.hset(hash_key, mapping=_hash(mapping))
            pipe.pexpire(hash_key, _ttl_ms(ttl_s))
            await pipe.execute()

    async def hgetall(self, key: str) -> dict[str, str]:
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(key))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def add(self, key: str, amount: int, *, ttl_s: float | None = None) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, amount)
            if ttl_s is not None:
                pipe.pexpire(key, _ttl_ms(ttl_s))
            total, *_ = await pipe.execute()
        return int(total)

    async def take(self, key: str, up_to: int) -> int:
        return int(await self._take(keys=[key], args=[up_to]))

    async def push_capped(self, key: str, value: bytes, *, max_len: int) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, value)
            pipe.ltrim(key, 0, max_len - 1)
            await pipe.execute()

    async def list_range(self, key: str, count: int) -> list[bytes]:
        return cast(list[bytes], await self._redis.lrange(key, 0, count - 1))

    async def count_prefix(self, prefix: str) -> int:
        return sum([1 async for _ in self._redis.scan_iter(match=prefix + "*", count=500)])

    async def keys_prefix(self, prefix: str) -> list[str]:
        return [
            key.decode() if isinstance(key, bytes) else key
            async for key in self._redis.scan_iter(match=prefix + "*", count=500)
        ]

    async def bytes_prefix(self, prefix: str) -> int:
        keys = [key async for key in self._redis.scan_iter(match=prefix + "*", count=500)]
        return sum([await self._redis.memory_usage(key) or 0 for key in keys])

    async def delete_prefix(self, prefix: str) -> int:
        doomed = [key async for key in self._redis.scan_iter(match=prefix + "*", count=500)]
        if doomed:
            await self._redis.delete(*doomed)
        return len(doomed)

    async def close(self) -> None:
        await self._redis.aclose()


def _hash(mapping: dict[str, str]) -> Mapping[EncodableT, EncodableT]:
    """A hash's fields as redis-py types them (its mapping is invariant in its key type)."""
    return cast(Mapping[EncodableT, EncodableT], mapping)
