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
        await self.bus.close()
        if self.owns_store:
            await self.store.close()


async def open_bus(config: MeshConfig, names: Names, hub: LocalHub) -> Bus:
    if config.amqp_url is None:
        return MemoryBus(hub.broker, dead_queue=names.dead_queue)
    from common.transport.rabbit import RabbitBus

    return await RabbitBus.connect(config.amqp_url, dead_exchange=names.dead_exchange,
                                   dead_queue=names.dead_queue, heartbeat_s=config.amqp_heartbeat_s or None)


async def open_store(config: MeshConfig) -> Store | None:
    if config.redis_url is None:
        return None
    from common.transport.redis_store import RedisStore

    return await RedisStore.connect(config.redis_url)


async def open_transports(config: MeshConfig, names: Names, hub: LocalHub) -> Transports:
    """Real adapters where the config has URLs, the hub's shared in-memory ones otherwise."""
    bus = await open_bus(config, names, hub)
    store = await open_store(config)
    if store is not None:
        return Transports(bus, store, StoreKv(store, names), owns_store=True)
    kv = hub.kv.setdefault(names.namespace, LocalKv(hub.store, names))
    return Transports(bus, hub.store, kv, owns_store=False)


async def purge(config: MeshConfig, names: Names, hub: LocalHub) -> None:
    """Delete every shared queue, exchange and store key of the namespace (tests, benchmarks)."""
    bus = await open_bus(config, names, hub)
    await bus.delete(queues=[names.encode_queue, names.handoff_queue, names.dead_queue, names.jobs_queue,
                             names.scheduler_queue],
                     exchanges=[names.control_exchange, names.abort_exchange, names.status_exchange,
                                names.dead_exchange])
    await bus.close()
    store = await open_store(config)
    if store is None:
        await hub.store.delete_prefix(names.key_prefix)
    else:
        await store.delete_prefix(names.key_prefix)
        await store.close()
