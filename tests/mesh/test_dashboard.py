"""The dashboard's JSON (GET /admin/dashboard/state) on both transports, and what it remembers
between polls (``History``). The page itself is driven in a browser in test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import tomllib
from importlib import resources
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from common.messages import codec
from common.messages.status import WorkerStatus
from common.names import Names
from common.transport.connect import open_transports
from optimizer.schedule import Schedule
from services.gateway import ServedModel, create_app
from services.gateway.dashboard.history import STATE_WAIT_S, History, numeric_fields, version_change
from services.gateway.dashboard.watch import Heard, WorkerWatch, worker_row
from tests.mesh.conftest import running_mesh, until
from tests.mesh.fake_engine import FakeEngine
from tests.mesh.test_service import crash

USER, ADMIN = "sk-user-dash", "sk-admin-dash"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
PINNED = Schedule("static", encode_batch=4, decode_batch=4, worker_devices=1)


@pytest.fixture
def config(mesh_config, cleanup):
    return mesh_config.model_copy(update={"api_keys": SecretStr(USER), "admin_keys": SecretStr(ADMIN)})


# --- History: pure ---------------------------------------------------------------------------


def update_json(version: int, policy: str = "continuous", workers: tuple[str, ...] = ("w0",), token: int = 1):
    return {
        "version": version,
        "epoch": 1,
        "token": token,
        "published_at": 100.0 + version,
        "schedule": {"policy": policy, "encode_batch": 8},
        "allocation": [{"worker_id": w, "role": "worker"} for w in workers],
    }


def state_json(updated_at: float, **fields):
    return {
        "version": 1,
        "pinned": False,
        "latency_bound_s": None,
        "replans": 0,
        "last_replan_at": 0.0,
        "last_replan_reason": "",
        "last_outcome": "",
        "updated_at": updated_at,
        "predicted_throughput_seq_s": 2.0,
        "calibration": {"throughput": 0.9, "note": "x"},
        **fields,
    }


def test_history_keeps_every_number_of_the_state_once_per_record_and_at_most_once_a_second():
    history = History(every_s=1.0)
    history.observe(None, state_json(10.0), now=1000.0)
    history.observe(None, state_json(10.5), now=1000.5)  # within a second of the last look: not looked at
    history.observe(None, state_json(10.0), now=1002.0)  # the same record again: no new point
    history.observe(None, state_json(11.0, attainment=0.97), now=1003.0)
    assert [p["at"] for p in history.points] == [1000.0, 1003.0]
    assert history.points[-1]["attainment"] == 0.97  # a field this code does not know is kept too
    assert history.points[-1]["calibration.throughput"] == 0.9 and "calibration.note" not in history.points[-1]
    assert history.points_after(1000.0) == [history.points[-1]]


def test_numeric_fields_takes_numbers_and_one_level_of_objects():
    assert numeric_fields({"a": 1, "b": True, "c": "x", "d": [1, 2], "e": {"f": 2.5, "g": {"h": 1}}}) == {
        "a": 1.0,
        "b": 1.0,
        "e.f": 2.5,
    }


def test_history_timeline_names_searches_versions_pins_and_bounds():
    history = History(every_s=0.0)
    history.observe(update_json(1), state_json(1.0), now=1.0)
    history.observe(update_json(2, workers=("w0", "w1")), state_json(2.0, version=2), now=2.0)
    history.observe(update_json(3, "static", ("w0", "w1")), state_json(3.0, version=3, pinned=True), now=3.0)
    history.observe(
        update_json(3, "static", ("w0", "w1")),
        state_json(
            4.0,
            version=3,
            pinned=True,
            replans=1,
            last_replan_at=3.5,
            last_replan_reason="asked: look",
            last_outcome="kept the schedule: pinned",
            latency_bound_s=2.0,
        ),
        now=4.0,
    )
    entries = history.timeline_after(0)
    assert [(e["kind"], e["version"]) for e in entries] == [
        ("version", 1),
        ("version", 2),
        ("version", 3),
        ("search", 3),
        ("bound", 3),
    ]
    assert entries[0]["reason"] == "in force when the dashboard first looked"
    assert entries[1]["reason"] == "workers 1 -> 2"
    assert entries[2]["reason"] == "pinned, schedule continuous -> static" and entries[2]["policy"] == "static"
    assert entries[3]["reason"] == "asked: look" and entries[3]["outcome"].startswith("kept")
    assert entries[4]["reason"] == "latency bound none -> 2 s"
    assert history.timeline_after(entries[2]["seq"]) == entries[3:]


def test_a_new_version_waits_for_the_state_record_that_explains_it():
    history = History(every_s=0.0)
    history.observe(update_json(1), state_json(1.0), now=1.0)
    history.observe(update_json(2, "static"), state_json(2.0), now=2.0)  # the record still tells of version 1
    assert [e["version"] for e in history.timeline_after(0)] == [1]
    history.observe(update_json(2, "static"), state_json(2.5, version=2, pinned=True), now=2.5)
    assert history.timeline_after(0)[-1]["reason"] == "pinned, schedule continuous -> static"
    # a record that does not catch up holds a version back STATE_WAIT_S at most
    history.observe(update_json(3), state_json(3.0, version=2, pinned=True), now=3.0)
    assert [e["version"] for e in history.timeline_after(0)] == [1, 2]
    history.observe(update_json(3), state_json(3.0, version=2, pinned=True), now=3.0 + STATE_WAIT_S)
    assert [e["version"] for e in history.timeline_after(0)] == [1, 2, 3]


def test_version_change_says_what_changed():
    assert version_change(update_json(1), update_json(2, token=2), False, False) == "new scheduler leader"
    assert (
        version_change(update_json(1, "static"), update_json(2), True, False)
        == "unpinned, schedule static -> continuous"
    )
    wider = update_json(3)
    wider["schedule"] = {**wider["schedule"], "encode_batch": 16}
    assert version_change(update_json(2), wider, False, False) == "encode_batch 8 -> 16"
    planned = {**wider, "schedule": {**wider["schedule"], "mean_input_len": 31.959595959595966, "decode_batch": 30}}
    wider["schedule"].update(mean_input_len=31.427083333333332, decode_batch=32)
    assert version_change(wider, planned, False, False) == "decode_batch 32 -> 30, mean_input_len 31.4 -> 32"


def test_a_worker_row_has_rates_from_its_last_two_heartbeats_and_says_live_draining_or_gone():
    before = WorkerStatus("w", "decoder", 2, 3, 5, "alive", at=100.0, engine_s=10.0, steps=50)
    after = WorkerStatus("w", "decoder", 3, 4, 4, "draining", at=102.0, engine_s=11.0, steps=70)
    row = worker_row(Heard(after, heard_at=50.0, previous=before), now=50.5, timeout_s=6.0)
    assert (row["status"], row["step_rate_s"], row["busy"], row["heartbeat_age_s"]) == ("draining", 10.0, 0.5, 0.5)
    assert worker_row(Heard(after, 50.0), now=56.5, timeout_s=6.0)["status"] == "gone"  # silent too long
    stopped = WorkerStatus("w", "decoder", 3, 0, 0, "stopping", at=103.0)
    assert worker_row(Heard(stopped, 50.0), now=50.0, timeout_s=6.0)["status"] == "gone"
    assert worker_row(Heard(before, 50.0), now=50.0, timeout_s=6.0)["step_rate_s"] is None  # one heartbeat: no rate
    busy = WorkerStatus(
        "w", "worker", 3, 2, 30, "alive", at=104.0, kv_tokens=120, kv_used_bytes=5.5e6, kv_allocated_bytes=2e9
    )
    row = worker_row(Heard(busy, 50.0), now=50.0, timeout_s=6.0)  # KV use rides the heartbeat (a mesh)
    assert (row["kv_tokens"], row["kv_used_bytes"], row["kv_allocated_bytes"]) == (120, 5.5e6, 2e9)
    assert worker_row(Heard(before, 50.0), now=50.0, timeout_s=6.0)["kv_used_bytes"] is None  # unknown
    capped = dataclasses.replace(busy, applied_batch=(8, 16))  # the batch sizes it runs, guard applied
    assert worker_row(Heard(capped, 50.0), now=50.0, timeout_s=6.0)["applied_batch"] == [8, 16]
    assert worker_row(Heard(busy, 50.0), now=50.0, timeout_s=6.0)["applied_batch"] is None  # unknown


def test_the_page_and_its_files_ship_inside_the_package():
    static = resources.files("services.gateway.dashboard") / "static"
    page = (static / "index.html").read_text()
    for name in ("dashboard.js", "dashboard.css"):
        assert f"/dashboard/static/{name}" in page and (static / name).read_text()
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # nothing from elsewhere


def test_a_non_editable_install_ships_every_file_of_the_page():
    """pyproject's package-data names every file the page needs (a wheel holds only those)."""
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "services.gateway.dashboard"
    ]
    package = root / "services" / "gateway" / "dashboard"
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    assert shipped == set((package / "static").iterdir()) and len(shipped) == 3


