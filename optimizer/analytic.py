"""Steady-state (saturated) predictions: the fast path the search evaluates.

Mean-field model: every step is costed at the workload's mean shapes (mean prompt, effective
attention length sqrt(E[in^2]), token-weighted mean decode context), batches in steady state
follow Little's law. Every function takes numpy arrays of control variables (broadcast
together) and returns one ``Predictions`` of arrays, so a search evaluates thousands of
schedules per call. ``optimizer.simulator`` checks these figures by running the policies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from optimizer.calibration import CalibrationTable
from optimizer.cluster import Cluster, allreduce_s, p2p_s
from optimizer.layout import PipelineLayout, build_layout
from optimizer.lengths import LengthDistribution, Workload
from optimizer.model import ModelShape
from optimizer.profile import ProfileSet, StepShape, Values
from optimizer.timing import PipelineTimer, max_slots, memory_per_device


@dataclass(frozen=True)
class Scenario:
    """What a plan is for: a model on ``devices`` devices of a cluster, under a workload."""

    model: ModelShape
    profile: ProfileSet
    cluster: Cluster
    workload: Workload
    devices: int
    group: tuple[int, ...] | None = None  # the workers' process groups: TP degree of each stage
    calibration: CalibrationTable | None = None  # corrections to the profile's step times (None: raw)

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"need at least one device, got {self.devices}")
        self.profile.layer_times(self.model.name, 1)  # raises when the model is not profiled
        if self.group is None and self.cluster.worker_group:
            object.__setattr__(self, "group", self.cluster.worker_group)
        if self.group is not None and max(self.group) not in self.profile.tp_degrees(self.model.name):
            raise ValueError(
                f"the workers are groups of shape tp={','.join(map(str, self.group))}, but the profile "
                f"has no rows for {self.model.name} at tp={max(self.group)} "
                f"(exegpt profile --tp-degrees 1,{max(self.group)})"
            )

    @property
    def worker_devices(self) -> int:
        """Devices one worker spans (``Schedule.worker_devices``); 0: pipelines over all devices.
        Workers that are process groups span the group's processes."""
        if self.group is not None:
            return sum(self.group)
        return self.cluster.worker_devices

    def group_tp(self) -> tuple[int, int] | None:
        """(TP degree, stages using it) of the workers' groups; None: the search chooses."""
        if self.group is None:
            return None
        k = max(self.group)
        return (k, self.group.count(k)) if k > 1 else (1, 0)

    @property
    def worker_count(self) -> int:
        """Workers the devices form (1: one pipeline over all of them)."""
        return self.devices // self.worker_devices if self.worker_devices else 1

    def tp_degrees(self) -> list[int]:
        if self.group is not None:  # the groups that exist fix the degree
            return [max(self.group)]
        span = self.worker_devices or self.devices
        return [
            k
            for k in self.profile.tp_degrees(self.model.name)
            if k <= span and (k == 1 or self.cluster.devices_per_node % k == 0)
        ]

    def layout(self, devices: int, tp: int, tp_stages: int, first_device: int = 0) -> PipelineLayout:
        """``devices`` in a pipeline, ``tp_stages`` stages of TP degree ``tp`` first, the layers
        assigned by the stages' speed (``layer_cost``), not searched."""
        key = ("layout", devices, tp, tp_stages, first_device)
        cache = self._cache()
        if key not in cache:
            cost = self.layer_cost() if 0 < tp_stages and tp > 1 else None
            cache[key] = build_layout(
                devices, tp, tp_stages, self.model.layers, self.model.prefill_layers, self.cluster, first_device, cost
            )
        layout: PipelineLayout = cache[key]
        return layout

    def layer_cost(self) -> dict[int, float]:
        """Seconds one decoder layer takes at each TP degree for a reference step (a decode
        iteration of ``REFERENCE_BATCH`` requests at the workload's mean context, with its two
        all-reduces): what places layers on stages of different TP degrees."""
        cache = self._cache()
        if "layer_cost" not in cache:
            stats = WorkloadStats(self.workload)
            shape = StepShape(
                decode_seqs=REFERENCE_BATCH,
                decode_ctx=stats.mean_ctx,
                enc_seq=stats.mean_in if self.model.encoder_layers else 0.0,
            )
            out = {}
            for k in self.profile.tp_degrees(self.model.name):
                ar = allreduce_s(self.cluster.intra_node, self.model.activation_bytes(REFERENCE_BATCH), k)
                out[k] = float(self.profile.layer_times(self.model.name, k).step_s(shape)) + 2 * ar
            cache["layer_cost"] = out
        cost: dict[int, float] = cache["layer_cost"]
        return cost

    def memo(self, key: Hashable) -> dict[Any, Any]:
        """A dict kept with this scenario under ``key``: what other modules compute once per scenario."""
        memo: dict[Any, Any] = self._cache().setdefault(key, {})
        return memo

    def _cache(self) -> dict[Any, Any]:
        cache = self.__dict__.get("_memo")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_memo", cache)
        return cache

    def timer(self, layout: PipelineLayout) -> PipelineTimer:
        times = {s.tp: self.profile.layer_times(self.model.name, s.tp) for s in layout.stages}
        last = layout.stages[-1].tp
        return PipelineTimer(layout, times, self.model, self.profile.step_s(self.model.name, last), self.calibration)


