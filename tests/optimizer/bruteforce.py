"""A brute-force enumerator of raw schedule fields, written apart from ``optimizer.search``.

It shares nothing with the search's families: it walks every combination of the ``Schedule``
fields the space allows (as docs/optimizer.md states the space), builds each ``Schedule``, takes
its pipelines from the simulator's ``worker_layouts`` and costs it with the analytic model. Only
the batch variable of a combination is evaluated as one array (the same formulas, fewer calls).
"""

from __future__ import annotations

import itertools

import numpy as np

from optimizer import analytic
from optimizer.analytic import Scenario, WorkloadStats
from optimizer.schedule import Schedule
from optimizer.simulator import worker_layouts


def _depth(span: int, k: int, s: int) -> int:
    return span - s * (k - 1)


def _tp_options(sc: Scenario, span: int):
    """(k, stages of degree k) a pipeline of ``span`` devices may use."""
    out = [(1, 0)]
    for k in sc.profile.tp_degrees(sc.model.name):
        if k > 1 and k <= span and sc.cluster.devices_per_node % k == 0:
            out += [(k, s) for s in range(1, span // k + 1)]
    limit = min(sc.model.layers, sc.model.prefill_layers)
    return [(k, s) for k, s in out if _depth(span, k, s) <= limit]


def _spans(sc: Scenario) -> list[int]:
    """0 (one pipeline) and every replica size whose replicas are alike."""
    node = sc.cluster.devices_per_node
    return [0] + [w for w in range(1, sc.devices) if sc.devices % w == 0 and (node % w == 0 or w % node == 0)]


def _ok(p, bound):
    return np.asarray(p.feasible & (p.latency_p99_s <= bound))


def best_throughput(sc: Scenario, bound: float, policies, space) -> float:
    """Most predicted throughput of any schedule of the space meeting ``bound`` (0: none)."""
    stats = WorkloadStats(sc.workload)
    best = 0.0

    def offer(p):
        nonlocal best
        thr = np.where(_ok(p, bound), p.throughput_seq_s, 0.0)
        best = max(best, float(np.max(thr)) if np.size(thr) else 0.0)

    for w in _spans(sc):
        span = w or sc.devices
        workers = sc.devices // span
        for k, s in _tp_options(sc, span):
            depth = _depth(span, k, s)
            micro = [m for m in space.microbatches if m == 1 or m <= depth]
            base = dict(tp_degree=k, tp_stages=s, num_devices=sc.devices, decoder_devices=sc.devices, worker_devices=w)
            for m in micro:
                if "static" in policies:
                    sched = Schedule("static", decode_microbatches=m, **base)
                    b = np.arange(1, space.static_max_batch + 1)
                    offer(analytic.replicated(analytic.static(sc, stats, worker_layouts(sc, sched)[0], b, m), workers))
                if "continuous" in policies:
                    sched = Schedule("continuous", decode_microbatches=m, **base)
                    b = np.arange(1, space.continuous_max_batch + 1)
                    offer(
                        analytic.replicated(analytic.continuous(sc, stats, worker_layouts(sc, sched)[0], b, m), workers)
                    )
                if "mixed" in policies and span == 1 and not sc.model.encoder_layers and m == 1:
                    sched = Schedule("mixed", decode_batch=1, chunk_tokens=2, **base)
                    b = np.arange(1, space.mixed_max_batch + 1)[:, None]
                    c = np.asarray(space.chunk_tokens)[None, :]
                    offer(analytic.replicated(analytic.mixed(sc, stats, worker_layouts(sc, sched)[0], b, c), workers))
                if "rra" in policies:
                    emicro = [x for x in space.encode_microbatches if x == 1 or x <= depth]
                    nds = [n for n in space.iters_per_encode if n <= max(sc.workload.output.maximum - 1, 1)]
                    for me, nd in itertools.product(emicro, nds):
                        sched = Schedule(
                            "rra", decode_microbatches=m, encode_microbatches=me, decode_iters_per_encode=nd, **base
                        )
                        b = np.arange(1, space.max_encode_batch + 1)
                        offer(
                            analytic.replicated(
                                analytic.rra(sc, stats, worker_layouts(sc, sched)[0], b, nd, m, me), workers
                            )
                        )
    if any(p.startswith("waa") for p in policies):
        best = max(best, _waa_best(sc, stats, bound, space))
    return best


def _waa_best(sc: Scenario, stats: WorkloadStats, bound: float, space) -> float:
    best = 0.0
    caps = np.asarray(space.decode_caps, dtype=float)
    for w in _spans(sc):
        for k in sc.profile.tp_degrees(sc.model.name):
            if k > 1 and sc.cluster.devices_per_node % k:
                continue
            if w and w % k:
                continue
            unit = w or k
            for e in range(unit, sc.devices - unit + 1, unit):
                d = sc.devices - e
                if w and d % w:
                    continue
                es, ds = w or e, w or d
                if k > 1 and (es % k or ds % k):
                    continue
                limit = min(sc.model.layers, sc.model.prefill_layers)
                for se in range(0, es // k + 1) if k > 1 else [0]:
                    for sd in range(0, ds // k + 1) if k > 1 else [0]:
                        if k > 1 and se == 0 and sd == 0:
                            continue
                        if _depth(es, k, se) > limit or _depth(ds, k, sd) > limit:
                            continue
                        sched = Schedule(
                            "waa-c",
                            num_devices=sc.devices,
                            encoder_devices=e,
                            decoder_devices=d,
                            tp_degree=k,
                            tp_stages=sd,
                            encoder_tp_stages=se,
                            worker_devices=w,
                        )
                        enc, dec = worker_layouts(sc, sched)
                        for m in [m for m in space.microbatches if m == 1 or m <= dec.depth]:
                            be = np.arange(1, space.waa_max_encode_batch + 1, dtype=float)[:, None]
                            p = analytic.waa(
                                sc, stats, enc, dec, be, caps[None, :], m, encoders=e // es, decoders=d // ds
                            )
                            thr = np.where(_ok(p, bound), p.throughput_seq_s, 0.0)
                            best = max(best, float(np.max(thr)))
    return best
