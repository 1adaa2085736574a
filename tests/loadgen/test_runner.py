import asyncio

import numpy as np
import pytest

from loadgen.client import RequestSpec
from loadgen.metrics import RequestRecord
from loadgen.runner import Workload, relative_clock, run_workload


def specs(n):
    return tuple(RequestSpec(i, "p", 4, 2) for i in range(n))


def instant_sender(clock, log):
    async def send(spec):
        t = clock()
        log.append((spec.index, t))
        return RequestRecord(spec.index, t, t, spec.input_tokens, 2, (t, t))

    return send


async def test_open_loop_sends_at_the_offsets_in_order():
    clock, log = relative_clock(), []
    offsets = np.array([0.0, 0.02, 0.04, 0.06])
    outcome = await run_workload(
        Workload(specs(4), offsets_s=offsets), instant_sender(clock, log), clock, max_duration_s=10
    )
    assert [i for i, _ in log] == [0, 1, 2, 3]
    assert all(t >= off for (_, t), off in zip(log, offsets))
    assert len(outcome.records) == 4 and outcome.not_sent == 0 and not outcome.hit_deadline


async def test_closed_loop_never_exceeds_its_concurrency():
    clock = relative_clock()
    inflight, peak = 0, 0

    async def send(spec):
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(0)  # let the other workers start theirs
        inflight -= 1
        return RequestRecord(spec.index, 0, 0, 1, 1, (0,))

    outcome = await run_workload(Workload(specs(9), concurrency=3), send, clock, 10)
    assert peak == 3 and sorted(r.index for r in outcome.records) == list(range(9))


async def test_deadline_aborts_inflight_and_counts_unsent():
    clock, never = relative_clock(), asyncio.Event()
    seen = []

    async def send(spec):
        await never.wait()  # a server that never answers
        raise AssertionError("unreachable")

    offsets = np.array([0.0, 0.0, 30.0])  # the third is due long after the deadline
    outcome = await run_workload(Workload(specs(3), offsets_s=offsets), send, clock, 0.2, on_record=seen.append)
    assert outcome.hit_deadline and outcome.not_sent == 1
    assert [r.error for r in outcome.records] == ["aborted", "aborted"]
    assert all(r.end_s >= 0.2 for r in outcome.records) and len(seen) == 2


def test_workload_is_open_or_closed():
    with pytest.raises(ValueError):
        Workload(specs(1))
    with pytest.raises(ValueError):
        Workload(specs(1), offsets_s=np.zeros(1), concurrency=1)
    with pytest.raises(ValueError):
        Workload(specs(2), offsets_s=np.zeros(1))


async def test_a_failing_send_is_recorded_not_fatal():
    clock = relative_clock()

    async def send(spec):
        if spec.index == 1:
            raise KeyError("bug")
        return RequestRecord(spec.index, 0, 0, 1, 1, (0,))

    outcome = await run_workload(Workload(specs(3), concurrency=2), send, clock, 10)
    assert [r.error for r in outcome.records] == [None, "client_KeyError", None]
