"""API keys and scopes, the scheduler's admin API, `exegpt schedule`, and the scheduler's gauges."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from common.cli import CliError
from common.config import MeshConfig
from common.messages import codec
from common.messages.control import PinSchedule, Replan, RoleAssignment, ScheduleUpdate, SetBound
from common.messages.schedule import ScheduleSpec
from common.messages.status import CalibrationPoint, CandidateFigures, SchedulerState
from common.names import Names
from common.transport.connect import LocalHub, open_transports
from optimizer.schedule import MINIMUMS, POLICIES, Schedule
from services.cli import main
from services.cli import schedule as schedule_cli
from services.gateway import ServedModel, create_app
from services.gateway.admin import jsonable
from services.gateway.keys import KeyRing, check_exposure, hash_key, load_keys, parse_keys_file, required_scope
from services.run.plugins import gateway_plugins
from tests.mesh.conftest import running_mesh, until
from tests.mesh.fake_engine import FakeEngine, load

FAKE = "tests.mesh.fake_engine:load"
TIMEOUT_S = 30
USER, ADMIN = "sk-user-1", "sk-admin-1"


@pytest.fixture
def config(mesh_config, cleanup):
    return mesh_config.model_copy(update={"model": FAKE})


def with_keys(config: MeshConfig) -> MeshConfig:
    return config.model_copy(update={"api_keys": SecretStr(USER), "admin_keys": SecretStr(ADMIN)})


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def gateway_asgi(config: MeshConfig, hub: LocalHub) -> AsyncIterator[httpx.ASGITransport]:
    """A gateway alone (no scheduler, no workers), with the plugins the CLI mounts."""
    engine = FakeEngine()
    routers, lifespans = gateway_plugins()
    app = create_app(
        config,
        ServedModel(FAKE, engine.tokenizer, engine.max_context),
        hub=hub,
        routers=tuple(routers),
        lifespans=tuple(lifespans),
    )
    async with app.router.lifespan_context(app):
        yield httpx.ASGITransport(app=app)


@contextlib.asynccontextmanager
async def gateway_app(config: MeshConfig, hub: LocalHub) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_asgi(config, hub) as transport:
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


async def next_request(config: MeshConfig, hub: LocalHub) -> object:
    """The next message on the scheduler's queue, decoded (and acked)."""
    names = Names(config.namespace)
    t = await open_transports(config, names, hub)
    try:
        await t.bus.declare_queue(names.scheduler_queue)
        subscription = await t.bus.consume(names.scheduler_queue, prefetch=1)
        delivery = await asyncio.wait_for(anext(aiter(subscription)), TIMEOUT_S)
        await delivery.ack()
        return codec.decode(delivery.body, object)
    finally:
        await t.close()


def state_record(**changes) -> SchedulerState:
    fields = dict(
        leader="scheduler-x",
        token=3,
        version=7,
        policy="waa-c",
        pinned=False,
        latency_bound_s=2.5,
        meets_bound=False,
        basis="observed: 312 requests",
        samples=312,
        input_quantiles=(100.0, 300.0, 900.0),
        output_quantiles=(50.0, 200.0, 600.0),
        input_mean=150.0,
        output_mean=90.0,
        correlation=0.1,
        arrival_rate_s=3.2,
        arrival_cv=1.1,
        predicted_throughput_seq_s=10.0,
        predicted_latency_s=1.8,
        observed_throughput_seq_s=9.5,
        observed_latency_s=math.inf,
        drift_statistic=0.12,
        drift_p_value=0.4,
        replans=3,
        last_replan_reason="drift",
        last_replan_at=1.7e9,
        workers=2,
        updated_at=1.7e9,
        last_search_s=2.25,
        ttft_bound_s=1.5,
        tpot_bound_s=0.08,
        forecast_rate_s=3.5,
        forecast_cv=1.2,
        predicted_attainment=0.995,
        raw_predicted_attainment=0.9,
        observed_attainment=0.97,
        predicted_tpot_s=0.05,
        observed_tpot_s=0.06,
        calibration=(CalibrationPoint("decode", 11.3, 1.18),),
        calibration_samples=40,
        candidates=(
            CandidateFigures(WAA, 12.0, 0.995, 0.4, 0.05, 1.7, math.nan, True),
            CandidateFigures(ScheduleSpec("continuous", decode_batch=32), 20.0, 0.9, 0.9, 0.07, 2.9, math.nan, False),
        ),
    )
    return SchedulerState(**{**fields, **changes})


