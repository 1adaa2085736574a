"""Work for a gateway whose events queue is gone: dropped without holding up the worker's next
steps, on both transports."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.messages import codec
from common.messages.control import Abort
from common.messages.work import EncodeWork, Sampling
from common.names import Names
from common.transport.connect import open_bus, open_transports
from services.worker import exits
from tests.mesh.conftest import running_mesh
from tests.mesh.fake_engine import MAX_CONTEXT, FakeEngine

FAKE = "fake"
GRACE_S = 60.0  # the grace for a missing events queue here: longer than any wait below
TIMEOUT_S = 20.0


class PacedEngine(FakeEngine):
    """A fake engine whose steps take a little time, so a long request is still running when it
    is aborted."""

    def step(self, *args, **kwargs):
        time.sleep(0.05)  # the engine's work (this runs in the engine's thread)
        return super().step(*args, **kwargs)


@pytest.fixture
def config(mesh_config, cleanup):
    return mesh_config.model_copy(update={"model": FAKE})


async def test_a_request_dropped_while_its_events_queue_is_missing_does_not_stall_the_worker(config, hub, monkeypatch):
    monkeypatch.setattr(exits, "EVENTS_GRACE_S", GRACE_S)
    names = Names(config.namespace)
    reply = names.events_queue("gone-soon")
    keeper = await open_bus(config, names, hub)  # declares the queue again at the end, and drops it
    try:
        async with running_mesh(config, hub, PacedEngine) as m:
            worker = m.mesh.workers[0]
            t = await open_transports(config, names, hub)
            owner = await open_bus(config, names, hub)  # the connection of a gateway that dies
            try:
                await owner.declare_queue(reply, exclusive=True)
                events = await owner.consume(reply, prefetch=100)
                work = EncodeWork("r-gone", FAKE, (7,) * 8, Sampling(max_tokens=MAX_CONTEXT - 8), reply, time.time())
                await t.bus.publish(names.encode_queue, codec.encode(work))
                await asyncio.wait_for(anext(aiter(events)), TIMEOUT_S)  # it runs
                await owner.close()  # its exclusive events queue goes with it
                # its tokens are now tried again for GRACE_S; its client leaves meanwhile
                await t.bus.broadcast(names.abort_exchange, codec.encode(Abort("r-gone")))
                deadline = time.monotonic() + TIMEOUT_S
                while "r-gone" in worker.held:
                    assert time.monotonic() < deadline, "the abort was not taken"
                    await asyncio.sleep(0.01)  # polling the worker's state: no event marks an abort's end
                body = {"model": FAKE, "prompt": "hello", "max_tokens": 3}
                reply_ok = await asyncio.wait_for(m.client.post("/v1/completions", json=body), TIMEOUT_S)
                assert reply_ok.status_code == 200, reply_ok.text  # well before the dropped request's retries end
            finally:
                await keeper.declare_queue(reply, exclusive=True)  # back: the retries end, the worker can close
                await owner.close()
                await t.close()
    finally:
        await keeper.close()
