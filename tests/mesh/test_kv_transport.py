"""The KV data plane's port on both adapters across processes' boundaries (real Redis): NIXL, where
the decoder reads the encoder's registered memory, and the Redis payload the operator may choose.

Two adapters in one test stand for two worker processes: each NIXL adapter runs its own agent,
and every byte between them goes through NIXL (UCX), never through the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from common.config import MeshConfig
from common.messages import codec
from common.messages.handoff import KvBlocks, KvReady
from common.messages.work import EncodeWork, Sampling
from common.names import Names
from common.transport.connect import LocalHub, open_kv, open_transports, purge
from common.transport.kv import KvPayload, StoreKv
from common.transport.nixl_kv import NixlKv, NixlUnavailable, StagingFull, StagingPool
from common.transport.redis_store import RedisStore
from engine.api import KVHandoff, SamplingParams
from services.hosting.handoffs import kv_payload
from tests.brokers import REDIS_URL, need, nixl_loads, require_broker

pytestmark = pytest.mark.broker
TIMEOUT_S = 10.0
KV_BYTES = 4 << 20  # a 90-token SmolLM2 prompt's KV cache in float32


def handoff(request_id: str, nbytes: int = KV_BYTES, seed: int = 0) -> KvPayload:
    """An engine's hand-off as a worker gives it to the data plane."""
    kv = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    return kv_payload(engine_side(request_id, kv))


