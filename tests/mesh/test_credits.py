"""WAA's decode credits: a request that leaves an encoder before it was encoded gives none back.

An encoder encodes only against credits (decode slots the decoders granted). A queued request
never took one; if its abort, expiry or refusal granted one, the count would grow past the
decoders' free slots and hand-offs could outnumber them (memory, RabbitMQ + Redis)."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.messages import codec
from common.messages.control import Abort
from common.messages.work import EncodeWork, Sampling
from common.names import Names
from common.transport.connect import open_transports
from optimizer.schedule import Schedule
from tests.mesh.conftest import running_mesh
from tests.mesh.fake_engine import FakeEngine

pytestmark = pytest.mark.usefixtures("cleanup")
FAKE = "fake"
SCHEDULE = Schedule(
    "waa-c", encode_batch=2, decode_batch=4, num_devices=2, encoder_devices=1, decoder_devices=1, worker_devices=1
)


class SmallCache(FakeEngine):
    kv_budget_tokens = 64  # a 100-token prompt is refused on arrival


async def bounded(condition, what: str, timeout_s: float = 20.0) -> None:
    """Sample ``condition`` until it holds (a state inside the workers that no event reports)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not reached in time: {what}"
        await asyncio.sleep(0.01)


async def test_queued_requests_aborted_expired_or_refused_on_an_encoder_return_no_credit(mesh_config, hub):
    config = mesh_config.model_copy(update={"model": FAKE, "heartbeat_timeout_s": 30.0})
    names = Names(config.namespace)
    async with running_mesh(config, hub, SmallCache, workers=2, schedule=SCHEDULE) as m:
        encoder = m.mesh.by_role("encoder")[0]
        version = m.mesh.scheduler.current.version
        t = await open_transports(config, names, hub)
        try:
            key = names.credits(version)
            granted = 0
            deadline = time.monotonic() + 20
            while granted < SCHEDULE.decode_batch:  # the decoder grants its free slots when it takes the role
                assert time.monotonic() < deadline, "the decoder granted no credits"
                granted += await t.store.take(key, 100)  # decoders now full, as far as the encoder knows
                await asyncio.sleep(0.01)
            reply = names.events_queue("credits-test")
            await t.bus.declare_queue(reply)

            def work(rid: str, prompt_len: int) -> bytes:
                return codec.encode(
                    EncodeWork(rid, FAKE, tuple([7] * prompt_len), Sampling(max_tokens=4), reply, time.time())
                )

            await t.bus.publish(names.encode_queue, work("abort-me", 8))
            await t.bus.publish(names.encode_queue, work("expire-me", 8), deadline=time.time() + 0.5)
            await t.bus.publish(names.encode_queue, work("too-big", 100))
            await bounded(lambda: {"abort-me", "expire-me"} <= set(encoder.driver.queued), "queued on the encoder")
            await t.bus.broadcast(names.abort_exchange, codec.encode(Abort("abort-me")))
            await bounded(lambda: not ({"abort-me", "expire-me"} & set(encoder.held)), "aborted and expired")
            await asyncio.gather(*list(encoder._background))  # their settles (and any credit) are done
            assert await t.store.get(key) in (None, b"0"), "a request that never took a credit gave one back"
            # the decoders' slots come back: the encoder then encodes as before
            await t.store.add(key, granted)
            reply_ok = await m.client.post("/v1/completions", json={"model": FAKE, "prompt": "hello", "max_tokens": 3})
            assert reply_ok.status_code == 200, reply_ok.text
        finally:
            await t.close()
