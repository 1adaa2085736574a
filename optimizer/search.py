"""XScheduler: branch-and-bound over the control variables, and the exhaustive reference.

The space is split into *families* (a policy at one TP layout, and for WAA one worker split).
Inside a family, each *line* fixes the other variables and leaves one batch variable free:
RRA fixes micro-batches and N_D and frees B_E; WAA fixes micro-batches and B_E and frees the
decode cap B_D (an index into ``SearchSpace.decode_caps``); the baselines free their batch.
Along a line, latency, memory and throughput all grow with the batch (within tolerance), so the
best point of a line is its largest batch that meets the latency bound and fits memory.

Branch and bound:
1. Bound: a line's best throughput over a geometric sample of its batches (1, 2, 4, ..., max),
   ignoring latency and memory, bounds the line (throughput grows with the batch, within
   tolerance); a family's bound is the best of its lines.
2. Families are visited best bound first; a family or line whose bound is at most
   (1 + eps_t) x the incumbent is pruned, and so is a line whose latency at batch 1, less eps_l
   (the slack allowed in latency's monotonicity), already exceeds the bound.
3. Surviving lines are bisected in lockstep (one vectorised evaluation per round) for the largest
   batch that meets the bound and fits memory. The ``window`` batches on either side of that
   point are then evaluated (throughput and latency are monotone only within tolerance) and the
   best that meets the bound is the line's answer.
The exhaustive search evaluates every batch of every line of every family.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from optimizer import analytic
from optimizer.analytic import Predictions, Scenario, WorkloadStats
from optimizer.layout import PipelineLayout
from optimizer.schedule import Schedule

SEARCH_POLICIES = ("rra", "waa-c", "waa-m")
BASELINES = ("static", "continuous")


@dataclass(frozen=True)
class SearchSpace:
    """The discrete space both searches cover."""

    max_encode_batch: int = 256  # RRA's B_E
    waa_max_encode_batch: int = 128
    static_max_batch: int = 512
    continuous_max_batch: int = 1024
    iters_per_encode: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48,
                                         64, 80, 96, 128)
    decode_caps: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768,
                                    1024, 1536, 2048, 3072, 4096)
    microbatches: tuple[int, ...] = (1, 2, 4, 8, 16)
    max_decode_batch: float = math.inf  # a worker's running batch (RRA's peak included) at most this

    def __post_init__(self) -> None:
        sizes = (self.max_encode_batch, self.waa_max_encode_batch, self.static_max_batch,
                 self.continuous_max_batch)
        if min(sizes) < 1 or not self.iters_per_encode or not self.decode_caps or not self.microbatches:
            raise ValueError("search space needs positive batch limits and non-empty value lists")

    def capped(self, max_batch: int) -> "SearchSpace":
        """The same space with every batch (B_E, B_D, static and continuous batches) at most
        ``max_batch``: what a profile measured, or what a worker may hold."""
        top = max(int(max_batch), 1)
        caps = tuple(c for c in self.decode_caps if c < top) + (top,)
        return replace(self, max_encode_batch=min(self.max_encode_batch, top),
                       waa_max_encode_batch=min(self.waa_max_encode_batch, top),
                       static_max_batch=min(self.static_max_batch, top),
                       continuous_max_batch=min(self.continuous_max_batch, top), decode_caps=caps,
                       max_decode_batch=min(self.max_decode_batch, top))


@dataclass(frozen=True)
class Tolerances:
    eps_t: float = 0.005  # prune bounds within this fraction of the incumbent's throughput
    eps_l: float = 0.03  # latency may fall by this fraction as a batch grows (answers meet the bound)
    window: int = 6  # batches evaluated on each side of the bisection's end

    def __post_init__(self) -> None:
        if self.eps_t < 0 or self.eps_l < 0 or self.window < 1:
            raise ValueError("tolerances must be >= 0 and window >= 1")


@dataclass(frozen=True)
class Figures:
    """Predicted figures of one schedule."""

    throughput_seq_s: float
    throughput_tok_s: float
    latency_p99_s: float
    ttft_s: float
    tpot_s: float
    decode_batch: float
    decode_batch_peak: float
    memory_per_device_bytes: float

    @staticmethod
    def of(p: Predictions) -> "Figures":
        return Figures(*(float(getattr(p, f)) for f in Figures.__dataclass_fields__))


@dataclass(frozen=True)
class Candidate:
    schedule: Schedule
    figures: Figures


@dataclass(frozen=True)
class SearchResult:
    best: Candidate | None  # None: nothing meets the bound
    evaluations: int  # schedules evaluated
    families: int
    families_pruned: int


@dataclass(frozen=True)
class Family:
    """One policy at one layout: lines of fixed variables, a free batch variable 1..max_batch."""

    policy: str
    max_batch: int
    lines: dict[str, np.ndarray]  # name -> one value per line
    evaluate: Callable[..., Predictions]  # (batch array, **lines broadcast) -> Predictions
    schedule: Callable[..., Schedule]  # (batch, figures, **line values) -> Schedule
    max_decode_batch: float = math.inf  # schedules whose running batch would exceed it are infeasible

    @property
    def size(self) -> int:
        return len(next(iter(self.lines.values())))

    def run(self, batch: np.ndarray, rows: np.ndarray) -> Predictions:
        """Evaluate lines ``rows`` at ``batch`` (shape (len(rows),) or (len(rows), k))."""
        extra = (slice(None),) + (None,) * (batch.ndim - 1)
        p = self.evaluate(batch, **{k: v[rows][extra] for k, v in self.lines.items()})
        if math.isinf(self.max_decode_batch):
            return p
        return replace(p, feasible=p.feasible & (p.decode_batch_peak <= self.max_decode_batch + 1e-9))

    def candidate(self, row: int, batch: int, p: Predictions) -> Candidate:
        fig = Figures.of(p)
        values = {k: int(v[row]) for k, v in self.lines.items()}
        return Candidate(self.schedule(batch, fig, **values), fig)


def _grid(**axes) -> dict[str, np.ndarray]:
    names = list(axes)
    combos = list(itertools.product(*axes.values()))
    return {n: np.array([c[i] for c in combos]) for i, n in enumerate(names)}


def _micro(space: SearchSpace, depth: int) -> list[int]:
    return [m for m in space.microbatches if m == 1 or m <= depth]


def tp_configs(sc: Scenario, devices: int | None = None) -> list[tuple[int, int]]:
    """(TP degree, stages using it) for a pipeline of ``devices`` (default: all), partial TP
    included; (1, 0) is plain pipelining. A layout needs no more stages than the model has layers."""
    n = devices or sc.devices
    fixed = sc.group_tp()
    if fixed is not None:  # workers are process groups of one shape: plan within it
        return [fixed]
    configs = [(1, 0)] + [(k, s) for k in sc.tp_degrees() if k > 1 for s in range(1, n // k + 1)]
    depth_limit = min(sc.model.layers, sc.model.prefill_layers)
    return [(k, s) for k, s in configs if n - s * (k - 1) <= depth_limit]


def _slots(f: "Figures") -> int:
    """The decode batch a worker enforces: the predicted peak, rounded up."""
    return max(math.ceil(f.decode_batch_peak - 1e-9), 1)


def _single_families(sc: Scenario, stats: WorkloadStats, space: SearchSpace, policy: str) -> list[Family]:
    """One pipeline over all devices, or (``sc.worker_devices``) data-parallel workers."""
    fams = []
    span = sc.worker_devices or sc.devices
    for k, s in tp_configs(sc, span):
        layout = sc.layout(span, k, s)
        common = dict(tp_degree=k, tp_stages=s, num_devices=sc.devices, decoder_devices=sc.devices,
                      worker_devices=sc.worker_devices)
        fams.append(_single_family(sc, stats, space, policy, layout, common))
    return fams


def _single_family(sc, stats, space, policy, layout: PipelineLayout, common) -> Family:
    micro = _micro(space, layout.depth)
    n = sc.worker_count
    expect = dict(mean_input_len=stats.mean_in)
    if policy == "rra":
        nds = [n for n in space.iters_per_encode if n <= max(sc.workload.output.maximum - 1, 1)]
        return Family(
            "rra", space.max_encode_batch, _grid(m=micro, nd=nds),
            lambda b, m, nd: analytic.replicated(analytic.rra(sc, stats, layout, b, nd, m), n),
            lambda b, f, m, nd: Schedule("rra", encode_batch=b, decode_batch=_slots(f), decode_microbatches=m,
                                         decode_iters_per_encode=nd, mean_decode_batch=f.decode_batch,
                                         **expect, **common))
    if policy == "static":
        return Family(
            "static", space.static_max_batch, _grid(m=micro),
            lambda b, m: analytic.replicated(analytic.static(sc, stats, layout, b, m), n),
            lambda b, f, m: Schedule("static", encode_batch=b, decode_batch=b, decode_microbatches=m, **common))
    return Family(
        "continuous", space.continuous_max_batch, _grid(m=micro),
        lambda b, m: analytic.replicated(analytic.continuous(sc, stats, layout, b, m), n),
        lambda b, f, m: Schedule("continuous", encode_batch=b, decode_batch=b, decode_microbatches=m, **common))


def waa_split(sc: Scenario, stats: WorkloadStats, policy: str, tp: int) -> int:
    """Encoder devices for WAA-C (compute-proportional) or WAA-M (memory-proportional), a
    multiple of ``tp`` (the TP degree, or the devices of one worker).

    Shares are taken at a reference operating point: 16 requests encoded per decode iteration
    (so a decode batch of 16 x E[o-1]), per-request work on one device."""
    ref_e, ref_d = 16.0, 16.0 * max(stats.mean_decode_iters, 1.0)
    if policy == "waa-c":
        one = sc.timer(sc.layout(1, 1, 0))
        enc = float(one.path_s(stats.prefill(ref_e))) / ref_e
        dec = stats.mean_decode_iters * float(one.path_s(stats.decode(ref_d, model=sc.model))) / ref_d
    else:
        layers = sc.model.layers
        weights = layers * sc.model.decoder_layer_weight_bytes()
        kv = sc.model.kv_bytes_per_token_layer * layers
        enc = weights + ref_e * stats.q99_in * kv
        dec = weights + ref_d * stats.slot_tokens * kv
    share = enc / (enc + dec)
    return int(min(max(round(sc.devices * share / tp), 1), sc.devices // tp - 1) * tp)


def _waa_families(sc: Scenario, stats: WorkloadStats, space: SearchSpace, policy: str) -> list[Family]:
    """One encoder and one decoder pipeline, or (``sc.worker_devices``) encoder and decoder
    workers of that many devices each."""
    fams = []
    w = sc.worker_devices
    for k in sc.tp_degrees():
        unit = w or k  # devices are split between roles in whole workers (or TP groups)
        if sc.devices < 2 * unit:
            continue
        e = waa_split(sc, stats, policy, unit)
        d = sc.devices - e
        enc_span, dec_span = w or e, w or d
        if max(enc_span, dec_span) // k > sc.model.layers:
            continue
        enc, dec = sc.layout(enc_span, k, enc_span // k), sc.layout(dec_span, k, dec_span // k, e)
        roles = dict(encoders=e // enc_span, decoders=d // dec_span)
        common = dict(tp_degree=k, tp_stages=sc.devices // k, num_devices=sc.devices, encoder_devices=e,
                      decoder_devices=d, worker_devices=w, mean_input_len=stats.mean_in)
        caps = np.asarray(space.decode_caps)
        micro = _micro(space, dec.depth)
        curves = analytic.decode_curves(sc, stats, dec, micro)
        fams.append(Family(
            policy, len(caps), _grid(m=micro, be=range(1, space.waa_max_encode_batch + 1)),
            lambda i, m, be, enc=enc, dec=dec, curves=curves, roles=roles: analytic.waa(
                sc, stats, enc, dec, be, caps[i - 1], m, curves, **roles),
            lambda i, f, m, be, common=common: Schedule(policy, encode_batch=be, decode_batch=_slots(f),
                                                        decode_microbatches=m, **common)))
    return fams


def families(sc: Scenario, policies: Sequence[str], space: SearchSpace = SearchSpace()) -> list[Family]:
    stats = WorkloadStats(sc.workload)
    out: list[Family] = []
    for p in policies:
        if p in ("waa-c", "waa-m"):
            out += _waa_families(sc, stats, space, p)
        elif p in ("rra", "static", "continuous"):
            out += _single_families(sc, stats, space, p)
        else:
            raise ValueError(f"unknown policy {p!r}")
    return [replace(f, max_decode_batch=space.max_decode_batch) for f in out]


def _ok(p: Predictions, bound: float) -> np.ndarray:
    return p.feasible & (p.latency_p99_s <= bound)


def _best_in(fam: Family, rows: np.ndarray, batch: np.ndarray, p: Predictions, bound: float):
    """Best (throughput, row, batch, flat index) among evaluated points meeting the bound."""
    score = np.where(_ok(p, bound), p.throughput_seq_s, -np.inf)
    flat = int(np.argmax(score))
    if not np.isfinite(score.flat[flat]):
        return None
    idx = np.unravel_index(flat, score.shape)
    return float(score.flat[flat]), int(rows[idx[0]]), int(batch[idx]), idx


class _Incumbent:
    def __init__(self) -> None:
        self.thr, self.candidate = -math.inf, None

    def offer(self, fam: Family, found, p: Predictions) -> None:
        if found and found[0] > self.thr:
            thr, row, batch, idx = found
            self.thr, self.candidate = thr, fam.candidate(row, batch, p.at(idx))


def _bisect(fam: Family, rows: np.ndarray, bound: float) -> tuple[np.ndarray, int]:
    """Largest batch per line meeting the bound and fitting memory (0: none), assuming monotony."""
    lo, hi = np.zeros(len(rows), dtype=int), np.full(len(rows), fam.max_batch + 1)
    evals = 0
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        p = fam.run(np.maximum(mid, 1), rows)
        evals += len(rows)
        good = _ok(p, bound)
        lo, hi = np.where(good, mid, lo), np.where(good, hi, mid)
    return lo, evals


def _upper_bounds(fam: Family, bound: float, tol: Tolerances) -> tuple[np.ndarray, int]:
    """Per line: best throughput over a geometric batch sample; -inf when batch 1 already fails."""
    rows = np.arange(fam.size)
    sample = np.unique(np.minimum(2 ** np.arange(int(math.log2(fam.max_batch)) + 2), fam.max_batch))
    p = fam.run(np.broadcast_to(sample, (fam.size, len(sample))), rows)
    alive = p.feasible[:, 0] & (p.latency_p99_s[:, 0] * (1 - tol.eps_l) <= bound)
    return np.where(alive, np.max(p.throughput_seq_s, axis=1), -np.inf), p.throughput_seq_s.size


def branch_and_bound(sc: Scenario, latency_bound_s: float, policies: Sequence[str] = SEARCH_POLICIES,
                     space: SearchSpace = SearchSpace(), tol: Tolerances = Tolerances()) -> SearchResult:
    fams = families(sc, policies, space)
    bounds, evals = [], 0
    for fam in fams:
        ub, n = _upper_bounds(fam, latency_bound_s, tol)
        evals += n
        bounds.append((ub, fam))
    inc, pruned = _Incumbent(), 0
    for ub, fam in sorted(bounds, key=lambda x: -float(np.max(x[0]))):
        rows = np.flatnonzero(ub > inc.thr * (1 + tol.eps_t))
        if len(rows) == 0:
            pruned += 1
            continue
        end, n = _bisect(fam, rows, latency_bound_s)
        batch = np.clip(end[:, None] + np.arange(-tol.window + 1, tol.window + 1)[None, :], 1, fam.max_batch)
        p = fam.run(batch, rows)
        evals += n + batch.size
        inc.offer(fam, _best_in(fam, rows, batch, p, latency_bound_s), p)
    return SearchResult(inc.candidate, evals, len(fams), pruned)


def exhaustive(sc: Scenario, latency_bound_s: float, policies: Sequence[str] = SEARCH_POLICIES,
               space: SearchSpace = SearchSpace(), chunk: int = 200_000) -> SearchResult:
    fams = families(sc, policies, space)
    inc, evals = _Incumbent(), 0
    for fam in fams:
        per = max(chunk // fam.max_batch, 1)
        for start in range(0, fam.size, per):
            rows = np.arange(start, min(start + per, fam.size))
            batch = np.broadcast_to(np.arange(1, fam.max_batch + 1), (len(rows), fam.max_batch))
            p = fam.run(batch, rows)
            evals += batch.size
            inc.offer(fam, _best_in(fam, rows, batch, p, latency_bound_s), p)
    return SearchResult(inc.candidate, evals, len(fams), 0)


def least_latency(sc: Scenario, policies: Sequence[str] = SEARCH_POLICIES,
                  space: SearchSpace = SearchSpace()) -> SearchResult:
    """The schedule with the least predicted p99-length latency that fits in memory (ties: the
    most throughput): what to run when no schedule meets the bound. Every line of every family
    at batches 1, 2, 3, 4 and then powers of two (latency grows with the batch, so the least
    lies at the small end)."""
    inc_lat, inc_thr, best, evals = math.inf, -math.inf, None, 0
    fams = families(sc, policies, space)
    for fam in fams:
        sample = np.unique(np.minimum(np.concatenate([[1, 2, 3], 2 ** np.arange(2, int(math.log2(fam.max_batch)) + 2)]),
                                      fam.max_batch))
        rows = np.arange(fam.size)
        p = fam.run(np.broadcast_to(sample, (fam.size, len(sample))), rows)
        evals += p.latency_p99_s.size
        lat = np.where(p.feasible, p.latency_p99_s, np.inf)
        flat = int(np.lexsort((-p.throughput_seq_s.ravel(), lat.ravel()))[0])
        idx = np.unravel_index(flat, lat.shape)
        l, t = float(lat[idx]), float(p.throughput_seq_s[idx])
        if np.isfinite(l) and (l, -t) < (inc_lat, -inc_thr):
            inc_lat, inc_thr = l, t
            best = fam.candidate(int(rows[idx[0]]), int(sample[idx[1]]), p.at(idx))
    return SearchResult(best, evals, len(fams), 0)
