"""Hand-offs over NIXL that go wrong, on the real RabbitMQ and Redis: nothing is lost or doubled.

A WAA mesh of one encoder and one decoder (tiny-llama, greedy), each with its own NIXL agent. The
faults are made at the data plane's boundary: an encoder whose process is gone before its KV
cache is read (its agent's metadata leaves the store, its memory is unreachable), a lease that
ends while nobody reads, and a read that breaks in the middle (what a decoder dying mid-read
leaves: an unacked hand-off, blocks never released). And what Redis holds meanwhile: descriptors,
never KV bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from common.names import Names
from common.scheduling import recent_lengths
from common.transport.connect import open_transports
from common.transport.nixl_kv import NixlKv
from engine import load_engine
from engine.api import GenerationRequest, SamplingParams
from optimizer.schedule import Schedule
from tests.brokers import need, nixl_loads
from tests.mesh.conftest import running_mesh

pytestmark = [pytest.mark.usefixtures("cleanup"), pytest.mark.broker]
MODEL = "tiny-llama"
TIMEOUT_S = 60
WAA = Schedule(
    "waa-c",
    encode_batch=2,
    decode_batch=4,
    num_devices=2,
    encoder_devices=1,
    decoder_devices=1,
    worker_devices=1,
    mean_input_len=6.0,
)
COUNT = 3
TOKENS = 6


@pytest.fixture
def transport_kind() -> str:
    return "broker"


@pytest.fixture(scope="module")
def engines():
    return [load_engine(MODEL, device="cpu") for _ in range(3)]


@pytest.fixture
def config(mesh_config):
    need(nixl_loads(), "NIXL (nixl-cu12) cannot load: pip install nixl-cu12")
    return mesh_config.model_copy(update={"model": MODEL, "device": "cpu", "kv_transport": "nixl"})


def prompt(i: int) -> str:
    return f"request {i} says " + "word " * i


def solo(engine, i: int) -> str:
    ids = tuple(engine.tokenizer.encode(prompt(i)))
    events = engine.prefill([GenerationRequest("solo", ids, SamplingParams(TOKENS, ignore_eos=True))])
    while engine.running():
        events += engine.decode_step()
    return "".join(e.text for e in events)


async def answers_once(m, config, engine) -> list[str]:
    """Send COUNT requests; each answer is its solo text, and each finished once; their ids."""
    responses = await asyncio.wait_for(
        asyncio.gather(
            *(
                m.client.post(
                    "/v1/completions",
                    json={
                        "model": MODEL,
                        "prompt": prompt(i),
                        "max_tokens": TOKENS,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                )
                for i in range(COUNT)
            )
        ),
        TIMEOUT_S,
    )
    assert [r.status_code for r in responses] == [200] * COUNT, [r.text for r in responses]
    replies = [r.json() for r in responses]
    for i, reply in enumerate(replies):
        assert reply["choices"][0]["text"] == solo(engine, i), f"request {i}"
        assert reply["usage"]["completion_tokens"] == TOKENS
    names = Names(config.namespace)
    t = await open_transports(config, names, m.hub)
    samples = await recent_lengths(t.store, names, 10_000)
    await t.close()
    assert sorted(s.request_id for s in samples) == sorted(r["id"] for r in replies)  # one finish each
    return [r["id"] for r in replies]


def count_puts(worker) -> Counter:
    puts: Counter = Counter()
    put = worker.kv.put

    async def counted(handoff, **kw):
        puts[handoff.request_id] += 1
        return await put(handoff, **kw)

    worker.kv.put = counted
    return puts


async def drained(kv: NixlKv) -> None:
    """Bounded polling of the encoder's staging pool (no event marks a freed block)."""
    deadline = time.monotonic() + TIMEOUT_S
    while kv.staged_bytes:
        assert time.monotonic() < deadline, f"{kv.staged_bytes} bytes still staged"
        await asyncio.sleep(0.02)


async def test_an_encoder_gone_before_its_kv_is_read_has_the_request_encoded_again_once(config, hub, engines):
    workers = iter(engines[:2])
    async with running_mesh(config, hub, lambda: next(workers), workers=2, schedule=WAA) as m:
        encoder = m.mesh.by_role("encoder")[0]
        assert isinstance(encoder.kv, NixlKv)
        names = Names(config.namespace)
        put, lost = encoder.kv.put, []

        async def first_from_a_dying_process(handoff, **kw):
            if lost:
                return await put(handoff, **kw)
            lost.append(handoff.request_id)
            doomed = NixlKv(encoder.store, names, pool_bytes=1 << 20, read_timeout_s=5)
            ref = await doomed.put(handoff, **kw)
            await doomed.close()  # the process exits: its agent leaves the store, its memory unreachable
            return ref

        encoder.kv.put = first_from_a_dying_process
        puts = count_puts(encoder)
        ids = await answers_once(m, config, engines[2])
        assert len(lost) == 1 and lost[0] in ids
        assert puts[lost[0]] == 2 and all(puts[rid] == 1 for rid in ids if rid != lost[0])  # encoded again once
        await drained(encoder.kv)