WAA = ScheduleSpec(
    "waa-c", encode_batch=4, decode_batch=8, num_devices=2, encoder_devices=1, decoder_devices=1, worker_devices=1
)


async def write_records(config: MeshConfig, hub: LocalHub, state: SchedulerState | None = None) -> None:
    names = Names(config.namespace)
    t = await open_transports(config, names, hub)
    update = ScheduleUpdate(
        7, WAA, (RoleAssignment("w-1", "encoder"), RoleAssignment("w-2", "decoder")), 1.7e9, epoch=5, token=3
    )
    await t.store.set(names.schedule, codec.encode(update))
    await t.store.set(names.scheduler_state, codec.encode(state or state_record()))
    await t.close()


# --- keys -------------------------------------------------------------------------------------


def test_a_keys_file_holds_hashes_owners_and_scopes():
    text = f"# team keys\n{hash_key('a')} alice admin  # on call\n\n{hash_key('b')} bob user\n"
    ring = KeyRing(tuple(parse_keys_file(text)))
    assert ring.find("a").owner == "alice" and ring.find("a").scope == "admin"
    assert ring.find("b").scope == "user" and ring.find("c") is None
    for bad in (f"{hash_key('a')} alice", f"{hash_key('a')} alice root", "abc alice user"):
        with pytest.raises(ValueError):
            parse_keys_file(bad)


def test_keys_come_from_the_config_and_its_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{hash_key('f')} carol admin\n")
    ring = load_keys(MeshConfig(api_keys="u1, u2", admin_keys="a1", api_keys_file=str(path)))
    assert [ring.find(k).scope for k in ("u1", "u2", "a1", "f")] == ["user", "user", "admin", "admin"]
    assert "u1" not in repr(MeshConfig(api_keys="u1"))  # secrets stay out of logs
    assert not load_keys(MeshConfig())


def test_no_keys_means_loopback_only_unless_insecure():
    check_exposure(MeshConfig(host="127.0.0.1"), KeyRing())
    check_exposure(MeshConfig(host="::1"), KeyRing())
    check_exposure(MeshConfig(host="0.0.0.0", insecure=True), KeyRing())
    check_exposure(MeshConfig(host="0.0.0.0"), load_keys(MeshConfig(api_keys="k")))
    with pytest.raises(ValueError, match="--insecure"):
        check_exposure(MeshConfig(host="0.0.0.0"), KeyRing())
    assert [required_scope(p) for p in ("/v1/models", "/v1", "/admin/schedule", "/health", "/metrics", "/v1x")] == [
        "user",
        "user",
        "admin",
        None,
        None,
        None,
    ]


