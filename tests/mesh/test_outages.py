"""What a worker does when the broker or the store fails under it: its heartbeat goes on, a
finished request whose record the store cannot take is acked and recorded later."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from common.messages import codec
from common.messages.control import Abort, ScheduleUpdate
from common.messages.schedule import ScheduleSpec
from common.transport.rabbit import with_heartbeat
from tests.mesh.conftest import running_mesh, until
from tests.mesh.fake_engine import FakeEngine

FAKE = "tests.mesh.fake_engine:load"


@pytest.fixture
def config(mesh_config, cleanup):
    return mesh_config.model_copy(update={"model": FAKE})


def test_the_amqp_url_asks_for_a_heartbeat() -> None:
    assert with_heartbeat("amqp://u:p@h:5672/", 10) == "amqp://u:p@h:5672/?heartbeat=10"
    assert with_heartbeat("amqp://u:p@h/vh?heartbeat=3", 10) == "amqp://u:p@h/vh?heartbeat=3"  # the URL's wins
    assert with_heartbeat("amqp://h/?ssl=1", 10) == "amqp://h/?ssl=1&heartbeat=10"
    assert with_heartbeat("amqp://h/", None) == "amqp://h/"


async def test_heartbeats_go_on_through_failed_reports(config, hub) -> None:
    async with running_mesh(config, hub, FakeEngine, workers=1) as m:
        worker = m.mesh.workers[0]
        broadcast, failures, sent, delivered = worker.bus.broadcast, [3], [0], asyncio.Event()

        async def flaky(exchange: str, body: bytes) -> None:
            if failures[0] > 0:
                failures[0] -= 1
                raise ConnectionError("broker gone")
            await broadcast(exchange, body)
            sent[0] += 1
            delivered.set()

        worker.bus.broadcast = flaky
        await until(lambda: sent[0] >= 1, [delivered], 30)  # after three failed reports
        heard = m.mesh.scheduler.heard[worker.worker_id]
        await until(lambda: m.mesh.scheduler.heard[worker.worker_id] > heard, [delivered], 30)
        assert failures[0] == 0 and worker.worker_id in m.mesh.scheduler.heard


async def test_a_store_outage_at_settle_acks_and_writes_the_record_later(config, hub, caplog) -> None:
    """The answer went out: the request is not run again (it would be, again and again, while the
    store is out); its done marker and length sample are written once the store answers."""
    async with running_mesh(config, hub, FakeEngine, workers=1) as m:
        worker = m.mesh.workers[0]
        record, failures, from_buffer, written = worker.store.set_once_and_record, [1], [], asyncio.Event()

        async def flaky(*args, **kwargs):
            if failures[0] > 0:
                failures[0] -= 1
                raise ConnectionError("store gone")
            result = await record(*args, **kwargs)
            from_buffer.append(len(worker.records.waiting) == 1)  # written by the flush, not by a second run
            written.set()
            return result

        worker.store.set_once_and_record = flaky
        with caplog.at_level(logging.WARNING, logger="services.worker.worker"):
            answer = await m.client.post("/v1/completions", json={"model": FAKE, "prompt": "a b", "max_tokens": 3})
            assert answer.status_code == 200  # the client had its tokens before the settle
            await until(lambda: bool(from_buffer), [written], 30)
        await until(lambda: not worker.held and not worker._background, [worker.changed], 30)
        assert from_buffer == [True] and not worker.records.waiting
        assert "could not be settled" not in caplog.text  # acked, not sent back to its queue
        assert await m.app.state.gateway.bus.queue_depth(worker.names.encode_queue) == 0


@pytest.mark.parametrize("error, dead", [(ConnectionError("broker gone"), False), (RuntimeError("a settle bug"), True)])
async def test_a_settle_the_broker_failed_does_not_count_against_the_delivery_limit(config, hub, error, dead) -> None:
    """A request whose settle fails more times than the delivery limit allows: when the broker
    or the store was out each time (a few reconnections in a row), it goes back uncounted and is
    settled at last; when the settle itself fails, the limit sends it to the dead queue."""
    async with running_mesh(config, hub, FakeEngine, workers=1) as m:
        worker = m.mesh.workers[0]
        settle, calls, called, settled = worker._settle, [0], asyncio.Event(), asyncio.Event()
        failing = config.delivery_limit + 1

        async def flaky(*args, **kwargs):
            calls[0] += 1
            called.set()
            if calls[0] <= failing:
                raise error
            await settle(*args, **kwargs)
            settled.set()

        worker._settle = flaky
        answer = await m.client.post("/v1/completions", json={"model": FAKE, "prompt": "a b", "max_tokens": 3})
        assert answer.status_code == 200  # its events went out before the settle
        bus, names = m.app.state.gateway.bus, worker.names
        if dead:

            async def dead_letters() -> int:
                return await bus.queue_depth(names.dead_queue)

            deadline = asyncio.get_running_loop().time() + 30
            while await dead_letters() == 0:  # dead-lettered by the consumer that counted past the limit
                assert asyncio.get_running_loop().time() < deadline, calls
                called.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await called.wait()
            assert calls[0] == config.delivery_limit
        else:
            await asyncio.wait_for(settled.wait(), 30)  # at the fifth delivery: acked
            assert calls[0] == failing + 1 and not worker.held
            assert await bus.queue_depth(names.dead_queue) == 0
        assert await bus.queue_depth(names.encode_queue) == 0


async def test_the_abort_exchange_carries_aborts_only(config, hub) -> None:
    """Gateways may publish to the abort exchange; a schedule published there is ignored."""
    async with running_mesh(config, hub, FakeEngine, workers=1) as m:
        worker = m.mesh.workers[0]
        version = worker.follower.version
        seen, on_control = asyncio.Event(), worker.on_control

        def watched(message) -> None:
            on_control(message)
            seen.set()

        worker.on_control = watched
        forged = ScheduleUpdate(version + 100, ScheduleSpec("static", encode_batch=1, decode_batch=1), (), 0.0)
        gateway = m.app.state.gateway
        await gateway.bus.broadcast(gateway.names.abort_exchange, codec.encode(forged))
        await gateway.bus.broadcast(gateway.names.abort_exchange, codec.encode(Abort("r-gone")))
        await until(lambda: "r-gone" in worker.aborted, [seen], 30)  # after the forgery, in order
        assert worker.follower.version < forged.version  # (the scheduler may have moved on meanwhile)


async def test_an_event_that_raises_does_not_stop_the_gateways_pump(config, hub) -> None:
    from common.messages.events import EventBatch

    async with running_mesh(config, hub, FakeEngine, workers=1) as m:
        gateway = m.app.state.gateway
        handle, seen = gateway.on_event_batch, asyncio.Event()

        def fragile(batch) -> None:
            if batch.producer == "poison":
                seen.set()
                raise RuntimeError("a handler bug")
            handle(batch)

        gateway.on_event_batch = fragile
        await gateway.bus.publish(gateway.events_queue, codec.encode(EventBatch("poison", "worker", 1, 1)))
        await asyncio.wait_for(seen.wait(), 30)
        answer = await m.client.post("/v1/completions", json={"model": FAKE, "prompt": "a b", "max_tokens": 3})
        assert answer.status_code == 200, answer.text