async def test_a_lease_that_ends_unread_frees_the_blocks_and_the_request_is_encoded_again(config, hub, engines):
    workers = iter(engines[:2])
    async with running_mesh(config, hub, lambda: next(workers), workers=2, schedule=WAA) as m:
        encoder = m.mesh.by_role("encoder")[0]
        put, expired = encoder.kv.put, []

        async def first_left_unread(handoff, **kw):
            if expired:
                return await put(handoff, **kw)
            expired.append(handoff.request_id)
            ref = await put(handoff, **{**kw, "ttl_s": 0.2})
            await drained(encoder.kv)  # nobody read it within its lease: the encoder freed the block
            return ref

        encoder.kv.put = first_left_unread
        puts = count_puts(encoder)
        ids = await answers_once(m, config, engines[2])
        assert puts[expired[0]] == 2 and sum(puts.values()) == len(ids) + 1
        await drained(encoder.kv)


async def test_a_read_broken_midway_is_redelivered_and_read_again(config, hub, engines):
    workers = iter(engines[:2])
    async with running_mesh(config, hub, lambda: next(workers), workers=2, schedule=WAA) as m:
        encoder, decoder = m.mesh.by_role("encoder")[0], m.mesh.by_role("decoder")[0]
        read, broken, reads = decoder.kv._read, [], Counter()

        def breaks_once(blocks, metadata):
            reads[blocks.request_id] += 1
            if not broken:
                broken.append(blocks.request_id)
                raise ConnectionError("NIXL read: the reading process went away")
            return read(blocks, metadata)

        decoder.kv._read = breaks_once
        ids = await answers_once(m, config, engines[2])
        assert reads[broken[0]] == 2 and all(reads[rid] == 1 for rid in ids if rid != broken[0])
        await drained(encoder.kv)  # the second read released the blocks the first left staged


async def test_a_decoder_keeps_no_kv_bytes_once_imported(config, hub, engines):
    workers = iter(engines[:2])
    async with running_mesh(config, hub, lambda: next(workers), workers=2, schedule=WAA) as m:
        decoder = m.mesh.by_role("decoder")[0]
        execute, kept = decoder.execute, []

        async def watched(plan):
            result = await execute(plan)
            kept.extend(len(decoder.held[rid].handoff.kv) for rid in plan.admit if rid in decoder.held)
            return result

        decoder.execute = watched
        await answers_once(m, config, engines[2])
        assert kept and kept == [0] * len(kept)


BURST = 8
BURST_WORDS = 60  # ~315 prompt tokens: ~315 KiB of tiny-llama KV a request, ~2.5 MiB in the burst
KV_BYTES_PER_TOKEN = 1024  # tiny-llama: 4 layers x 2 x 2 KV heads x 16 x float32


async def test_a_burst_of_handoffs_keeps_kv_bytes_out_of_redis(config, hub, engines):
    """While a burst of hand-offs waits to be read, Redis holds under 1 MiB of KV-related keys
    (descriptors and agents' metadata), and nothing written to it holds KV bytes."""
    workers = iter(engines[:2])
    async with running_mesh(config, hub, lambda: next(workers), workers=2, schedule=WAA) as m:
        encoder = m.mesh.by_role("encoder")[0]
        names = Names(config.namespace)
        prefixes = (names.kv_meta_prefix, names.kv_payload(""), names.kv_agent(""))
        handed, peak, written = [], [0], []
        put, store_set = encoder.kv.put, encoder.store.set

        async def sampled(handoff, **kw):
            ref = await put(handoff, **kw)
            kv = bytes(handoff.kv)
            handed.append(kv[len(kv) // 2 : len(kv) // 2 + 256])  # a window of the KV bytes
            held = sum([await encoder.store.bytes_prefix(p) for p in prefixes])
            peak[0] = max(peak[0], held)
            return ref

        async def recorded(key, value, **kw):
            written.append(bytes(value))
            return await store_set(key, value, **kw)

        encoder.kv.put, encoder.store.set = sampled, recorded
        responses = await asyncio.wait_for(
            asyncio.gather(
                *(
                    m.client.post(
                        "/v1/completions",
                        json={
                            "model": MODEL,
                            "prompt": f"burst {i} " + "word " * BURST_WORDS,
                            "max_tokens": 4,
                            "temperature": 0,
                            "ignore_eos": True,
                        },
                    )
                    for i in range(BURST)
                )
            ),
            TIMEOUT_S,
        )
        assert [r.status_code for r in responses] == [200] * BURST
        assert (
            len(handed) == BURST
            and sum(r.json()["usage"]["prompt_tokens"] for r in responses) * KV_BYTES_PER_TOKEN > 2 << 20
        )
        assert 0 < peak[0] < 1 << 20
        assert written and not any(window in value for window in handed for value in written)
        await drained(encoder.kv)