def test_serve_refuses_a_public_host_without_keys(capsys, monkeypatch):
    for name in ("EXEGPT_API_KEYS", "EXEGPT_ADMIN_KEYS", "EXEGPT_API_KEYS_FILE", "EXEGPT_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--model", "tiny-llama", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exegpt serve: error: refusing to listen on 0.0.0.0 without API keys")


async def test_v1_needs_a_key_and_admin_needs_the_admin_scope(config, hub):
    async with gateway_app(with_keys(config), hub) as client:
        for headers in ({}, auth("wrong"), {"Authorization": USER}):
            response = await client.get("/v1/models", headers=headers)
            assert response.status_code == 401, headers
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
            assert response.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/v1/models", headers=auth(USER))).status_code == 200
        assert (await client.get("/v1/models", headers=auth(ADMIN))).status_code == 200
        assert (await client.post("/v1/completions", json={"model": FAKE, "prompt": "x"})).status_code == 401
        # the Batch API is under /v1 too
        assert (await client.get("/v1/batches")).status_code == 401
        assert (await client.get("/v1/batches", headers=auth(USER))).status_code == 200
        files = {"file": ("in.jsonl", b"{}\n")}
        assert (await client.post("/v1/files", files=files, data={"purpose": "batch"})).status_code == 401
        forbidden = await client.get("/admin/schedule", headers=auth(USER))
        assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "insufficient_scope"
        assert (await client.get("/admin/schedule")).status_code == 401
        assert (await client.get("/admin/schedule", headers=auth(ADMIN))).status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_without_keys_everything_is_open(config, hub):
    async with gateway_app(config, hub) as client:
        assert (await client.get("/v1/models")).status_code == 200
        assert (await client.get("/admin/schedule")).json() == {"update": None, "state": None}


# --- admin API ----------------------------------------------------------------------------------


async def test_the_schedule_and_the_scheduler_state_read_as_json(config, hub):
    await write_records(config, hub)
    async with gateway_app(with_keys(config), hub) as client:
        body = (await client.get("/admin/schedule", headers=auth(ADMIN))).json()
    update, state = body["update"], body["state"]
    assert (update["version"], update["epoch"], update["token"]) == (7, 5, 3)
    assert update["schedule"]["policy"] == "waa-c" and update["schedule"]["decode_batch"] == 8
    assert update["allocation"] == [{"worker_id": "w-1", "role": "encoder"}, {"worker_id": "w-2", "role": "decoder"}]
    assert update["published_at"] == 1.7e9 and update["lease_until"] is None  # inf
    assert state["latency_bound_s"] == 2.5 and state["meets_bound"] is False
    assert state["observed_latency_s"] is None and state["input_quantiles"] == [100.0, 300.0, 900.0]


async def test_set_bound_asks_the_scheduler(config, hub):
    async with gateway_app(with_keys(config), hub) as client:
        response = await client.put("/admin/schedule/bound", json={"latency_bound_s": 2.5}, headers=auth(ADMIN))
        assert response.status_code == 202 and response.json()["latency_bound_s"] == 2.5
        message = await next_request(config, hub)
        assert isinstance(message, SetBound) and message.latency_bound_s == 2.5
        assert abs(message.requested_at - time.time()) < TIMEOUT_S
        response = await client.put("/admin/schedule/bound", json={"latency_bound_s": None}, headers=auth(ADMIN))
        assert response.status_code == 202 and response.json()["latency_bound_s"] is None
        message = await next_request(config, hub)
        assert isinstance(message, SetBound) and message.latency_bound_s == math.inf


@pytest.mark.parametrize(
    "body",
    [
        {"latency_bound_s": 0},
        {"latency_bound_s": -1},
        {"latency_bound_s": "2"},
        {"latency_bound_s": True},
        {},
        {"bound": 2},
    ],
)
async def test_a_bad_bound_is_a_400(config, hub, body):
    async with gateway_app(config, hub) as client:
        response = await client.put("/admin/schedule/bound", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_replan_asks_the_scheduler(config, hub):
    async with gateway_app(config, hub) as client:
        response = await client.post("/admin/schedule/replan", json={"reason": "new traffic"})
        assert response.status_code == 202
        message = await next_request(config, hub)
        assert isinstance(message, Replan) and message.reason == "new traffic"
        assert (await client.post("/admin/schedule/replan")).status_code == 202  # no body
        message = await next_request(config, hub)
        assert isinstance(message, Replan) and message.reason


async def test_pin_validates_and_asks_the_scheduler(config, hub):
    async with gateway_app(config, hub) as client:
        for schedule, param in (
            ({"policy": "fastest"}, "schedule.policy"),
            ({"encode_batch": 0}, "schedule.encode_batch"),
            ({"encode_batch": 2**64}, "schedule.encode_batch"),
            ({"colour": "red"}, "schedule.colour"),
        ):
            bad = await client.put("/admin/schedule/pin", json={"schedule": schedule})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
        bad = await client.put("/admin/schedule/pin", json={"schedule": {"policy": "mixed", "chunk_tokens": 8}})
        assert bad.status_code == 400 and "chunk_tokens" in bad.json()["error"]["message"]
        fields = {"policy": "rra", "encode_batch": 2, "decode_batch": 16, "decode_iters_per_encode": 4}
        assert (await client.put("/admin/schedule/pin", json={"schedule": fields})).status_code == 202
        message = await next_request(config, hub)
        assert isinstance(message, PinSchedule) and message.schedule == ScheduleSpec(**fields)
        assert (await client.put("/admin/schedule/pin", json={"schedule": None})).status_code == 202
        message = await next_request(config, hub)
        assert isinstance(message, PinSchedule) and message.schedule is None


async def test_a_pin_through_the_admin_api_changes_the_schedule(config, hub):
    target = ScheduleSpec("continuous", encode_batch=2, decode_batch=5, worker_devices=1)
    async with running_mesh(config, hub, load) as m:
        response = await m.client.put(
            "/admin/schedule/pin",
            json={"schedule": {"policy": "continuous", "encode_batch": 2, "decode_batch": 5, "worker_devices": 1}},
        )
        assert response.status_code == 202
        await until(lambda: m.mesh.scheduler.current.schedule == target, [m.mesh.scheduler.published])
        body = (await m.client.get("/admin/schedule")).json()
        assert body["update"]["schedule"]["decode_batch"] == 5
        assert [a["worker_id"] for a in body["update"]["allocation"]] == [m.mesh.workers[0].worker_id]


# --- metrics --------------------------------------------------------------------------------------


async def test_scheduler_gauges_follow_the_store(config, hub):
    async with gateway_app(with_keys(config), hub) as client:
        assert "exegpt_schedule" not in (await client.get("/metrics")).text  # absent, not zeros
        await write_records(config, hub)
        text = (await client.get("/metrics")).text
        for line in (
            "exegpt_schedule_version 7.0",
            'exegpt_schedule_info{policy="waa-c"} 1.0',
            "exegpt_schedule_pinned 0.0",
            "exegpt_schedule_latency_bound_seconds 2.5",
            "exegpt_schedule_predicted_throughput 10.0",
            "exegpt_schedule_observed_throughput 9.5",
            "exegpt_schedule_predicted_latency_seconds 1.8",
            "exegpt_schedule_infeasible 1.0",
            "exegpt_schedule_drift_statistic 0.12",
            "exegpt_schedule_replans 3.0",
            "exegpt_schedule_last_search_seconds 2.25",
            'exegpt_length_quantile{kind="input",quantile="0.5"} 100.0',
            'exegpt_length_quantile{kind="output",quantile="0.99"} 600.0',
            "exegpt_arrival_rate 3.2",
            "exegpt_arrival_cv 1.1",
            "exegpt_scheduler_workers 2.0",
        ):
            assert line in text.splitlines(), line
        assert "exegpt_schedule_observed_latency_seconds" not in text  # inf: left out
        await write_records(config, hub, state_record(latency_bound_s=math.inf, meets_bound=True, pinned=True))
        text = (await client.get("/metrics")).text
        assert "exegpt_schedule_latency_bound_seconds" not in text
        assert "exegpt_schedule_infeasible 0.0" in text and "exegpt_schedule_pinned 1.0" in text


# --- exegpt schedule -------------------------------------------------------------------------------


async def cli(transport: httpx.ASGITransport, *argv: str, key: str | None = ADMIN) -> int:
    parser = argparse.ArgumentParser(prog="exegpt")
    schedule_cli.register(parser.add_subparsers())
    args = parser.parse_args(["schedule", *argv, "--url", "http://gateway", *(["--key", key] if key else [])])
    return await schedule_cli.execute(args, transport=transport)


async def test_schedule_show_prints_a_summary_or_the_json(config, hub, capsys):
    await write_records(config, hub)
    async with gateway_asgi(with_keys(config), hub) as transport:
        assert await cli(transport, "show") == 0
        out = capsys.readouterr().out
        for part in (
            "schedule v7",
            "policy waa-c",
            "B_E 4",
            "B_D 8",
            "N_D 1",
            "w-1=encoder, w-2=decoder",
            "end-to-end bound (p99-length request): 2.5 s",
            "TTFT p99 <= 1.5 s",
            "TPOT p99 <= 80 ms",
            "3.5 requests/s forecast",
            "predicted 99.5% (raw profile 90.0%), observed 97.0%",
            "decode ~11 tok x1.18",
            "->waa-c B_E 4 B_D 8",
            "continuous B_E 8 B_D 32",
            "ALERT",
            "basis: observed: 312 requests",
            "p50/p90/p99: 100/300/900",
            "3.2/s, CV 1.1",
            "predicted 10 seq/s, observed 9.5 seq/s",
            "predicted 1.8 s, observed unbounded",
            "statistic 0.12",
            "drift (searched 2.25 s)",
        ):
            assert part in out, part
        assert await cli(transport, "show", "--json") == 0
        assert json.loads(capsys.readouterr().out)["update"]["version"] == 7


async def test_schedule_commands_send_their_requests(config, hub, capsys, tmp_path):
    async with gateway_asgi(with_keys(config), hub) as transport:
        assert await cli(transport, "set-bound", "inf") == 0
        assert "no latency bound" in capsys.readouterr().out
        assert (await next_request(config, hub)).latency_bound_s == math.inf
        assert await cli(transport, "set-bound", "1.5") == 0
        assert (await next_request(config, hub)).latency_bound_s == 1.5
        assert await cli(transport, "set-slo", "--ttft", "1.5", "--tpot", "none", "--percentile", "0.9") == 0
        assert "TTFT p90 <= 1.5 s" in capsys.readouterr().out
        asked = await next_request(config, hub)
        assert (asked.ttft_s, asked.ttft_percentile, asked.tpot_s) == (1.5, 0.9, math.inf)
        assert await cli(transport, "replan", "--reason", "by hand") == 0
        assert (await next_request(config, hub)).reason == "by hand"
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"schedule": {"policy": "rra", "encode_batch": 3}}))
        assert await cli(transport, "pin", str(plan)) == 0
        assert (await next_request(config, hub)).schedule == ScheduleSpec("rra", encode_batch=3)
        assert await cli(transport, "pin", "--unpin") == 0
        assert (await next_request(config, hub)).schedule is None


