"""The dashboard in a real browser: Debian's chromium, driven by Playwright, against the embedded
mesh (the gateway app, a scheduler that plans on a tiny-llama profile, two tiny-llama workers, all
in this process) served over HTTP by uvicorn.

Screenshots go to ``$EXEGPT_TEST_ARTEFACTS`` (default: this test's tmp dir), at 1280×800 and at
phone width. Without Playwright or chromium (``deploy/ensure-browser.sh`` installs both) the tests
skip, and fail under CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import httpx
import pytest
import uvicorn
from pydantic import SecretStr

from common.config import MeshConfig
from common.messages.schedule import ScheduleSpec
from common.messages.status import CalibrationPoint, CandidateFigures, SchedulerState
from common.transport.connect import LocalHub
from engine import load_engine
from services.cli import main
from services.gateway.admin import jsonable
from services.gateway.dashboard.routes import PAGE_HEADERS, STATIC
from tests.brokers import AMQP_URL, REDIS_URL, need, need_module, require_broker
from tests.mesh.conftest import purge_namespace, running_mesh, until
from tests.mesh.processes import ProcessMesh
from tests.mesh.test_service import crash

CHROMIUM = os.environ.get("EXEGPT_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
need(Path(CHROMIUM).exists(), f"no chromium at {CHROMIUM} (run deploy/ensure-browser.sh)")
playwright_api = need_module("playwright.async_api")

pytestmark = pytest.mark.slow
MODEL = "tiny-llama"
USER, ADMIN = "sk-user-page", "sk-admin-page"
PINNED = {"policy": "static", "encode_batch": 4, "decode_batch": 4, "worker_devices": 1}
DESKTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
SHOWN_WITHIN_MS = 2000  # a new schedule version reaches the page within this
WAIT_MS = 20_000  # anything else the page must show (a search, a silent worker) within this


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    """A quick profile of tiny-llama on this CPU, so the scheduler can plan (and re-plan) for it."""
    out = tmp_path_factory.mktemp("profile") / "tiny.jsonl"
    assert main(["profile", "--model", MODEL, "--out", str(out), "--repeats", "1", "--quick", "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def engines():
    return [load_engine(MODEL, device="cpu") for _ in range(2)]


@pytest.fixture
def artefacts(tmp_path) -> Path:
    folder = Path(os.environ.get("EXEGPT_TEST_ARTEFACTS") or tmp_path) / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def config(namespace, profile) -> MeshConfig:
    return MeshConfig(
        namespace=namespace,
        threads=1,
        heartbeat_s=0.2,
        heartbeat_timeout_s=1.0,
        model=MODEL,
        device="cpu",
        profile=str(profile),
        prior="S",
        prior_scale=0.05,
        replan_interval_s=1.0,
        api_keys=SecretStr(USER),
        admin_keys=SecretStr(ADMIN),
    )


@contextlib.asynccontextmanager
async def served(app) -> AsyncIterator[str]:
    """``app`` (its lifespan already entered) over HTTP on a free loopback port, in this loop."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections wait in the backlog until the server takes them: no start race
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[object]:
    async with playwright_api.async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=["--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            await chromium.close()


def watch_console(page) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    return errors


async def no_sideways_scroll(page) -> None:
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a {page.viewport_size['width']}px window"


async def confirm(page) -> None:
    await page.locator("#confirm").wait_for(state="visible", timeout=WAIT_MS)
    await page.get_by_role("button", name="Confirm", exact=True).click()


async def ask_on_page(page, field: str, value: str, button: str) -> None:
    """Fill one of the page's action fields, press its button and confirm."""
    await page.get_by_label(field).fill(value)
    await page.get_by_role("button", name=button).click()
    await confirm(page)


async def test_without_an_admin_key_the_page_shows_nothing_and_says_why(config, engines, artefacts):
    hub, workers = LocalHub(), iter(engines)
    async with (
        running_mesh(config, hub, lambda: next(workers), workers=2) as m,
        served(m.app) as url,
        browser() as chromium,
    ):
        page = await (await chromium.new_context(viewport=DESKTOP)).new_page()
        await page.goto(f"{url}/dashboard")
        login = page.locator("#login")
        await login.wait_for(state="visible", timeout=WAIT_MS)
        await page.locator("#login-error").filter(has_text="401").wait_for(timeout=WAIT_MS)
        assert await page.locator("#board").is_hidden()
        assert await page.locator("#workers tr").count() == 0  # nothing of the mesh reached the page

        await page.get_by_label("Admin key", exact=True).fill("sk-wrong")
        await page.get_by_role("button", name="Open", exact=True).click()
        await page.locator("#login-error").filter(has_text="Incorrect API key").wait_for(timeout=WAIT_MS)
        await page.get_by_label("Admin key", exact=True).fill(USER)
        await page.get_by_role("button", name="Open", exact=True).click()
        await page.locator("#login-error").filter(has_text="403").wait_for(timeout=WAIT_MS)
        assert await page.locator("#board").is_hidden()
        assert await page.evaluate("sessionStorage.length") == 0  # a refused key is not kept
        await page.screenshot(path=str(artefacts / "dashboard-refused.png"))


async def test_the_page_follows_the_mesh_and_steers_the_scheduler(config, engines, artefacts):
    hub, workers = LocalHub(), iter(engines)
    async with (
        running_mesh(config, hub, lambda: next(workers), workers=2) as m,
        served(m.app) as url,
        browser() as chromium,
    ):
        scheduler = m.mesh.scheduler
        await until(
            lambda: (
                scheduler.brain.plan is not None
                and scheduler.current is not None
                and len(scheduler.current.allocation) == 2
            ),
            [scheduler.decided, scheduler.published],
        )
        page = await (await chromium.new_context(viewport=DESKTOP)).new_page()
        errors = watch_console(page)

        # the key in the fragment: taken, kept for the tab, and out of the address bar at once
        await page.goto(f"{url}/dashboard#key={ADMIN}")
        await page.locator("#board").wait_for(state="visible", timeout=WAIT_MS)
        assert "#" not in page.url and "key=" not in page.url
        assert await page.evaluate("sessionStorage.getItem('exegpt-admin-key')") == ADMIN

        # the workers and the schedule's policy
        live = page.locator("#workers tr.live")
        await page.wait_for_function(
            "n => document.querySelectorAll('#workers tr.live').length === n", arg=2, timeout=WAIT_MS
        )
        assert sorted(await live.evaluate_all("rows => rows.map(r => r.dataset.worker)")) == sorted(
            w.worker_id for w in m.mesh.workers
        )
        policy = scheduler.current.schedule.policy
        await page.locator("#schedule-policy").filter(has_text=policy).wait_for(timeout=WAIT_MS)

        # a re-plan asked on the page, confirmed, appears on the timeline with its reason
        await ask_on_page(page, "Re-plan now, reason", "dashboard check", "Re-plan now")
        await page.locator("#action-result").filter(has_text="Re-plan sent").wait_for(timeout=WAIT_MS)
        await (
            page.locator("#timeline li[data-kind=search]")
            .filter(has_text="asked: dashboard check")
            .wait_for(timeout=WAIT_MS)
        )

        # `exegpt schedule pin`: the new version is on the page within two seconds
        before = scheduler.current.version
        code = await asyncio.to_thread(main, ["schedule", "pin", json.dumps(PINNED), "--url", url, "--key", ADMIN])
        pinned_at = time.monotonic()
        assert code == 0
        await until(
            lambda: scheduler.current.version > before and scheduler.current.schedule.policy == "static",
            [scheduler.published],
        )
        version = scheduler.current.version
        left_ms = SHOWN_WITHIN_MS - (time.monotonic() - pinned_at) * 1000
        await page.wait_for_function(
            "v => document.getElementById('schedule-version').textContent === v"
            " && document.getElementById('schedule-policy').textContent === 'static'",
            arg=f"v{version}",
            timeout=max(left_ms, 1),
        )
        await page.locator("#schedule-pinned .badge").filter(has_text="pinned").wait_for(timeout=WAIT_MS)
        await (
            page.locator(f"#timeline li[data-kind=version][data-version='{version}']")
            .filter(has_text="pinned")
            .wait_for(timeout=WAIT_MS)
        )

        # an action that is cancelled sends nothing
        await page.get_by_label("Latency bound, seconds (empty: none)").fill("2")
        await page.get_by_role("button", name="Set the latency bound").click()
        await page.get_by_role("button", name="Cancel", exact=True).click()
        await page.locator("#action-result").filter(has_text="Cancelled").wait_for(timeout=WAIT_MS)

        # the SLO from the page reaches the scheduler
        await page.get_by_label("TTFT bound in seconds").fill("1.5")
        await ask_on_page(page, "TPOT bound in milliseconds", "80", "Set the TTFT and TPOT bounds")
        await page.locator("#action-result").filter(has_text="SLO sent").wait_for(timeout=WAIT_MS)
        brain = m.mesh.scheduler.brain
        await until(lambda: (brain.slo.ttft_s, round(brain.slo.tpot_s, 6)) == (1.5, 0.08), [m.mesh.scheduler.learned])

        # unpin from the page
        await page.get_by_role("button", name="Unpin the schedule").click()
        await confirm(page)
        await page.locator("#action-result").filter(has_text="Unpin sent").wait_for(timeout=WAIT_MS)
        await page.locator("#schedule-pinned").filter(has_text="no").wait_for(timeout=WAIT_MS)

        await page.screenshot(path=str(artefacts / "dashboard-1280x800.png"))
        await no_sideways_scroll(page)

        # a worker that dies is marked gone
        victim = m.mesh.workers[1]
        await crash(victim, m.mesh.tasks[1 + 1])  # the scheduler's task comes first
        await page.locator(f"#workers tr.gone[data-worker='{victim.worker_id}']").wait_for(timeout=WAIT_MS)
        assert await page.locator("#workers tr.live").count() == 1
        await page.screenshot(path=str(artefacts / "dashboard-1280x800-full.png"), full_page=True)
        assert errors == [], errors

        # a refused action shows the API's own words
        await ask_on_page(page, "Latency bound, seconds (empty: none)", "-1.5", "Set the latency bound")
        await (
            page.locator("#action-result.error")
            .filter(has_text="latency_bound_s must be a positive number of seconds")
            .wait_for(timeout=WAIT_MS)
        )

        # phone width: one column, nothing wider than the window
        await page.set_viewport_size(PHONE)
        await page.wait_for_function(
            "() => document.querySelector('#charts svg').getAttribute('viewBox') === '0 0 360 170'", timeout=WAIT_MS
        )  # the next poll redrew the charts for the narrow window
        await no_sideways_scroll(page)
        await page.screenshot(path=str(artefacts / "dashboard-phone.png"), full_page=True)
        print(f"dashboard screenshots in {artefacts}")


def extended_snapshot() -> dict:
    """A state answer as a gateway whose scheduler records more than today's fields would give it:
    candidates, calibration factors, SLOs and attainment; no schedule meets the bound; a dead
    message and a batch in progress."""
    chosen = ScheduleSpec(policy="waa-c", encode_batch=4, decode_batch=32, encoder_devices=1, decoder_devices=2)
    other = ScheduleSpec(policy="rra", encode_batch=16, decode_batch=48, decode_iters_per_encode=9)
    state = jsonable(
        SchedulerState(
            leader="scheduler-1",
            token=3,
            version=7,
            policy="waa-c",
            pinned=False,
            latency_bound_s=1.5,
            meets_bound=False,
            basis="observed: 80 requests",
            samples=80,
            input_quantiles=(40.0, 90.0, 120.0),
            output_quantiles=(20.0, 50.0, 70.0),
            input_mean=48.0,
            output_mean=24.0,
            correlation=0.1,
            arrival_rate_s=3.5,
            arrival_cv=1.8,
            predicted_throughput_seq_s=4.0,
            predicted_latency_s=2.1,
            observed_throughput_seq_s=3.2,
            observed_latency_s=2.4,
            drift_statistic=0.31,
            drift_p_value=0.002,
            replans=4,
            last_replan_reason="drift",
            last_replan_at=1000.0,
            workers=3,
            updated_at=1001.0,
            last_outcome="published: 12% more throughput",
            predicted_attainment=0.93,
            calibration=(CalibrationPoint("decode", 8.0, 1.12), CalibrationPoint("prefill", 256.0, 0.91)),
            calibration_samples=40,
            candidates=(
                CandidateFigures(chosen, 4.0, 0.975, 0.31, 0.045, 2.1, math.nan, True),
                CandidateFigures(other, 6.1, 0.912, 0.52, 0.061, 3.4, math.nan, False),
            ),
        )
    )
    state.update(
        {
            "ttft_slo_s": 0.5,
            "tpot_slo_s": 0.05,
            "attainment": 0.93,
            "calibration_factor": {"throughput": 0.91},
            "planned_output_quantiles": [18.0, 45.0, 66.0],
        }
    )
    update = {
        "version": 7,
        "epoch": 1,
        "token": 3,
        "published_at": 1000.5,
        "lease_until": None,
        "schedule": {"policy": "waa-c", "encode_batch": 4, "decode_batch": 32},
        "allocation": [
            {"worker_id": f"w{i}", "role": role} for i, role in enumerate(("encoder", "decoder", "decoder"))
        ],
    }
    workers = [
        {
            "worker_id": "w0",
            "role": "encoder",
            "state": "alive",
            "status": "live",
            "schedule_version": 7,
            "running": 2,
            "free_slots": 0,
            "step_rate_s": 12.5,
            "busy": 0.4,
            "steps": 100,
            "group": [1],
            "heartbeat_age_s": 0.5,
        },
        {
            "worker_id": "w1",
            "role": "decoder",
            "state": "draining",
            "status": "draining",
            "schedule_version": 6,
            "running": 5,
            "free_slots": 27,
            "step_rate_s": 30.0,
            "busy": 0.9,
            "steps": 900,
            "group": [1],
            "heartbeat_age_s": 0.7,
        },
        {
            "worker_id": "w2",
            "role": "decoder",
            "state": "alive",
            "status": "gone",
            "schedule_version": 7,
            "running": 0,
            "free_slots": 32,
            "step_rate_s": None,
            "busy": None,
            "steps": 5,
            "group": [1],
            "heartbeat_age_s": 9.0,
        },
    ]
    point = {k: v for k, v in state.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {
        "now": 1002.0,
        "gateway": {
            "id": "g",
            "model": "m",
            "namespace": "ns",
            "in_flight": 0,
            "embedded": False,
            "heartbeat_timeout_s": 6.0,
        },
        "update": update,
        "state": state,
        "workers": workers,
        "dead": {
            "depth": 2,
            "reasons": [{"queue": "ns.encode", "reason": "undecodable: x", "count": 2}],
            "reasons_at": 1001.0,
        },
        "batches": [
            {"id": "batch_1", "status": "in_progress", "created_at": 990, "total": 10, "completed": 4, "failed": 1}
        ],
        "history": [{**point, "calibration_factor.throughput": 0.91, "at": 1001.0}],
        "timeline": [
            {
                "seq": 1,
                "kind": "search",
                "at": 1000.0,
                "version": 7,
                "reason": "drift",
                "outcome": "published: 12% more throughput",
            }
        ],
    }


async def test_the_page_shows_fields_it_does_not_know_the_alert_and_the_queues(artefacts):
    """The page against a state record with more fields than today's (the gateway's answer is
    stubbed in the browser: no mesh needed), on an open gateway (no key asked)."""
    files = resources.files("services.gateway.dashboard") / "static"
    body = json.dumps(extended_snapshot())

    async def answer(route) -> None:
        path = route.request.url.split("://", 1)[1].split("/", 1)[1].split("?")[0]
        if path == "admin/dashboard/state":
            await route.fulfill(status=200, content_type="application/json", body=body)
        elif path == "dashboard":
            await route.fulfill(
                status=200, content_type="text/html", body=(files / "index.html").read_text(), headers=PAGE_HEADERS
            )
        else:
            name = path.rsplit("/", 1)[1]
            await route.fulfill(
                status=200, content_type=STATIC[name], body=(files / name).read_text(), headers=PAGE_HEADERS
            )

    async with browser() as chromium:
        page = await (await chromium.new_context(viewport=DESKTOP)).new_page()
        errors = watch_console(page)
        await page.route("http://dashboard.test/**", answer)
        await page.goto("http://dashboard.test/dashboard")
        await page.locator("#board").wait_for(state="visible", timeout=WAIT_MS)
        await page.locator("#alert").filter(has_text="No schedule meets the latency bound of 1.5 s").wait_for()
        candidates = page.locator("#extra-candidates table")
        await candidates.wait_for()
        assert await candidates.locator("tbody tr").count() == 2
        # the search's reasoning reads at a glance: each schedule named, the pick marked, its figures
        # in view (not scrolled off beside a long schedule)
        chosen = candidates.locator("tbody tr.chosen")
        assert await chosen.count() == 1
        assert "waa-c B_E=4 B_D=32 encoders/decoders=1/2" in await chosen.inner_text()
        assert "97.5 %" in await chosen.inner_text() and "chosen" in await chosen.inner_text()
        assert "rra B_E=16 B_D=48 N_D=9" in await candidates.inner_text()
        assert await page.locator("#extra-candidates .scroll").evaluate("el => el.scrollWidth <= el.clientWidth")
        assert "1.12" in await page.locator("#extra-calibration").inner_text()
        schedule = await page.locator("#schedule").inner_text()
        assert "ttft slo s" in schedule and "0.5" in schedule and "attainment" in schedule
        assert "planned output" in await page.get_by_role("img", name="input: p50 40").get_attribute("aria-label")
        assert await page.locator("figcaption", has_text="calibration factor.throughput").count() == 1
        assert await page.locator("#workers tr.gone[data-worker=w2]").count() == 1
        assert await page.locator("#workers tr.draining[data-worker=w1] .badge.behind").count() == 1
        assert (await page.locator("#dead-depth").inner_text()) == "2"
        assert "undecodable: x" in await page.locator("#dead").inner_text()
        assert await page.get_by_label("progress of batch_1").get_attribute("value") == "5"
        assert "drift" in await page.locator("#timeline").inner_text()
        await no_sideways_scroll(page)
        await page.screenshot(path=str(artefacts / "dashboard-extended-fields.png"), full_page=True)
        assert errors == [], errors


async def test_the_page_on_a_mesh_of_processes_marks_a_killed_worker_gone(profile, artefacts):
    """The page on `exegpt up`: a scheduler, two tiny-llama workers and a gateway, each a process of
    its own, over the real RabbitMQ and Redis; a worker killed outright is marked gone and the one
    its supervisor starts in its place is listed live."""
    require_broker()
    namespace = f"d{uuid.uuid4().hex[:10]}"
    env = {
        "EXEGPT_THREADS": "1",
        "EXEGPT_DEVICE": "cpu",
        "EXEGPT_ADMIN_KEYS": ADMIN,
        "EXEGPT_API_KEYS": USER,
        "EXEGPT_HEARTBEAT_S": "0.5",
        "EXEGPT_HEARTBEAT_TIMEOUT_S": "2",
        "EXEGPT_PROFILE": str(profile),
        "EXEGPT_PRIOR": "S",
        "EXEGPT_PRIOR_SCALE": "0.05",
    }
    mesh = ProcessMesh(env)
    try:
        up = mesh.start(
            "up", "--model", MODEL, "--port", "0", "--namespace", namespace,
            "--amqp-url", AMQP_URL, "--redis-url", REDIS_URL, "--workers", "2",
        )  # fmt: skip
        url = (await asyncio.to_thread(up.wait_line, "ready mesh")).split()[-1]
        ready = [ln for ln in up.output if ln.startswith("[worker-") and "] ready " in ln]
        pids = {ln.split("]")[0][1:]: int(ln.split("-")[-2]) for ln in ready}
        assert sorted(pids) == ["worker-0", "worker-1"], ready
        async with browser() as chromium:
            page = await (await chromium.new_context(viewport=DESKTOP)).new_page()
            errors = watch_console(page)
            await page.goto(f"{url}/dashboard#key={ADMIN}")
            await page.locator("#board").wait_for(state="visible", timeout=WAIT_MS)
            await page.wait_for_function(
                "n => document.querySelectorAll('#workers tr.live').length === n", arg=2, timeout=WAIT_MS
            )
            live = await page.locator("#workers tr.live").evaluate_all("rows => rows.map(r => r.dataset.worker)")
            assert sorted(int(w.split("-")[-2]) for w in live) == sorted(pids.values())  # role-host-pid-tag
            # the schedule in force, as the admin API gives it (read again if a re-plan came between)
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as http:
                for attempt in range(3):
                    update = (await http.get("/admin/schedule")).json()["update"]
                    try:
                        await page.wait_for_function(
                            "([v, p]) => document.getElementById('schedule-version').textContent === v"
                            " && document.getElementById('schedule-policy').textContent === p",
                            arg=[f"v{update['version']}", update["schedule"]["policy"]],
                            timeout=WAIT_MS,
                        )
                        break
                    except playwright_api.TimeoutError:
                        if attempt == 2:
                            raise

            # `exegpt schedule pin` against the gateway process: on the page within two seconds
            code = await asyncio.to_thread(main, ["schedule", "pin", json.dumps(PINNED), "--url", url, "--key", ADMIN])
            pinned_at = time.monotonic()
            assert code == 0
            await page.wait_for_function(
                "() => document.getElementById('schedule-policy').textContent === 'static'"
                " && document.querySelector('#schedule-pinned .badge')?.textContent === 'pinned'",
                timeout=SHOWN_WITHIN_MS,
            )
            shown_ms = (time.monotonic() - pinned_at) * 1000
            assert shown_ms <= SHOWN_WITHIN_MS, shown_ms

            # a re-plan asked on the page appears on the timeline with its reason
            await page.get_by_role("button", name="Unpin the schedule").click()
            await confirm(page)
            await page.locator("#schedule-pinned").filter(has_text="no").wait_for(timeout=WAIT_MS)
            await ask_on_page(page, "Re-plan now, reason", "process mesh check", "Re-plan now")
            await (
                page.locator("#timeline li[data-kind=search]")
                .filter(has_text="asked: process mesh check")
                .wait_for(timeout=WAIT_MS)
            )

            # a worker process killed outright: marked gone; its replacement is listed live
            victim = pids["worker-1"]
            os.kill(victim, signal.SIGKILL)
            await page.locator(f"#workers tr.gone[data-worker*='-{victim}-']").wait_for(timeout=WAIT_MS)
            await asyncio.to_thread(up.wait_line, "[worker-1] ready worker")
            await page.wait_for_function(
                "n => document.querySelectorAll('#workers tr.live').length === n", arg=2, timeout=WAIT_MS
            )
            assert await page.locator(f"#workers tr.live[data-worker*='-{victim}-']").count() == 0
            await page.screenshot(path=str(artefacts / "dashboard-process-mesh.png"), full_page=True)
            assert errors == [], errors
        assert mesh.stop(up) == 0
    finally:
        mesh.close()
        await purge_namespace(MeshConfig(namespace=namespace, amqp_url=AMQP_URL, redis_url=REDIS_URL), LocalHub())