REFERENCE_BATCH = 32  # requests in the decode step that sets the layer cost per TP degree


@dataclass(frozen=True)
class WorkloadStats:
    workload: Workload

    @cached_property
    def mean_in(self) -> float:
        return self.workload.input.mean

    @cached_property
    def eff_in(self) -> float:
        return math.sqrt(self.workload.input.expect(lambda x: x * x))

    @cached_property
    def q99_in(self) -> int:
        return self.workload.input.quantile(0.99)

    @cached_property
    def mean_out(self) -> float:
        return self.workload.output.mean

    @property
    def mean_decode_iters(self) -> float:
        """E[o - 1]: prefill yields the first token."""
        return self.mean_out - 1.0

    @cached_property
    def o99(self) -> int:
        return self.workload.output.quantile(0.99)

    @cached_property
    def slot_tokens(self) -> float:
        """KV positions reserved per running request (99th-percentile input + output)."""
        return float(self.q99_in + self.o99)

    @cached_property
    def static_slot_tokens(self) -> float:
        return float(self.workload.input.maximum + self.workload.output.maximum)

    @cached_property
    def mean_ctx(self) -> float:
        """Token-weighted mean KV length over decode iterations: E[in] + E[o(o-1)/2] / E[o-1]."""
        tri = self.workload.output.expect(lambda o: o * (o - 1) / 2)
        return self.mean_in + tri / max(self.mean_decode_iters, 1e-9)

    def cycles(self, iters_per_cycle: npt.ArrayLike) -> np.ndarray:
        """E[ceil((o-1) / N_D)]: RRA cycles a request spends in the decode batch."""
        n = np.asarray(iters_per_cycle, dtype=float)
        values, inverse = np.unique(n, return_inverse=True)
        per = np.array([self.workload.output.expect(lambda o, k=k: np.ceil((o - 1) / k)) for k in values])
        return per[inverse].reshape(n.shape)

    def prefill(self, n: Values) -> StepShape:
        return StepShape(prefill_seqs=n, prefill_tokens=n * self.mean_in, prefill_seq=self.eff_in)

    def prefill_p99(self, n: Values) -> StepShape:
        """A prefill of ``n`` (at least one) requests, one of them at the 99th-percentile prompt
        length and the rest at the mean: the encode a p99-length request is part of."""
        n = np.maximum(np.asarray(n, dtype=float), 1.0)
        q = float(self.q99_in)
        sq = self.workload.input.expect(lambda x: x * x)
        return StepShape(
            prefill_seqs=n, prefill_tokens=(n - 1) * self.mean_in + q, prefill_seq=np.sqrt(((n - 1) * sq + q * q) / n)
        )

    def decode(self, b: Values, ctx: Values | None = None, model: ModelShape | None = None) -> StepShape:
        enc = self.mean_in if model is not None and model.encoder_layers else 0.0
        return StepShape(decode_seqs=b, decode_ctx=self.mean_ctx if ctx is None else ctx, enc_seq=enc)