@pytest.mark.parametrize(
    "argv, key, expected",
    [
        (["show"], None, "401: Missing API key"),
        (["show"], "nope", "401: Incorrect API key"),
        (["show"], USER, "403: "),
        (["set-bound", "-3"], ADMIN, "400: latency_bound_s must be a positive"),
        (["set-bound", "soon"], ADMIN, "not a number of seconds"),
        (["set-slo", "--ttft", "-1"], ADMIN, "400: ttft_s must be a positive"),
        (["set-slo", "--tpot", "0.1", "--percentile", "1.5"], ADMIN, "400: "),
        (
            ["pin", '{"policy": "x"}'],
            ADMIN,
            "400: Input should be 'rra', 'waa-c', 'waa-m', 'static', 'continuous' or 'mixed' (schedule.policy)",
        ),
        (["pin"], ADMIN, "a schedule (file or JSON) or --unpin"),
    ],
)
async def test_schedule_errors_are_one_line(config, hub, argv, key, expected):
    async with gateway_asgi(with_keys(config), hub) as transport:
        with pytest.raises(CliError) as caught:
            await cli(transport, *argv, key=key)
    message = str(caught.value)
    assert expected in message and "\n" not in message


def test_schedule_without_a_gateway_says_so(capsys):
    assert main(["schedule", "show", "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exegpt schedule: error: cannot reach the gateway at http://127.0.0.1:9")
    assert "\n" not in err


def test_keys_new_prints_a_key_and_its_line(capsys):
    assert main(["keys", "new", "--owner", "ops", "--scope", "admin"]) == 0
    key_line, file_line = capsys.readouterr().out.splitlines()
    key = key_line.split()[-1]
    assert file_line.split()[1:] == [hash_key(key), "ops", "admin"]
    assert KeyRing(tuple(parse_keys_file(file_line.split(" ", 1)[1]))).find(key).owner == "ops"


def test_up_hands_its_children_the_keys_themselves():
    from services.run.launcher import child_env

    env = child_env(MeshConfig(api_keys="u1,u2", admin_keys="a1", insecure=True))
    assert (env["EXEGPT_API_KEYS"], env["EXEGPT_ADMIN_KEYS"]) == ("u1,u2", "a1")
    assert MeshConfig(insecure=env["EXEGPT_INSECURE"]).insecure


async def test_the_pin_body_schema_is_the_schedules(config, hub):
    """Every field of Schedule with its type, default and least value, and no other: a body the
    schema accepts is one Schedule takes (no open object refused later)."""
    async with gateway_app(config, hub) as client:
        document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    body = document["paths"]["/admin/schedule/pin"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    pin = schemas[body["$ref"].rsplit("/", 1)[-1]]
    ref = next(o["$ref"] for o in pin["properties"]["schedule"]["anyOf"] if "$ref" in o)
    fields = schemas[ref.rsplit("/", 1)[-1]]
    assert fields["additionalProperties"] is False
    assert set(fields["properties"]) == {f.name for f in dataclasses.fields(Schedule)}
    assert fields["properties"]["policy"]["enum"] == list(POLICIES)
    for name, least in MINIMUMS.items():
        assert fields["properties"][name]["minimum"] == least, name


def test_schedule_show_gives_a_search_asked_that_could_not_run():
    state = jsonable(
        state_record(
            replans=0, last_search_s=2.0, last_replan_reason="asked: check", last_outcome="not searched: no profile"
        )
    )
    text = "\n".join(schedule_cli.state_lines(state))
    assert ": asked: check" in text and "outcome: not searched: no profile" in text
    assert "searched 2" not in text  # the time of an earlier search is not this one's