# --- the JSON against a running mesh ---------------------------------------------------------


async def state_of(m) -> dict:
    response = await m.client.get("/admin/dashboard/state", headers=ADMIN_AUTH)
    assert response.status_code == 200, response.text
    return response.json()


async def test_state_needs_an_admin_key_and_the_page_shell_does_not(config, hub):
    async with running_mesh(config, hub, FakeEngine) as m:
        assert (await m.client.get("/admin/dashboard/state")).status_code == 401
        user = await m.client.get("/admin/dashboard/state", headers={"Authorization": f"Bearer {USER}"})
        assert user.status_code == 403 and "admin" in user.json()["error"]["message"]
        page = await m.client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        script = await m.client.get("/dashboard/static/dashboard.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert (await m.client.get("/dashboard/static/secrets.txt")).status_code == 404


async def test_state_shows_workers_schedule_and_timeline_and_marks_a_killed_worker_gone(config, hub):
    async with running_mesh(config, hub, FakeEngine, workers=2, schedule=PINNED) as m:
        dashboard = m.app.state.dashboard
        first = await state_of(m)  # the first poll starts listening to heartbeats
        assert first["update"]["schedule"]["policy"] == "static"
        assert first["gateway"]["embedded"] is True and first["dead"]["depth"] == 0
        assert any(e["kind"] == "version" and e["version"] == first["update"]["version"] for e in first["timeline"])
        ids = sorted(w.worker_id for w in m.mesh.workers)
        loop = asyncio.get_running_loop()
        await until(lambda: [r["worker_id"] for r in dashboard.watch.rows(loop.time())] == ids, [dashboard.watch.noted])
        rows = (await state_of(m))["workers"]
        assert [(r["worker_id"], r["status"], r["role"]) for r in rows] == [(i, "live", "worker") for i in ids]
        assert all(r["schedule_version"] == first["update"]["version"] and "kv_tokens" in r for r in rows)

        victim = m.mesh.workers[1]
        await crash(victim, m.mesh.tasks[1 + 1])  # the scheduler's task comes first; it dies without a word
        await until(
            lambda: (
                {r["worker_id"]: r["status"] for r in dashboard.watch.rows(loop.time())}[victim.worker_id] == "gone"
            ),
            [dashboard.watch.noted],
        )
        after = await state_of(m)
        assert after["state"]["pinned"] is True and after["state"]["policy"] == "static"
        assert {r["worker_id"]: r["status"] for r in after["workers"]} == {
            w: "gone" if w == victim.worker_id else "live" for w in ids
        }
        assert after["history"] == [] or after["history"][0]["at"] > 0
        since = after["history"][-1]["at"] if after["history"] else first["history"][-1]["at"]
        again = await m.client.get(
            "/admin/dashboard/state", params={"since": since, "after": 10_000}, headers=ADMIN_AUTH
        )
        assert again.json()["timeline"] == [] and all(p["at"] > since for p in again.json()["history"])


async def test_state_counts_the_dead_queue_and_its_reasons(config, hub):
    async with running_mesh(config, hub, FakeEngine) as m:
        names = Names(config.namespace)
        bus = m.app.state.gateway.bus
        queue = f"{names.queue_prefix}dashboard-test"
        await bus.declare_queue(queue)
        await bus.publish(queue, b"\x93not a message")
        subscription = await bus.consume(queue, prefetch=1)
        delivery = await asyncio.wait_for(anext(aiter(subscription)), 10)
        await delivery.dead_letter("undecodable: not a message")
        await subscription.cancel()

        dashboard = m.app.state.dashboard
        first = await state_of(m)
        assert first["dead"]["depth"] == 1
        await dashboard.reading  # the first poll started reading the reasons, off the request path
        dead = (await state_of(m))["dead"]
        assert dead["depth"] == 1
        assert dead["reasons"] == [{"queue": queue, "reason": "undecodable: not a message", "count": 1}]
        assert await bus.queue_depth(names.dead_queue) == 1  # read, and given back


async def test_the_heartbeat_listener_starts_again_after_its_subscription_ended(config, hub):
    names = Names(config.namespace)
    transports = await open_transports(config, names, hub)
    watch = WorkerWatch(transports.bus, names, "dashboard-test", timeout_s=1.0)
    try:
        await watch.ensure_started()
        first = watch._task
        await watch._subscription.cancel()  # what the broker does when the namespace is purged
        await asyncio.wait_for(asyncio.gather(first, return_exceptions=True), 10)
        await watch.ensure_started()
        assert watch._task is not first and not watch._task.done()
        status = WorkerStatus("w-1", "worker", 3, 1, 7, "alive", time.time())
        await transports.bus.broadcast(names.status_exchange, codec.encode(status))
        await until(lambda: "w-1" in watch.heard, [watch.noted])
        (row,) = watch.rows(asyncio.get_running_loop().time())
        assert (row["status"], row["schedule_version"], row["running"], row["free_slots"]) == ("live", 3, 1, 7)
    finally:
        await watch.close()
        await transports.close()


async def test_a_bad_parameter_is_a_documented_400(config, hub):
    async with running_mesh(config, hub, FakeEngine) as m:
        response = await m.client.get("/admin/dashboard/state", params={"since": "yesterday"}, headers=ADMIN_AUTH)
        assert response.status_code == 400 and "since" in response.text
        documented = (await m.client.get("/openapi.json")).json()["paths"]["/admin/dashboard/state"]["get"]
        assert {"400", "401", "403"} <= set(documented["responses"])
        assert "/dashboard" not in (await m.client.get("/openapi.json")).json()["paths"]  # the page is no API


async def test_state_shows_the_batch_api_batches_and_their_progress(config, hub):
    from services.batch.api import batch_lifespan, batch_router

    engine, model = FakeEngine(), "tests.mesh.fake_engine:load"
    app = create_app(
        config,
        ServedModel(model, engine.tokenizer, engine.max_context),
        hub=hub,
        routers=(batch_router(),),
        lifespans=(batch_lifespan(run_consumer=False),),
    )
    lines = [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": model, "prompt": "hi", "max_tokens": 2},
            }
        )
        for i in range(2)
    ]
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=ADMIN_AUTH
        ) as client:
            file = await client.post(
                "/v1/files",
                data={"purpose": "batch"},
                files={"file": ("in.jsonl", "\n".join([*lines, "{not json"]).encode())},
            )
            batch = await client.post(
                "/v1/batches",
                json={"input_file_id": file.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"},
            )
            assert batch.status_code == 200, batch.text
            assert (await client.get("/admin/dashboard/state")).json()["batches"] is None  # not read yet
            await app.state.dashboard.reading
            (shown,) = (await client.get("/admin/dashboard/state")).json()["batches"]
    assert shown["id"] == batch.json()["id"] and shown["status"] == "in_progress"
    assert (shown["total"], shown["completed"], shown["failed"]) == (3, 0, 1)  # the bad line failed at once