@dataclass(frozen=True)
class Predictions:
    """Predicted figures; each field an array over the evaluated schedules."""

    throughput_seq_s: np.ndarray
    throughput_tok_s: np.ndarray
    latency_p99_s: np.ndarray  # generating a 99th-percentile-length output, from its encode
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    decode_batch: np.ndarray  # mean running decode batch
    decode_batch_peak: np.ndarray
    memory_per_device_bytes: np.ndarray
    feasible: np.ndarray  # fits in memory and makes progress

    def meets(self, latency_bound_s: float) -> np.ndarray:
        return self.feasible & (self.latency_p99_s <= latency_bound_s)

    def at(self, i: int | tuple[int | np.integer[Any], ...]) -> Predictions:
        return Predictions(**{k: np.asarray(v)[i] for k, v in self.__dict__.items()})


def replicated(p: Predictions, workers: int) -> Predictions:
    """``workers`` data-parallel copies of a one-worker prediction sharing one queue: throughput
    adds up; latency, batches and memory are each worker's."""
    return replace(p, throughput_seq_s=p.throughput_seq_s * workers, throughput_tok_s=p.throughput_tok_s * workers)


def _predictions(
    stats: WorkloadStats,
    thr: npt.ArrayLike,
    lat: npt.ArrayLike,
    ttft: npt.ArrayLike,
    tpot: npt.ArrayLike,
    batch: npt.ArrayLike,
    peak: npt.ArrayLike,
    mem: npt.ArrayLike,
    capacity: float,
) -> Predictions:
    arrays = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (thr, lat, ttft, tpot, batch, peak, mem)))
    thr, lat, ttft, tpot, batch, peak, mem = arrays
    ok = (mem <= capacity) & (thr > 0) & np.isfinite(lat)
    return Predictions(thr, thr * stats.mean_out, lat, ttft, tpot, batch, peak, mem, ok)


def _longest_decode(sc: Scenario, batch: np.ndarray) -> np.ndarray:
    """E[max of o-1] over ``batch`` requests: when N_D exceeds it, the running batch empties
    first and RRA encodes again early."""
    top = int(np.max(batch)) if np.size(batch) else 1
    size = 1 << max(top - 1, 0).bit_length()  # tables of powers of two, so that few are built
    table = _expected_max_table(sc.workload.output, size)[:top] - 1
    longest: np.ndarray = np.interp(batch, np.arange(1, top + 1), table)
    return longest


@lru_cache(maxsize=32)
def _expected_max_table(lengths: LengthDistribution, size: int) -> np.ndarray:
    """E[max of n draws] of ``lengths`` for n = 1..size (read-only)."""
    table = lengths.expected_max(np.arange(1, size + 1))
    table.flags.writeable = False
    return table


def rra(
    sc: Scenario,
    stats: WorkloadStats,
    layout: PipelineLayout,
    encode_batch: npt.ArrayLike,
    iters_per_encode: npt.ArrayLike,
    microbatches: Values,
    encode_microbatches: npt.ArrayLike = 1,
) -> Predictions:
    """Encode B_E (split into ``encode_microbatches`` micro-batches that follow each other
    through the pipeline), then N_D decode iterations over the running batch, on one pipeline.

    Steady state: each cycle adds B_E requests and each stays E[o-1] iterations, so the mean
    decode batch is B_E x E[o-1] / N_D (Little's law); N_D counts at most the expected longest
    decode of a batch, since an empty batch triggers the next encode.

    Latency (the paper's bound, in its worst position): a request at the 99th-percentile input
    and output length that arrives just after an encode began (it waits the N_D decode iterations
    to the next), is encoded in a batch with its own long prompt and finishes in the last
    micro-batch, interrupted by every encode of the set N_D while it decodes."""
    timer = sc.timer(layout)
    be = np.asarray(encode_batch, dtype=float)
    nd_set = np.asarray(iters_per_encode, dtype=float)
    nd = np.minimum(nd_set, np.maximum(_longest_decode(sc, be), 1.0))
    batch = be * stats.mean_decode_iters / nd
    t_enc = _on_unique(lambda b, m: timer.encode_s(stats.prefill(b), m), be, encode_microbatches)
    t_dec = timer.iteration_s(stats.decode(batch, model=sc.model), microbatches)
    cycle = t_enc + nd * t_dec
    d99 = stats.o99 - 1
    full = np.maximum(np.ceil(d99 / nd_set) - 1, 0)  # encodes that interrupt a p99-length request
    t_own = _on_unique(lambda b, m: timer.encode_s(stats.prefill_p99(b), m), be, encode_microbatches)
    lat = nd * t_dec + t_own + full * t_enc + d99 * t_dec  # arrived just after an encode began
    peak = be * stats.cycles(nd)
    mem = memory_per_device(layout, sc.model, whole_slots(peak), stats.slot_tokens)
    return _predictions(stats, be / cycle, lat, t_own, cycle / nd, batch, peak, mem, sc.cluster.usable_memory_bytes)