def engine_side(request_id: str, kv: bytes) -> KVHandoff:
    return KVHandoff(
        request_id,
        "tiny",
        SamplingParams(max_tokens=8),
        (1, 2, 3),
        (4,),
        "x",
        b"\x01\x02",
        "float32",
        (1, 2, 1, len(kv) // 16, 2),
        "llama:L,2,Hkv,T,D",
        kv,
    )


@pytest.fixture
async def store():
    require_broker()
    store = await RedisStore.connect(REDIS_URL)
    yield store
    await store.close()


@pytest.fixture(params=["nixl", "redis"])
async def pair(request, store, namespace):
    """(encoder's adapter, decoder's adapter, names) of one transport, as two processes use it."""
    names = Names(namespace)
    if request.param == "nixl":
        need(nixl_loads(), "NIXL (nixl-cu12) cannot load: pip install nixl-cu12")
        encoder = NixlKv(store, names, pool_bytes=16 << 20, read_timeout_s=TIMEOUT_S, agent_name=f"{namespace}-e")
        decoder = NixlKv(store, names, pool_bytes=1 << 20, read_timeout_s=TIMEOUT_S, agent_name=f"{namespace}-d")
    else:
        encoder = decoder = StoreKv(store, names)
    yield encoder, decoder, names
    await encoder.close()
    await decoder.close()
    await store.delete_prefix(names.key_prefix)


async def until(predicate, what: str) -> None:
    """Bounded polling of state that has no event (an encoder's staging pool)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_handoff_read_is_the_one_put(pair):
    encoder, decoder, _ = pair
    sent = handoff("r1")
    ref = await encoder.put(sent, producer="enc", ttl_s=30)
    got = await decoder.get(ref)
    assert got is not None
    assert bytes(got.kv) == sent.kv
    assert dataclasses.replace(got, kv=b"") == dataclasses.replace(sent, kv=b"")


async def test_a_dropped_handoff_is_gone(pair):
    encoder, decoder, _ = pair
    ref = await encoder.put(handoff("r2"), producer="enc", ttl_s=30)
    await decoder.drop(ref)
    assert await decoder.get(ref) is None


async def test_an_expired_lease_leaves_nothing_to_read(pair):
    encoder, decoder, _ = pair
    ref = await encoder.put(handoff("r3", 64 << 10), producer="enc", ttl_s=0.3)

    async def gone() -> bool:
        return await decoder.get(ref) is None

    await until(gone, "the lease to end")


async def test_nixl_keeps_kv_bytes_out_of_redis(pair, store):
    encoder, decoder, names = pair
    if not isinstance(encoder, NixlKv):
        pytest.skip("the Redis transport keeps the payload in Redis by design")
    refs = [await encoder.put(handoff(f"b{i}", KV_BYTES, seed=i), producer="enc", ttl_s=30) for i in range(3)]
    assert await store.count_prefix(names.key_prefix) == 4  # three descriptors, the encoder's agent
    assert 0 < await store.bytes_prefix(names.key_prefix) < 32 << 10  # with 12 MiB of KV staged
    for ref in refs:
        blocks = codec.decode(await store.get(ref), KvBlocks)
        assert (blocks.nbytes, blocks.dtype, blocks.agent) == (KV_BYTES, "float32", encoder.agent_name)
    assert [bytes((await decoder.get(ref)).kv) for ref in refs] == [handoff(f"b{i}", seed=i).kv for i in range(3)]
    assert [await store.get(ref) for ref in refs] == [None] * 3  # read: the descriptors are deleted


async def test_a_worker_reads_a_handoff_it_staged_itself(pair, store):
    """Its role changed from encoder to decoder with its own hand-offs still queued (NIXL has no
    transfer from an agent to itself: the block is copied out of the pool and freed)."""
    encoder, _, _ = pair
    ref = await encoder.put(handoff("own", 1 << 20), producer="enc", ttl_s=30)
    got = await encoder.get(ref)
    assert got is not None and bytes(got.kv) == handoff("own", 1 << 20).kv
    if isinstance(encoder, NixlKv):
        assert encoder.staged_bytes == 0 and await store.get(ref) is None


async def test_an_agent_publishes_its_metadata_when_it_starts_whatever_the_clock(pair, store, monkeypatch):
    """The monotonic clock starts near zero on a freshly booted host."""
    import types

    import common.transport.nixl_kv as nixl_kv

    encoder, _, names = pair
    if not isinstance(encoder, NixlKv):
        pytest.skip("the Redis transport runs no agent")
    monkeypatch.setattr(nixl_kv, "time", types.SimpleNamespace(monotonic=lambda: 1.0, time=time.time, sleep=time.sleep))
    await encoder.start()
    assert await store.get(names.kv_agent(encoder.agent_name))


async def test_nixl_encoder_frees_a_block_on_release_and_on_lease_expiry(pair):
    encoder, decoder, _ = pair
    if not isinstance(encoder, NixlKv):
        pytest.skip("the Redis transport stages nothing in the encoder")
    read = await encoder.put(handoff("read", 1 << 20), producer="enc", ttl_s=30)
    await encoder.put(handoff("unread", 1 << 20), producer="enc", ttl_s=0.3)
    assert encoder.staged_bytes == 2 << 20
    assert (await decoder.get(read)) is not None

    async def freed() -> bool:
        return encoder.staged_bytes == 0

    await until(freed, "the released and the expired blocks to be freed")


async def test_nixl_handoff_from_a_process_that_is_gone_is_none(pair):
    encoder, decoder, _ = pair
    if not isinstance(encoder, NixlKv):
        pytest.skip("a Redis payload outlives its encoder")
    ref = await encoder.put(handoff("orphan", 64 << 10), producer="enc", ttl_s=30)
    await encoder.close()  # its agent's metadata leaves the store with it
    assert await decoder.get(ref) is None


STAGE_AND_WAIT = """
import asyncio, sys
from common.names import Names
from common.transport.nixl_kv import NixlKv
from common.transport.redis_store import RedisStore
from tests.mesh.test_kv_transport import handoff

async def main(namespace, url):
    kv = NixlKv(await RedisStore.connect(url), Names(namespace), pool_bytes=4 << 20, read_timeout_s=10)
    for i in range(2):
        print("ref", await kv.put(handoff(f"k{i}", 1 << 20, seed=i), producer="enc", ttl_s=60), flush=True)
    await asyncio.Event().wait()  # until killed

asyncio.run(main(*sys.argv[1:]))
"""


async def test_nixl_handoff_from_a_killed_process_is_none_though_its_agent_is_still_listed(store, namespace):
    """A process killed outright leaves its agent's metadata in the store until its TTL; a decoder
    that read from it before holds a connection to it. Neither turns into failing reads: the
    hand-off is gone (the request is encoded again)."""
    import sys

    from services.run.children import ChildProcess, child_env

    need(nixl_loads(), "NIXL (nixl-cu12) cannot load: pip install nixl-cu12")
    names = Names(namespace)
    stage = [sys.executable, "-c", STAGE_AND_WAIT, namespace, REDIS_URL]
    child = ChildProcess(stage, env=child_env({}), label="stager")
    readers = [NixlKv(store, names, pool_bytes=2 << 20, read_timeout_s=TIMEOUT_S) for _ in range(2)]
    try:
        # NIXL's own log lines come on stdout too
        refs = [(await asyncio.to_thread(child.wait_line, "ref ", TIMEOUT_S)).split()[1] for _ in range(2)]
        earlier = await readers[0].get(refs[0])
        assert earlier is not None and bytes(earlier.kv) == handoff("k0", 1 << 20, seed=0).kv
        await asyncio.to_thread(child.kill)  # outright: SIGKILL
        agent = codec.decode(await store.get(refs[1]), KvBlocks).agent
        assert await store.get(names.kv_agent(agent)) is not None
        assert await asyncio.wait_for(readers[0].get(refs[1]), TIMEOUT_S) is None  # its connection is dead
        assert await asyncio.wait_for(readers[1].get(refs[1]), TIMEOUT_S) is None  # nothing answers
    finally:
        child.kill()
        for reader in readers:
            await reader.close()
        await store.delete_prefix(names.key_prefix)


async def test_nixl_a_kv_cache_exported_into_a_staging_block_is_staged_in_it(pair, store):
    """The engine's export is the only copy on the encoder: ``put`` stages that very block."""
    encoder, decoder, _ = pair
    if not isinstance(encoder, NixlKv):
        assert encoder.export_buffer(1 << 20) is None  # the payload is serialised anyway
        return
    sent = handoff("exported", 1 << 20)
    await encoder.start()
    buffer = encoder.export_buffer(len(sent.kv))
    buffer[:] = np.frombuffer(sent.kv, dtype=np.uint8)  # what the engine's export does
    ref = await encoder.put(dataclasses.replace(sent, kv=buffer), producer="enc", ttl_s=30)
    blocks = codec.decode(await store.get(ref), KvBlocks)
    assert encoder.staged_bytes == 1 << 20 and blocks.address == buffer.ctypes.data
    dropped = encoder.export_buffer(4096)
    assert encoder.staged_bytes == (1 << 20) + 4096
    del dropped  # exported, never put (the request went elsewhere): its block returns
    assert encoder.staged_bytes == 1 << 20
    assert bytes((await decoder.get(ref)).kv) == sent.kv

    async def freed() -> bool:
        return encoder.staged_bytes == 0

    await until(freed, "the read block to be freed")


async def test_nixl_staging_pool_is_bounded(pair):
    encoder, decoder, _ = pair
    if not isinstance(encoder, NixlKv):
        pytest.skip("the Redis transport has no staging pool")
    with pytest.raises(StagingFull):
        await encoder.put(handoff("huge", 32 << 20), producer="enc", ttl_s=30)
    refs = [await encoder.put(handoff(f"fill{i}", 5 << 20), producer="enc", ttl_s=30) for i in range(3)]
    with pytest.raises(StagingFull):  # full for longer than its lease: refused
        await encoder.put(handoff("refused", 5 << 20), producer="enc", ttl_s=0.2)
    waiting = asyncio.create_task(encoder.put(handoff("waits", 5 << 20), producer="enc", ttl_s=30))
    assert await decoder.get(refs[0]) is not None  # a read releases a block: the waiting hand-off gets it
    await asyncio.wait_for(waiting, TIMEOUT_S)
    assert encoder.staged_bytes == 3 * (5 << 20)


async def test_nixl_reads_land_in_the_inbox_until_the_handoff_is_dropped(pair):
    encoder, decoder, _ = pair
    if not isinstance(encoder, NixlKv):
        pytest.skip("the Redis transport has no inbox")
    got = await decoder.get(await encoder.put(handoff("in", 512 << 10), producer="enc", ttl_s=30))
    assert decoder.inbox_bytes == 512 << 10 and bytes(got.kv) == handoff("in", 512 << 10).kv
    over = await decoder.get(await encoder.put(handoff("over", 1 << 20, seed=1), producer="enc", ttl_s=30))
    assert decoder.inbox_bytes == 512 << 10  # no room left: read into memory registered for it
    assert bytes(over.kv) == handoff("over", 1 << 20, seed=1).kv
    del got  # imported and dropped: its block goes back
    assert decoder.inbox_bytes == 0


def test_staging_pool_allocates_aligned_blocks_and_coalesces_freed_ones():
    pool = StagingPool(16 << 10)
    a, b, c = pool.allocate(1), pool.allocate(5000), pool.allocate(4096)
    assert (a, b, c) == (0, 4096, 12288) and pool.allocate(1) is None
    pool.free(a)
    pool.free(b)
    assert pool.allocate(12288) == 0 and pool.used_bytes == 16 << 10


async def test_a_worker_with_nixl_chosen_where_it_cannot_load_refuses(store, namespace, monkeypatch):
    import common.transport.nixl_kv as nixl_kv

    def missing():
        raise NixlUnavailable("NIXL cannot load (ImportError: no nixl_cu12)")

    monkeypatch.setattr(nixl_kv, "load_nixl", missing)
    names = Names(namespace)
    with pytest.raises(NixlUnavailable):
        open_kv(MeshConfig(namespace=namespace, kv_transport="nixl"), names, store)
    assert isinstance(open_kv(MeshConfig(namespace=namespace, kv_transport="redis"), names, store), StoreKv)


async def test_kv_ready_carries_the_request_to_encode_again():
    work = EncodeWork("r", "tiny", (1, 2), Sampling(max_tokens=4), "q", 1.0, True, (7,), "x")
    ready = KvReady("r", "enc", "q", "ns:kvmeta:r", 2, 1, 1.0, True, work)
    assert codec.decode(codec.encode(ready), KvReady) == ready


async def test_a_worker_process_gets_the_configured_data_plane(namespace):
    from tests.brokers import AMQP_URL

    need(nixl_loads(), "NIXL (nixl-cu12) cannot load")
    config = MeshConfig(namespace=namespace, amqp_url=AMQP_URL, redis_url=REDIS_URL)  # the default: NIXL
    worker = await open_transports(config, Names(namespace), LocalHub(), kv=True)
    gateway = await open_transports(config, Names(namespace), LocalHub())
    try:
        assert isinstance(worker.kv, NixlKv) and isinstance(gateway.kv, StoreKv)
    finally:
        await worker.close()
        await gateway.close()


def test_a_worker_process_without_nixl_says_so_in_one_line_and_does_not_start(tmp_path, namespace):
    """A real worker process whose NIXL cannot load (a broken nixl_cu12 ahead on its path)."""
    import subprocess
    import sys

    from services.run.children import REPO_ROOT, child_env
    from tests.brokers import AMQP_URL

    require_broker()
    (tmp_path / "nixl_cu12").mkdir()
    (tmp_path / "nixl_cu12" / "__init__.py").write_text("raise ImportError('libucs.so.0: cannot open')\n")
    env = child_env(
        {
            "EXEGPT_NAMESPACE": namespace,
            "EXEGPT_AMQP_URL": AMQP_URL,
            "EXEGPT_REDIS_URL": REDIS_URL,
            "EXEGPT_MODEL": "tiny-llama",
            "EXEGPT_DEVICE": "cpu",
        }
    )  # NIXL by default
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    refused = subprocess.run(
        [sys.executable, "-m", "services.cli", "worker"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in refused.stdout.splitlines() if "refused to start" in line]
    assert refused.returncode == 2 and len(lines) == 1, refused.stdout + refused.stderr
    assert "NIXL cannot load (ImportError: libucs.so.0: cannot open)" in lines[0] and "--kv-transport redis" in lines[0]
    started = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "worker", "--kv-transport", "redis"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert any(line.startswith("ready worker") for line in started.stdout), "chose redis: it starts"
    finally:
        started.terminate()
        started.wait(30)
        config = MeshConfig(namespace=namespace, amqp_url=AMQP_URL, redis_url=REDIS_URL)
        asyncio.run(purge(config, Names(namespace), LocalHub()))


IDLE_AGENT_CPU = """
import sys, time
from common.transport.nixl_kv import load_nixl, open_agent

agent = open_agent(load_nixl(), "idle")
start, cpu = time.monotonic(), time.process_time()
time.sleep(1.0)  # a window of idleness to measure, not a wait for anything
print("cpu_per_s", (time.process_time() - cpu) / (time.monotonic() - start))
"""


def test_nixl_an_idle_agent_leaves_the_cpu_alone():
    """NIXL's progress thread, left at its wrapper's default, spins a core for as long as the agent
    lives (about 1.0 CPU-s per second measured); ours sleeps between UCX events (about 0.03). In a
    process of its own, so that nothing else in it runs."""
    import subprocess
    import sys

    from services.run.children import REPO_ROOT, child_env

    need(nixl_loads(), "NIXL (nixl-cu12) cannot load: pip install nixl-cu12")
    out = subprocess.run(
        [sys.executable, "-c", IDLE_AGENT_CPU],
        cwd=REPO_ROOT,
        env=child_env({}),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    cpu_per_s = float(next(line for line in out.splitlines() if line.startswith("cpu_per_s")).split()[1])
    assert cpu_per_s < 0.3, out
