"""Pick and open the adapters for one service from the config."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import MeshConfig
from common.names import Names
from common.transport.kv import KvTransport, LocalKv, StoreKv
from common.transport.memory import MemoryBroker, MemoryBus, MemoryStore
from common.transport.port import Bus, Store


@dataclass
class LocalHub:
    """The in-memory broker, store and KV objects that the services of one process share."""

    broker: MemoryBroker = field(default_factory=MemoryBroker)
    store: MemoryStore = field(default_factory=MemoryStore)
    kv: dict[str, LocalKv] = field(default_factory=dict)


@dataclass
class Transports:
    bus: Bus
    store: Store
    kv: KvTransport
    owns_store: bool

    async def close(self) -> None:
        await self.kv.close()
        await self.bus.close()
        if self.owns_store:
            await self.store.close()


async def open_bus(config: MeshConfig, names: Names, hub: LocalHub, store: Store | None = None) -> Bus:
    """The bus; over RabbitMQ its deliveries are counted in ``store`` (given: shared with the
    caller; else one opened for the bus from ``redis_url`` and closed with it; no Redis URL: a
    redelivery counts as attempt 2)."""
    if config.amqp_url is None:
        return MemoryBus(
            hub.broker,
            dead_queue=names.dead_queue,
            delivery_limit=config.delivery_limit,
            dead_queue_max=config.dead_queue_max,
        )
    from common.transport.rabbit import Attempts, RabbitBus

    owned = None
    if store is None:
        store = owned = await open_store(config)
    try:
        return await RabbitBus.connect(
            config.amqp_url,
            dead_exchange=names.dead_exchange,
            dead_queue=names.dead_queue,
            heartbeat_s=config.amqp_heartbeat_s or None,
            attempts=Attempts(store, names.attempts_prefix) if store is not None else None,
            delivery_limit=config.delivery_limit,
            dead_queue_max=config.dead_queue_max,
            owned_store=owned,
            queue_type=config.queue_type,
        )
    except BaseException:
        if owned is not None:
            await owned.close()
        raise


async def open_store(config: MeshConfig) -> Store | None:
    if config.redis_url is None:
        return None
    from common.transport.redis_store import RedisStore

    return await RedisStore.connect(config.redis_url)


def open_kv(config: MeshConfig, names: Names, store: Store) -> KvTransport:
    """The KV data plane across processes: NIXL unless the operator chose Redis (NixlUnavailable,
    with its one-line reason, where NIXL cannot load)."""
    if config.kv_transport == "redis":
        return StoreKv(store, names)
    from common.transport.nixl_kv import NixlKv

    return NixlKv(store, names, pool_bytes=config.kv_staging_mb << 20, read_timeout_s=config.kv_read_timeout_s)


async def open_transports(config: MeshConfig, names: Names, hub: LocalHub, *, kv: bool = False) -> Transports:
    """Real adapters where the config has URLs, the hub's shared in-memory ones otherwise. ``kv``:
    the process hands KV caches off (a worker), so it gets the configured data plane; others
    only drop hand-offs' records and get the store's."""
    store = await open_store(config)
    try:
        bus = await open_bus(config, names, hub, store or hub.store)
    except BaseException:
        if store is not None:
            await store.close()
        raise
    if store is not None:
        try:
            data_plane = open_kv(config, names, store) if kv else StoreKv(store, names)
        except BaseException:
            await bus.close()
            await store.close()
            raise
        return Transports(bus, store, data_plane, owns_store=True)
    shared = hub.kv.setdefault(names.namespace, LocalKv(hub.store, names))
    return Transports(bus, hub.store, shared, owns_store=False)


async def purge(config: MeshConfig, names: Names, hub: LocalHub) -> None:
    """Delete every shared queue, exchange and store key of the namespace (tests, benchmarks)."""
    bus = await open_bus(config, names, hub)
    await bus.delete(
        queues=[names.encode_queue, names.handoff_queue, names.dead_queue, names.jobs_queue, names.scheduler_queue],
        exchanges=[names.control_exchange, names.abort_exchange, names.status_exchange, names.dead_exchange],
    )
    await bus.close()
    store = await open_store(config)
    if store is None:
        await hub.store.delete_prefix(names.key_prefix)
    else:
        await store.delete_prefix(names.key_prefix)
        await store.close()