def rra_optimistic(
    sc: Scenario,
    stats: WorkloadStats,
    layout: PipelineLayout,
    lo: npt.ArrayLike,
    hi: npt.ArrayLike,
    iters_per_encode: npt.ArrayLike,
    microbatches: Values,
    encode_microbatches: npt.ArrayLike = 1,
) -> Predictions:
    """Bounds on ``rra`` over every encode batch in [lo, hi] (the other variables fixed): an upper
    bound on throughput and lower bounds on latency, peak batch and memory.

    Sound because every part is monotone: step times never fall when a step does more work (the
    profile's tables are non-decreasing and so is their interpolation; an encode's micro-batches
    are at most its prompts, which keeps the micro-batched encode non-decreasing in B_E), the
    effective N_D (capped by the expected longest decode, which grows with B_E) grows with B_E,
    so the decode batch B_E x E[o-1] / N_D is at least lo x E[o-1] / N_D(hi), a cycle takes at
    least t_enc(lo) + N_D(lo) x t_dec(that batch), and the peak batch B_E x E[ceil((o-1)/N_D)] is
    at least lo x E[ceil((o-1)/N_D(hi))]."""
    timer = sc.timer(layout)
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    nd_set = np.asarray(iters_per_encode, dtype=float)
    nd_lo = np.minimum(nd_set, np.maximum(_longest_decode(sc, lo), 1.0))
    nd_hi = np.minimum(nd_set, np.maximum(_longest_decode(sc, hi), 1.0))
    t_enc = _on_unique(lambda b, m: timer.encode_s(stats.prefill(b), m), lo, encode_microbatches)
    t_dec = timer.iteration_s(stats.decode(lo * stats.mean_decode_iters / nd_hi, model=sc.model), microbatches)
    cycle = t_enc + nd_lo * t_dec
    d99 = stats.o99 - 1
    full = np.maximum(np.ceil(d99 / nd_set) - 1, 0)
    t_own = _on_unique(lambda b, m: timer.encode_s(stats.prefill_p99(b), m), lo, encode_microbatches)
    lat = nd_lo * t_dec + t_own + full * t_enc + d99 * t_dec
    peak = lo * stats.cycles(nd_hi)
    mem = memory_per_device(layout, sc.model, whole_slots(peak), stats.slot_tokens)
    return _predictions(stats, hi / cycle, lat, t_own, t_dec, lo, peak, mem, sc.cluster.usable_memory_bytes)


def _on_unique(fn: Callable[..., npt.ArrayLike], *args: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``fn(*args)`` (elementwise over broadcast arrays) evaluated once per distinct combination
    of the arguments: a search's lines repeat the same encode under many other variables."""
    arrays = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in args))
    shape = arrays[0].shape
    if arrays[0].size < 64:
        return np.broadcast_to(fn(*arrays), shape)
    flat = [a.ravel() for a in arrays]
    # one integer key per combination (each argument's rank among its own values): sorting keys
    # is much cheaper than sorting rows of floats
    ranks = [np.unique(a, return_inverse=True) for a in flat]
    key = np.ravel_multi_index(tuple(inv.ravel() for _, inv in ranks), tuple(len(u) for u, _ in ranks))
    keys, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    values = np.broadcast_to(np.asarray(fn(*(a[first] for a in flat)), dtype=float), (len(keys),))
    return values[inverse.ravel()].reshape(shape)


