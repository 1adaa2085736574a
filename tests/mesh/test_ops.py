"""Operations routes: the ops port of workers and schedulers, the gateway's health routes, the
metrics every process exports, and the Grafana dashboard's queries against them."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.names import Names
from common.transport.connect import open_transports
from optimizer.schedule import Schedule
from services.ops import OpsServer, roles_covered, transport_checks
from services.scheduler.gauges import SchedulerMetrics
from tests.mesh.conftest import running_mesh, until
from tests.mesh.fake_engine import FakeEngine

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "exegpt-dashboard.json"
FAKE = "tests.mesh.fake_engine:load"
WAA = Schedule(policy="waa-c", num_devices=2, encode_batch=4, decode_batch=8, encoder_devices=1, decoder_devices=1)


@pytest.fixture
def config(mesh_config, cleanup):
    return mesh_config.model_copy(update={"model": FAKE})


def sample_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


# --- the ops server alone ----------------------------------------------------------------------


async def test_ops_server_routes() -> None:
    state = {"ready": False}

    async def render() -> bytes:
        return b"# TYPE exegpt_x gauge\nexegpt_x 1.0\n"

    async def checks() -> dict[str, bool]:
        return {"serving": state["ready"], "broker": True}

    ops = OpsServer(render, checks)
    url = await ops.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.get("/health/live")).json() == {"status": "live"}
            not_ready = await client.get("/health/ready")
            assert not_ready.status_code == 503 and int(not_ready.headers["retry-after"]) > 0
            assert not_ready.json() == {"status": "not ready", "checks": {"serving": False, "broker": True}}
            state["ready"] = True
            assert (await client.get("/health/ready")).status_code == 200
            metrics = await client.get("/metrics")
            assert metrics.headers["content-type"].startswith("text/plain")
            assert sample_names(metrics.text) == {"exegpt_x"}
            wrong = await client.post("/metrics")
            assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
            assert (await client.get("/nowhere")).status_code == 404
            head = await client.head("/health/live")
            assert head.status_code == 200 and head.content == b""
    finally:
        await ops.close()


async def test_ops_port_taken_is_a_clear_error() -> None:
    async def nothing() -> bytes:
        return b""

    async def none() -> dict[str, bool]:
        return {}

    first = OpsServer(nothing, none)
    url = await first.start("127.0.0.1", 0)
    try:
        with pytest.raises(ValueError, match="ops port: cannot listen"):
            await OpsServer(nothing, none).start("127.0.0.1", int(url.rsplit(":", 1)[1]))
    finally:
        await first.close()


def test_roles_covered() -> None:
    class Assignment:
        def __init__(self, role: str) -> None:
            self.role = role

    class Update:
        def __init__(self, schedule: Schedule, *roles: str) -> None:
            self.schedule, self.allocation = schedule, tuple(Assignment(r) for r in roles)

    rra = Schedule(policy="rra", num_devices=1, encode_batch=4, decode_batch=8)
    assert not roles_covered(None)
    assert not roles_covered(Update(rra))
    assert roles_covered(Update(rra, "worker"))
    assert not roles_covered(Update(WAA, "encoder"))
    assert roles_covered(Update(WAA, "encoder", "decoder", "decoder"))


# --- checks against the transports -------------------------------------------------------------


async def test_transport_checks(config, hub, monkeypatch) -> None:
    names = Names(config.namespace)
    transports = await open_transports(config, names, hub)
    try:
        assert await transport_checks(transports, names) == {"broker": True, "store": True}
    finally:
        await transports.close()

    class Hangs:  # a broker that never answers, a store that refuses
        async def queue_depth(self, queue: str) -> int:
            await asyncio.Event().wait()
            return 0

        async def get(self, key: str) -> bytes:
            raise ConnectionError("refused")

    class Down:
        bus, store = Hangs(), Hangs()

    monkeypatch.setattr("services.ops.CHECK_TIMEOUT_S", 0.05)
    assert await transport_checks(Down(), names) == {"broker": False, "store": False}


# --- a running mesh ----------------------------------------------------------------------------


async def test_gateway_ready_needs_workers_for_each_role(config, hub) -> None:
    async with running_mesh(config, hub, FakeEngine, workers=2) as m:
        assert (await m.client.get("/health/live")).status_code == 200
        ready = await m.client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"broker": True, "store": True, "routes": True, "workers": True}
        await m.pin(WAA)
        assert (await m.client.get("/health/ready")).status_code == 200  # one encoder, one decoder
        # the workers go quiet: the scheduler's next allocation has none, and the gateway is not ready
        for worker in m.mesh.workers:
            worker.stop()
        scheduler = m.mesh.scheduler
        await asyncio.wait_for(asyncio.gather(*m.mesh.tasks[1:], return_exceptions=True), 30)
        scheduler.heard.clear()
        scheduler.workers.clear()
        await scheduler.reconcile()
        gone = await m.client.get("/health/ready")
        assert gone.status_code == 503 and gone.headers["retry-after"]
        assert gone.json()["checks"]["workers"] is False


async def test_worker_metrics_follow_its_steps(config, hub) -> None:
    async with running_mesh(config, hub, FakeEngine, workers=1) as m:
        worker = m.mesh.workers[0]
        before = worker.metrics.render().decode()
        assert 'exegpt_worker_info{role="worker"' in before
        response = await m.client.post(
            "/v1/completions", json={"model": FAKE, "prompt": "one two three", "max_tokens": 5}
        )
        assert response.status_code == 200, response.text
        if worker.held:
            await until(lambda: not worker.held, [worker.changed], 10)
        families = {f.name: f for f in text_string_to_metric_families(worker.metrics.render().decode())}
        generated = families["exegpt_worker_generated_tokens"].samples
        assert sum(s.value for s in generated if s.name.endswith("_total")) == 5
        steps = {
            s.labels["phase"]: s.value for s in families["exegpt_worker_steps"].samples if s.name.endswith("_total")
        }
        assert sum(steps.values()) == 5  # one step prefills (and gives the first token), four decode
        batch = [s for s in families["exegpt_worker_batch_size"].samples if s.name.endswith("_count")]
        assert {s.labels["phase"] for s in batch} == {"encode", "decode"}
        finished = [
            s
            for s in families["exegpt_worker_requests"].samples
            if s.name.endswith("_total") and s.labels["outcome"] == "finished"
        ]
        assert finished and finished[0].value == 1
        version = families["exegpt_worker_schedule_version"].samples[0].value
        assert version == worker.follower.version >= 1


async def test_worker_metrics_count_the_running_requests_kv(config, hub) -> None:
    """A scrape while requests run: their KV tokens (prompt + generated) and the running count."""
    from optimizer.policies import RunningRequest

    async with running_mesh(config, hub, FakeEngine, workers=1) as m:
        worker = m.mesh.workers[0]
        worker.driver.running["a"] = RunningRequest("a", 10, 3)
        worker.driver.running["b"] = RunningRequest("b", 5, 1)
        try:
            families = {f.name: f for f in text_string_to_metric_families(worker.metrics.render().decode())}
        finally:
            worker.driver.running.clear()
        assert families["exegpt_worker_kv_cache_tokens"].samples[0].value == 19
        assert families["exegpt_worker_requests_running"].samples[0].value == 2


async def test_scheduler_metrics_only_lead_while_leading(config, hub) -> None:
    async with running_mesh(config, hub, FakeEngine, workers=1) as m:
        scheduler = m.mesh.scheduler
        await scheduler.write_state(time.time())
        names = sample_names(SchedulerMetrics(scheduler).render().decode())
        assert {"exegpt_scheduler_leader", "exegpt_schedule_version", "exegpt_scheduler_workers"} <= names
        text = SchedulerMetrics(scheduler).render().decode()
        assert "exegpt_scheduler_leader 1.0" in text
        assert 'exegpt_scheduler_workers_heard{role="worker"} 1.0' in text


# --- the dashboard -----------------------------------------------------------------------------


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 20
    return {name for expr in exprs for name in re.findall(r"\bexegpt_[a-z0-9_]+", expr)}


async def test_every_dashboard_query_names_an_exported_metric(config, hub) -> None:
    """Run a mesh under load, scrape each kind of process, and find every metric the dashboard
    queries among the samples they export."""
    import engine

    config = config.model_copy(update={"model": "tiny-llama", "latency_bound_s": 30.0})
    async with running_mesh(config, hub, lambda: engine.load_engine("tiny-llama"), workers=1) as m:
        answers = await asyncio.gather(
            *(
                m.client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "a b c", "max_tokens": 4})
                for _ in range(4)
            )
        )
        assert all(a.status_code == 200 for a in answers)
        worker = m.mesh.workers[0]
        if worker.held:
            await until(lambda: not worker.held, [worker.changed], 10)
        await m.mesh.scheduler.write_state(time.time())
        gateway = (await m.client.get("/metrics")).text  # embedded: scheduler and worker included
        exported = sample_names(gateway)
        exported |= sample_names(worker.metrics.render().decode())
        exported |= sample_names(SchedulerMetrics(m.mesh.scheduler).render().decode())
    queried = dashboard_metrics()
    missing = sorted(queried - exported)
    assert not missing, f"the dashboard queries metrics no process exports: {missing}"
    for required in (
        "exegpt_requests_total",
        "exegpt_ttft_seconds_bucket",
        "exegpt_queue_depth",
        "exegpt_worker_batch_size_sum",
        "exegpt_worker_step_seconds_count",
        "exegpt_worker_kv_cache_used_bytes",
        "exegpt_schedule_version",
        "exegpt_schedule_info",
        "exegpt_schedule_predicted_throughput",
        "exegpt_schedule_observed_throughput",
    ):
        assert required in queried, f"the dashboard lacks {required}"
