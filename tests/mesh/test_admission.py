"""Admission control at the gateway (429 with Retry-After past a limit), a client that leaves
(its work is dropped), an outage of the broker or the store (503 with Retry-After, never 500),
and what the OpenAPI document says of them."""

from __future__ import annotations

import asyncio
import json
import time

import aiormq.exceptions
import pytest
import redis.exceptions
from pydantic import SecretStr

from services.gateway.admission import DEPTH_TTL_S, Admission, Refused
from tests.mesh.conftest import running_mesh
from tests.mesh.fake_engine import FakeEngine

pytestmark = pytest.mark.usefixtures("cleanup")
FAKE = "tests.mesh.fake_engine:load"
STEP_S = 0.02  # a slow engine keeps requests in flight long enough to be seen there


class SlowEngine(FakeEngine):
    def step(self, *args, **kwargs):
        time.sleep(STEP_S)
        return super().step(*args, **kwargs)


@pytest.fixture
def config(mesh_config):
    return mesh_config.model_copy(update={"model": FAKE})


def completion(max_tokens: int, prompt: str = "abcd", **extra) -> dict:
    return {"model": FAKE, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def rate_limited(response, *, retry_after: bool = True) -> dict:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    if retry_after:
        assert int(response.headers["Retry-After"]) >= 1
    else:
        assert "Retry-After" not in response.headers
    return error


def unavailable(response) -> dict:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable_error", "service_unavailable")
    return error


async def in_flight(m, count: int = 1) -> list[str]:
    """Until the gateway has ``count`` requests in flight; their ids."""
    gateway = m.app.state.gateway
    await polled(lambda: len(gateway.pending) >= count)
    return list(gateway.pending)


async def polled(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# --- limits of the gateway ---------------------------------------------------------------------


async def test_past_the_in_flight_limit_a_request_is_a_429_with_retry_after(config, hub):
    config = config.model_copy(update={"max_in_flight": 1})
    async with running_mesh(config, hub, SlowEngine) as m:
        first = asyncio.create_task(m.client.post("/v1/completions", json=completion(60)))
        await in_flight(m)
        error = rate_limited(await m.client.post("/v1/completions", json=completion(2)))
        assert "in flight" in error["message"] and "limit 1" in error["message"]
        assert (await first).status_code == 200
        assert (await m.client.post("/v1/completions", json=completion(2))).status_code == 200
        rate_limited(await m.client.post("/v1/completions", json=completion(2, n=2)))  # each choice counts
        metrics = (await m.client.get("/metrics")).text
        assert 'exegpt_refused_total{reason="in_flight"} 2.0' in metrics
        assert 'exegpt_requests_total{endpoint="completions",status="429"} 2.0' in metrics


async def test_past_the_queue_depth_a_request_is_a_429_and_the_broker_is_asked_twice_a_second(config, hub):
    config = config.model_copy(update={"max_queue_depth": 3})
    async with running_mesh(config, hub, FakeEngine) as m:
        bus, asked, depth = m.app.state.gateway.bus, [0], [5]

        async def queue_depth(queue: str) -> int:
            asked[0] += 1
            return depth[0]

        bus.queue_depth = queue_depth
        await asyncio.sleep(DEPTH_TTL_S)  # past the depth read before the patch
        answers = await asyncio.gather(*(m.client.post("/v1/completions", json=completion(2)) for _ in range(20)))
        for answer in answers:
            assert "waiting to be encoded" in rate_limited(answer)["message"]
        assert asked[0] == 1  # one broker call for all of them
        depth[0] = 0
        await asyncio.sleep(DEPTH_TTL_S)
        assert (await m.client.post("/v1/completions", json=completion(2))).status_code == 200


def test_work_admitted_since_the_last_depth_read_counts_toward_the_queue(config):
    now, reads = [100.0], [0]

    async def read_depth() -> int:
        reads[0] += 1
        return 0

    async def scenario() -> None:
        admission = Admission(
            config.model_copy(update={"max_queue_depth": 2, "max_in_flight": 0}),
            is_live=lambda rid: True,
            read_depth=read_depth,
            clock=lambda: now[0],
        )
        for _ in range(2):
            await admission.check_queue()
            admission.admit(None, 1, 10)
        with pytest.raises(Refused):
            await admission.check_queue()
        now[0] += DEPTH_TTL_S  # a fresh read: the broker's count replaces the estimate
        await admission.check_queue()
        assert reads[0] == 2

    asyncio.run(scenario())


# --- limits of a key ---------------------------------------------------------------------------


@pytest.fixture
def keyed(config):
    return config.model_copy(update={"api_keys": SecretStr("key-a,key-b")})


async def test_a_key_past_its_in_flight_limit_gets_a_429_and_another_key_does_not(keyed, hub):
    config = keyed.model_copy(update={"key_max_in_flight": 1})
    async with running_mesh(config, hub, SlowEngine) as m:
        first = asyncio.create_task(m.client.post("/v1/completions", json=completion(60), headers=auth("key-a")))
        await in_flight(m)
        error = rate_limited(await m.client.post("/v1/completions", json=completion(2), headers=auth("key-a")))
        assert "for this key" in error["message"]
        other = await m.client.post("/v1/completions", json=completion(2), headers=auth("key-b"))
        assert other.status_code == 200, other.text
        assert (await first).status_code == 200
        again = await m.client.post("/v1/completions", json=completion(2), headers=auth("key-a"))
        assert again.status_code == 200, again.text


async def test_a_key_past_its_tokens_per_minute_gets_a_429_and_another_key_does_not(keyed, hub):
    config = keyed.model_copy(update={"key_tokens_per_minute": 100})
    async with running_mesh(config, hub, FakeEngine) as m:
        for _ in range(2):  # 4 prompt tokens + 40: 88 of 100
            answer = await m.client.post("/v1/completions", json=completion(40), headers=auth("key-a"))
            assert answer.status_code == 200, answer.text
        error = rate_limited(await m.client.post("/v1/completions", json=completion(40), headers=auth("key-a")))
        assert "tokens per min" in error["message"] and "limit 100" in error["message"]
        assert (await m.client.post("/v1/completions", json=completion(40), headers=auth("key-b"))).status_code == 200
        # larger than a whole minute's tokens: no wait helps, so no Retry-After
        error = rate_limited(
            await m.client.post("/v1/completions", json=completion(100), headers=auth("key-b")), retry_after=False
        )
        assert "Request too large" in error["message"]


def test_the_token_bucket_refills_continuously_and_refunds_what_was_not_submitted(config):
    now = [0.0]

    async def no_depth() -> int:
        return 0

    admission = Admission(
        config.model_copy(update={"key_tokens_per_minute": 60}),
        is_live=lambda rid: True,
        read_depth=no_depth,
        clock=lambda: now[0],
    )
    admission.admit("alice", 1, 60)
    with pytest.raises(Refused) as refused:
        admission.admit("alice", 1, 30)
    assert refused.value.retry_after_s == 30
    now[0] += 30.0  # 1 token a second
    ticket = admission.admit("alice", 1, 30)
    ticket.cancel()  # nothing submitted after all: the tokens come back
    admission.admit("alice", 1, 30)
    admission.admit("bob", 1, 60)  # each owner has a bucket of its own


# --- a client that leaves ----------------------------------------------------------------------


async def test_a_non_streaming_client_that_disconnects_aborts_its_request(config, hub):
    async with running_mesh(config, hub, SlowEngine) as m:
        body, gone, sent = json.dumps(completion(200, prompt="ab")).encode(), asyncio.Event(), []
        requests = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if requests:
                return requests.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "root_path": "",
            "client": ("127.0.0.1", 50000),
            "server": ("gateway", 80),
            "headers": [
                (b"host", b"gateway"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
        serving = asyncio.create_task(m.app(scope, receive, send))
        rid = (await in_flight(m))[0]
        worker = m.mesh.workers[0]
        engine = worker.runner.engine
        await polled(lambda: rid in engine.batch)
        gone.set()
        await asyncio.wait_for(serving, 10)
        assert sent[0]["status"] == 499
        assert rid not in m.app.state.gateway.pending
        await polled(lambda: rid in worker.aborted and rid not in engine.batch and rid not in worker.held)
        assert m.app.state.admission.in_flight() == 0


async def test_work_past_its_deadline_leaves_the_worker_even_when_no_abort_reaches_it(config, hub):
    """The deadline travels with the work: after ``request_timeout_s`` the client has its 504 and
    the worker drops the request by itself (here the abort broadcast cannot be sent)."""
    config = config.model_copy(update={"request_timeout_s": 1.0})
    async with running_mesh(config, hub, SlowEngine) as m:
        gateway = m.app.state.gateway

        async def no_broadcast(*args, **kwargs):
            raise aiormq.exceptions.ChannelInvalidStateError("No active transport in channel")

        gateway.bus.broadcast = no_broadcast
        worker = m.mesh.workers[0]
        engine = worker.runner.engine
        stopped, abort = [], engine.abort

        def recorded_abort(request_id: str) -> None:
            stopped.append(request_id)
            abort(request_id)

        started, step = set(), engine.step

        def recorded_step(*args, **kwargs):  # which request ran (the worker may drop it before the 504 is read)
            events = step(*args, **kwargs)
            started.update(engine.batch)
            return events

        engine.abort, engine.step = recorded_abort, recorded_step
        response = await m.client.post("/v1/completions", json=completion(200, prompt="ab"))
        assert response.status_code == 504, response.text
        assert len(started) == 1
        rid = next(iter(started))
        await polled(lambda: rid not in engine.batch and rid not in worker.held)
        assert rid not in worker.aborted  # nobody told the worker
        assert stopped == [rid]  # the worker stopped it (it did not run to its 200th token)
        assert rid not in worker.driver.running


# --- outages -----------------------------------------------------------------------------------


async def test_a_broker_that_refuses_the_publish_is_a_503_and_nothing_is_left_behind(config, hub):
    async with running_mesh(config, hub, FakeEngine) as m:
        gateway = m.app.state.gateway
        publish, calls = gateway.bus.publish, [0]

        async def failing_after_one(*args, **kwargs):
            calls[0] += 1
            if calls[0] > 1:
                raise aiormq.exceptions.ChannelInvalidStateError("No active transport in channel")
            await publish(*args, **kwargs)

        async def no_broadcast(*args, **kwargs):
            raise aiormq.exceptions.ChannelInvalidStateError("No active transport in channel")

        gateway.bus.publish, gateway.bus.broadcast = failing_after_one, no_broadcast
        # n=2: the first choice is queued, the second fails, the first's abort fails too
        error = unavailable(await m.client.post("/v1/completions", json=completion(4, n=2)))
        assert "message broker" in error["message"]
        assert not gateway.pending and m.app.state.admission.in_flight() == 0
        unavailable(
            await m.client.post(
                "/v1/chat/completions",
                json={"model": FAKE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
        )
        unavailable(await m.client.post("/v1/completions", json=completion(4, stream=True)))
        gateway.bus.publish = publish
        assert (await m.client.post("/v1/completions", json=completion(4))).status_code == 200


async def test_metrics_and_admin_reads_during_an_outage_are_503s(config, hub):
    async with running_mesh(config, hub, FakeEngine) as m:
        gateway = m.app.state.gateway

        async def broker_down(*args, **kwargs):
            raise aiormq.exceptions.ChannelInvalidStateError("No active transport in channel")

        async def store_down(*args, **kwargs):
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379")

        gateway.bus.queue_depth = broker_down
        unavailable(await m.client.get("/metrics"))
        await asyncio.sleep(DEPTH_TTL_S)  # the admission's depth read is due again: it fails too
        unavailable(await m.client.post("/v1/completions", json=completion(2)))
        gateway.transports.store.get_many = store_down
        assert "store" in unavailable(await m.client.get("/admin/schedule"))["message"]
        ready = await m.client.get("/health/ready")
        assert ready.status_code == 503 and "Retry-After" in ready.headers


@pytest.mark.parametrize("transport_kind", [pytest.param("broker", marks=pytest.mark.broker)])
@pytest.mark.parametrize("max_queue_depth", [1024, 0])  # 0: no depth read, the publish fails
async def test_a_gateway_whose_broker_connection_is_gone_answers_503(config, hub, max_queue_depth):
    config = config.model_copy(update={"max_queue_depth": max_queue_depth})
    async with running_mesh(config, hub, FakeEngine) as m:
        gateway = m.app.state.gateway
        await gateway.bus._connection.close()  # the real client's failure, as when the broker stops
        answers = await asyncio.gather(*(m.client.post("/v1/completions", json=completion(2)) for _ in range(5)))
        for answer in answers:
            unavailable(answer)


# --- the OpenAPI document ----------------------------------------------------------------------


async def test_the_openapi_document_declares_the_error_responses(config, hub):
    async with running_mesh(config, hub, FakeEngine) as m:
        document = (await m.client.get("/openapi.json")).json()
        schemas = document["components"]["schemas"]
        assert set(schemas["ErrorResponse"]["properties"]) == {"error"}
        assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
        for path in ("/v1/completions", "/v1/chat/completions"):
            operation = document["paths"][path]["post"]
            responses = operation["responses"]
            assert {"400", "401", "404", "429", "503"} <= set(responses) and "422" not in responses
            for status in ("400", "429", "503"):
                schema = responses[status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
            for status in ("429", "503"):
                assert "Retry-After" in responses[status]["headers"]
            assert "requestBody" in operation
        assert "HTTPValidationError" not in schemas


async def test_a_wrong_method_is_a_405_that_says_which_are_allowed(config, hub):
    async with running_mesh(config, hub, FakeEngine) as m:
        answer = await m.client.get("/v1/completions")
        assert answer.status_code == 405 and answer.headers["Allow"] == "POST"
        assert answer.json()["error"]["code"] == "405"
        answer = await m.client.delete("/admin/schedule")
        assert answer.status_code == 405 and answer.headers["Allow"] == "GET"