def whole_slots(peak: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The request slots a worker holds for a predicted peak batch: whole requests, rounded up
    (what ``Schedule.decode_batch`` enforces, so memory is checked on it)."""
    return np.maximum(np.ceil(np.asarray(peak, dtype=float) - 1e-9), 1.0)


@dataclass(frozen=True)
class DecodeCurve:
    """A decoder pipeline's iteration time tabulated over integer batches 0..max (one micro-batch
    count), so WAA's steady state is solved by table look-ups instead of re-costing each probe."""

    batches: npt.NDArray[np.float64]
    seconds: npt.NDArray[np.float64]
    rate: npt.NDArray[np.float64]  # sequences/s the decoder sustains at each batch (made non-decreasing)

    @staticmethod
    def build(
        sc: Scenario, stats: WorkloadStats, layout: PipelineLayout, microbatches: int, max_batch: float
    ) -> DecodeCurve:
        b = np.arange(0, int(min(max(max_batch, 1), 1 << 16)) + 2, dtype=float)
        t = sc.timer(layout).iteration_s(stats.decode(np.maximum(b, 1e-9), model=sc.model), microbatches)
        rate = np.maximum.accumulate(b / (max(stats.mean_decode_iters, 1e-9) * t))
        return DecodeCurve(b, t, rate)

    def time_s(self, batch: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.interp(batch, self.batches, self.seconds)

    def rate_at(self, batch: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.interp(batch, self.batches, self.rate)

    def batch_for(self, rate: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Smallest batch sustaining ``rate`` (the steady-state decode batch, by Little's law)."""
        return np.interp(rate, self.rate, self.batches)


def decode_curves(
    sc: Scenario, stats: WorkloadStats, layout: PipelineLayout, microbatches: npt.ArrayLike
) -> dict[int, DecodeCurve]:
    slots = max_slots(layout, sc.model, stats.slot_tokens, sc.cluster.usable_memory_bytes)
    return {int(m): DecodeCurve.build(sc, stats, layout, int(m), slots) for m in np.unique(microbatches)}


def _per_micro(
    curves: dict[int, DecodeCurve],
    microbatches: npt.ArrayLike,
    fn: Callable[[DecodeCurve], npt.NDArray[np.float64]],
) -> npt.NDArray[np.float64]:
    m = np.asarray(microbatches)
    out = None
    for key, curve in curves.items():
        value = fn(curve)
        out = value if out is None else np.where(m == key, value, out)
    return cast("npt.NDArray[np.float64]", out)  # not None: there is a curve per micro-batch count


def waa(
    sc: Scenario,
    stats: WorkloadStats,
    enc: PipelineLayout,
    dec: PipelineLayout,
    encode_batch: npt.ArrayLike,
    decode_cap: npt.ArrayLike,
    microbatches: npt.ArrayLike,
    curves: dict[int, DecodeCurve] | None = None,
    encoders: int = 1,
    decoders: int = 1,
) -> Predictions:
    """Encoder and decoder pipelines run apart; encoded KV caches are handed to the decoders.

    Steady state: the rate is the least of the encoders' (``encoders`` pipelines ``enc``), the
    hand-off link's and the decoders' at their cap (``decoders`` pipelines ``dec``, each with
    its own batch); a decoder's batch then follows Little's law, B_D = rate / decoders x E[o-1]
    x T_iter(B_D). ``curves`` (from ``decode_curves``) may be passed to reuse the decoder tables."""
    curves = curves or decode_curves(sc, stats, dec, microbatches)
    et = sc.timer(enc)
    be = np.asarray(encode_batch, dtype=float)
    kv_req = sc.model.kv_bytes_per_request_layer(stats.mean_in, 0) * sc.model.layers
    link = sc.cluster.handoff_link(enc.stages[-1].first_device + enc.stages[-1].tp - 1, dec.stages[0].first_device)
    slots = max_slots(dec, sc.model, stats.slot_tokens, sc.cluster.usable_memory_bytes)
    cap = np.minimum(np.asarray(decode_cap, dtype=float), math.floor(slots + 1e-9) - be)  # whole slots
    lam_e = encoders * be / et.bottleneck_s(stats.prefill(be))
    lam_d = np.where(cap > 0, _per_micro(curves, microbatches, lambda c: c.rate_at(np.maximum(cap, 0))), 0.0)
    rate = np.minimum(np.minimum(lam_e, link.bandwidth_Bps / kv_req), decoders * lam_d)
    batch = np.minimum(_per_micro(curves, microbatches, lambda c: c.batch_for(rate / decoders)), np.maximum(cap, 0))
    t_it = _per_micro(curves, microbatches, lambda c: c.time_s(np.maximum(batch, 1e-9)))
    kv_own = kv_req * (be - 1) + sc.model.kv_bytes_per_request_layer(stats.q99_in, 0) * sc.model.layers
    t_enc = et.path_s(stats.prefill_p99(be)) + p2p_s(link, kv_own)  # its batch, its long prompt
    wait = et.bottleneck_s(stats.prefill(be))  # arrived just after an encode began
    lat = wait + t_enc + t_it + (stats.o99 - 1) * t_it  # and waits up to one iteration to merge
    enc_mem = memory_per_device(enc, sc.model, be * enc.depth, float(stats.q99_in))
    dec_mem = memory_per_device(dec, sc.model, whole_slots(batch + be), stats.slot_tokens)
    mem = np.maximum(np.where(cap > 0, dec_mem, np.inf), enc_mem)
    return _predictions(stats, rate, lat, t_enc, t_it, batch, batch + be, mem, sc.cluster.usable_memory_bytes)


def static(
    sc: Scenario, stats: WorkloadStats, layout: PipelineLayout, batch: npt.ArrayLike, microbatches: Values
) -> Predictions:
    """FasterTransformer-like: a fixed batch runs until its longest request ends; no early exit.

    Throughput counts the expected longest output of the batch; the latency figure is the batch
    run to the distribution's maximum output (what the bound is applied to)."""
    timer = sc.timer(layout)
    b = np.asarray(batch, dtype=float)
    longest = sc.workload.output.expected_max(b)
    t_enc = timer.path_s(stats.prefill(b))
    ctx = stats.mean_in + longest / 2
    t_it = timer.iteration_s(stats.decode(b, ctx, model=sc.model), microbatches)
    thr = b / (t_enc + (longest - 1) * t_it)
    lat = t_enc + (sc.workload.output.maximum - 1) * t_it
    mem = memory_per_device(layout, sc.model, b, stats.static_slot_tokens)
    return _predictions(stats, thr, lat, t_enc, t_it, b, b, mem, sc.cluster.usable_memory_bytes)


def continuous(
    sc: Scenario, stats: WorkloadStats, layout: PipelineLayout, batch: npt.ArrayLike, microbatches: Values
) -> Predictions:
    """Orca/vLLM-like iteration-level batching without chunked prefill: each iteration prefills
    the requests that replaced finished ones and decodes the running batch.

    Costed as RRA's steps are (the same bubbles and stalls): a prefill passes the pipeline as its
    own one-shot pass (``PipelineTimer.encode_s``: its micro-batches, at most one per prompt, fill
    and drain the pipeline) while the decode micro-batches wait, then the running batch decodes
    (``iteration_s``). In steady state B / E[o] requests start per iteration; they come in
    clumps: an iteration prefills when at least one request finished (probability
    1 - exp(-B / E[o]), finishes taken as Poisson), and then the ones that finished.
    Latency (worst position): a p99-length request (99th-percentile input and output) that
    arrives just after an iteration began waits for it, is prefilled in such a clump with its own
    long prompt, then decodes o99 - 1 iterations (its prefill yields the first token).
    Without micro-batches the engine runs a prefilling iteration as one pass over its prompts and
    decode rows (``optimizer.policies.fused_steps``): that iteration is costed on its whole shape,
    and the prefill's cost is what it adds to the decode iteration."""
    timer = sc.timer(layout)
    b = np.asarray(batch, dtype=float)
    new = b / stats.mean_out
    p_pre = -np.expm1(-new)  # share of iterations that prefill
    clump = new / np.maximum(p_pre, 1e-12)  # prompts per prefilling iteration
    dec = stats.decode(b - new, model=sc.model)
    t_dec = timer.iteration_s(dec, microbatches)
    fused = np.asarray(microbatches) == 1

    def prefilling(pre: StepShape) -> npt.NDArray[np.float64]:
        """A prefilling iteration of ``pre``'s prompts and the running batch."""
        whole = StepShape(
            pre.prefill_seqs, pre.prefill_tokens, pre.prefill_seq, dec.decode_seqs, dec.decode_ctx, dec.enc_seq
        )
        return np.where(fused, timer.iteration_s(whole, 1), timer.encode_s(pre, microbatches) + t_dec)

    t_pre = prefilling(stats.prefill(clump)) - t_dec
    t_it = p_pre * t_pre + t_dec
    t_own = prefilling(stats.prefill_p99(clump))
    mem = memory_per_device(layout, sc.model, whole_slots(b), stats.slot_tokens)
    lat = t_it + t_own + (stats.o99 - 1) * t_it  # arrived just after an iteration began
    return _predictions(
        stats, b / (stats.mean_out * t_it), lat, t_own, t_it, b - new, b, mem, sc.cluster.usable_memory_bytes
    )


def mixed(
    sc: Scenario, stats: WorkloadStats, layout: PipelineLayout, batch: npt.ArrayLike, chunk_tokens: npt.ArrayLike
) -> Predictions:
    """Sarathi-style mixed steps (``optimizer.policies.MixedPolicy``): every step decodes the
    running batch and prefills prompt chunks in the tokens left of ``chunk_tokens`` (C), in one
    pass (the engine runs decode rows and chunks in one forward; no micro-batches), so the step
    is costed on its whole shape (``PipelineTimer.iteration_s`` of one micro-batch: its pipeline
    path, every stage waiting for the one before).

    Steady state: λ requests start per step; each holds a slot about E[o] steps and needs E[in]
    prompt tokens and E[o] - 1 decode tokens, so λ = min(B / E[o], C / (E[in] + E[o] - 1)) (the
    slots or the token budget bind). A step decodes b = λ (E[o] - 1) requests and prefills
    λ E[in] prompt tokens, whose attention is λ whole prompts' (a prompt's chunks add up to its
    attention). Every part grows with B, so latency, memory and the cost B / throughput never
    fall as B grows (the search's ``cost`` family).
    Latency (worst position): a p99-length request arrives just after a step began and waits for
    it; its prompt of q99 tokens takes ceil(q99 / (C - b)) steps (the budget left beside the
    decodes), the last giving its first token, then o99 - 1 decode steps. B >= C is no schedule."""
    timer = sc.timer(layout)
    b = np.asarray(batch, dtype=float)
    c = np.asarray(chunk_tokens, dtype=float)
    starts = np.minimum(b / stats.mean_out, c / (stats.mean_in + stats.mean_decode_iters))
    decoded = starts * stats.mean_decode_iters
    shape = StepShape(
        prefill_seqs=starts,
        prefill_tokens=starts * stats.mean_in,
        prefill_seq=stats.eff_in,
        decode_seqs=decoded,
        decode_ctx=stats.mean_ctx,
    )
    t = timer.iteration_s(shape, 1)
    own = np.ceil(stats.q99_in / np.maximum(c - decoded, 1e-9))  # steps prefilling a p99 prompt
    ttft = (1 + own) * t
    lat = np.where(b < c, ttft + (stats.o99 - 1) * t, np.inf)
    mem = memory_per_device(layout, sc.model, whole_slots(b), stats.slot_tokens)
    return _predictions(stats, starts / t, lat, ttft, t, decoded, b, mem, sc.cluster.usable_memory_bytes)
