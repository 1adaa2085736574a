"""XScheduler: branch-and-bound over the control variables, and the exhaustive reference.

The space is split into *families* (a policy at one TP layout, and for WAA one encoder/decoder
split: every multiple of the TP degree, or of a worker's devices, is a family of its own).
Inside a family, each *line* fixes the other variables and leaves one batch variable free:
RRA fixes micro-batches and N_D and frees B_E; WAA fixes micro-batches and B_E and frees the
decode cap B_D (an index into ``SearchSpace.decode_caps``); the baselines free their batch, and
mixed steps theirs at each token budget (``SearchSpace.chunk_tokens``).

Branch and bound (exact: with the default tolerance it returns the exhaustive search's optimum):
1. Every line is evaluated at batches 1, 2, 4, ... and its largest; the points meeting the bound
   seed the incumbent and order the families.
2. WAA lines are monotone (throughput, latency and memory never fall as the cap grows), so a line
   whose throughput at its largest cap cannot beat the incumbent is pruned and the others are
   bisected for their largest cap meeting the bound.
3. RRA and the baselines are not monotone in their batch (RRA's throughput can peak inside a line),
   so their lines are searched over batch intervals: an interval is evaluated at its low end and
   bounded (``Family.bounds``: an upper bound on throughput and lower bounds on latency, peak batch
   and memory over the whole interval, from step times that never fall when a step does more
   work), dropped when no batch in it can meet the bound, fit, or beat the incumbent, and cut in
   pieces otherwise.
The exhaustive search evaluates every batch of every line of every family.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from optimizer import analytic
from optimizer.analytic import DecodeCurve, Predictions, Scenario, WorkloadStats
from optimizer.cluster import Link
from optimizer.layout import PipelineLayout
from optimizer.schedule import SPLIT_POLICIES, Policy, Schedule
from optimizer.timing import max_slots

SEARCH_POLICIES = ("rra", "waa-c", "waa-m")  # the paper's policies
BASELINES = ("static", "continuous")
MIXED = ("mixed",)  # Sarathi-style chunked prefill folded into decode steps
PRODUCT_POLICIES = SEARCH_POLICIES + BASELINES + MIXED  # what the product may pick: never below a baseline


@dataclass(frozen=True)
class SearchSpace:
    """The discrete space both searches cover."""

    max_encode_batch: int = 256  # RRA's B_E
    waa_max_encode_batch: int = 128
    static_max_batch: int = 512
    continuous_max_batch: int = 1024
    mixed_max_batch: int = 1024  # mixed's B_D (below its token budget)
    chunk_tokens: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)  # mixed's token budgets per step
    # RRA's N_D: every count to 32 (near a tight bound one iteration more or less between encodes
    # decides), then coarser
    iters_per_encode: tuple[int, ...] = tuple(range(1, 33)) + (40, 48, 56, 64, 80, 96, 112, 128)
    decode_caps: tuple[int, ...] = (
        1,
        2,
        4,
        8,
        12,
        16,
        24,
        32,
        48,
        64,
        96,
        128,
        192,
        256,
        384,
        512,
        768,
        1024,
        1536,
        2048,
        3072,
        4096,
    )
    microbatches: tuple[int, ...] = (1, 2, 4, 8, 16)
    encode_microbatches: tuple[int, ...] = (1, 2, 4, 8, 16)  # RRA's encode split through the pipeline
    max_decode_batch: float = math.inf  # a worker's running batch (RRA's peak included) at most this
    replicas: bool = True  # data-parallel replicas of smaller pipelines where the devices allow
    partial_waa_tp: bool = True  # WAA groups with TP on some of their stages, not only all or none

    def __post_init__(self) -> None:
        sizes = (
            self.max_encode_batch,
            self.waa_max_encode_batch,
            self.static_max_batch,
            self.continuous_max_batch,
            self.mixed_max_batch,
        )
        if (
            min(sizes) < 1
            or not self.iters_per_encode
            or not self.decode_caps
            or not self.microbatches
            or not self.chunk_tokens
        ):
            raise ValueError("search space needs positive batch limits and non-empty value lists")

    def capped(self, max_batch: int) -> SearchSpace:
        """The same space with every batch (B_E, B_D, static and continuous batches) at most
        ``max_batch``: what a profile measured, or what a worker may hold."""
        top = max(int(max_batch), 1)
        caps = tuple(c for c in self.decode_caps if c < top) + (top,)
        return replace(
            self,
            max_encode_batch=min(self.max_encode_batch, top),
            waa_max_encode_batch=min(self.waa_max_encode_batch, top),
            static_max_batch=min(self.static_max_batch, top),
            continuous_max_batch=min(self.continuous_max_batch, top),
            mixed_max_batch=min(self.mixed_max_batch, top),
            decode_caps=caps,
            max_decode_batch=min(self.max_decode_batch, top),
        )


@dataclass(frozen=True)
class Tolerances:
    """``eps_t``: the answer may be this fraction below the best schedule of the space (a line or
    interval is pruned when its throughput bound x (1 - eps_t) is at most the incumbent's); 0,
    the default, makes the branch and bound exact."""

    eps_t: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.eps_t < 1:
            raise ValueError(f"eps_t must be in [0, 1), got {self.eps_t}")


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
    def of(p: Predictions) -> Figures:
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
    """One policy at one layout: lines of fixed variables, a free batch variable 1..max_batch.

    ``kind`` says what is known along a line, and so how the branch and bound bounds it:

    - ``monotone``: throughput, latency and memory never fall as the batch grows (WAA along its
      decode cap: the decoders' rate is a running maximum over batches), so a line's best point
      is its largest batch that meets the bound and fits, found by bisection.
    - ``cost``: latency and memory never fall, and throughput is batch / cost with a cost that
      never falls (static and continuous batching), so over batches lo..hi throughput is at most
      throughput(lo) x hi / lo (mixed steps too: ``analytic.mixed``).
    - ``bounded``: ``optimistic(lo, hi, **lines)`` gives an upper bound on throughput and lower
      bounds on latency, peak batch and memory over lo..hi (RRA: ``analytic.rra_optimistic``).
    """

    policy: str
    max_batch: int
    lines: dict[str, np.ndarray]  # name -> one value per line
    evaluate: Callable[..., Predictions]  # (batch array, **lines broadcast) -> Predictions
    schedule: Callable[..., Schedule]  # (batch, figures, **line values) -> Schedule
    max_decode_batch: float = math.inf  # schedules whose running batch would exceed it are infeasible
    kind: str = "cost"  # monotone | cost | bounded
    optimistic: Callable[..., Predictions] | None = None  # (lo, hi, **lines) -> bounds (``bounded``)
    # (throughput no schedule of the family exceeds, latency none falls below): a true bound
    # computed before the family's lines are evaluated; the search skips a family that cannot beat
    # the incumbent or meet the bound. None: not known (the family is always searched).
    ceiling: Callable[[], tuple[float, float]] | None = None

    @property
    def size(self) -> int:
        return len(next(iter(self.lines.values())))

    def _line_values(self, rows: np.ndarray, ndim: int) -> dict[str, np.ndarray]:
        extra = (slice(None),) + (None,) * (ndim - 1)
        return {k: v[rows][extra] for k, v in self.lines.items()}

    def _capped(self, p: Predictions) -> Predictions:
        if math.isinf(self.max_decode_batch):
            return p
        slots = analytic.whole_slots(p.decode_batch_peak)
        return replace(p, feasible=p.feasible & (slots <= self.max_decode_batch))

    def run(self, batch: np.ndarray, rows: np.ndarray) -> Predictions:
        """Evaluate lines ``rows`` at ``batch`` (shape (len(rows),) or (len(rows), k))."""
        return self._capped(self.evaluate(batch, **self._line_values(rows, batch.ndim)))

    def bounds(self, lo: np.ndarray, hi: np.ndarray, rows: np.ndarray, at_lo: Predictions) -> Predictions:
        """Optimistic figures over batches lo..hi of each line (``at_lo``: the line evaluated at
        lo): throughput no batch of the interval exceeds, and latency, peak batch and memory no
        batch of it falls below; ``feasible`` false when no batch of it can fit."""
        if self.kind == "cost":
            return replace(at_lo, throughput_seq_s=at_lo.throughput_seq_s * hi / lo)
        if self.kind == "bounded":
            assert self.optimistic is not None  # (a bounded family comes with its bounds)
            return self._capped(self.optimistic(lo, hi, **self._line_values(rows, 1)))
        raise ValueError(f"a {self.kind} family is searched by bisection, not bounded by intervals")

    def candidate(self, row: int, batch: int, p: Predictions) -> Candidate:
        fig = Figures.of(p)
        values = {k: int(v[row]) for k, v in self.lines.items()}
        return Candidate(self.schedule(batch, fig, **values), fig)


def _grid(**axes: Iterable[int]) -> dict[str, np.ndarray]:
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


def _slots(f: Figures) -> int:
    """The decode batch a worker enforces: the predicted peak, rounded up."""
    return max(math.ceil(f.decode_batch_peak - 1e-9), 1)


def _weights_fit(sc: Scenario, devices: int) -> bool:
    """Whether the model's weights alone fit on ``devices`` devices (spread perfectly): a pipeline
    of fewer devices cannot hold the model under any layout."""
    total = (
        sc.model.layers * sc.model.decoder_layer_weight_bytes()
        + sc.model.encoder_layers * sc.model.encoder_layer_weight_bytes()
    )
    return total <= devices * sc.cluster.usable_memory_bytes


def replica_spans(sc: Scenario, space: SearchSpace) -> list[int]:
    """Devices per worker of every worker shape tried: on a cluster of worker processes, the
    workers'; otherwise one pipeline over all devices (0), and, with ``space.replicas``, the
    data-parallel replicas of ``w`` devices for every ``w`` dividing the devices whose replicas
    are all alike (w divides a node, or whole nodes) and hold the weights."""
    if sc.worker_devices:
        return [sc.worker_devices]
    out = [0]
    if space.replicas:
        node = sc.cluster.devices_per_node
        out += [
            w
            for w in range(1, sc.devices)
            if sc.devices % w == 0 and (node % w == 0 or w % node == 0) and _weights_fit(sc, w)
        ]
    return out


def _single_families(
    sc: Scenario, stats: WorkloadStats, space: SearchSpace, policy: str, tables: _WaaTables
) -> list[Family]:
    """One pipeline over all devices, or data-parallel workers (replicas) of fewer devices. Mixed
    steps run on one-device workers only (the engine's chunked prefill runs in one process; a
    worker group's runner has none) of decoder-only models."""
    fams = []
    for w in replica_spans(sc, space):
        span = w or sc.devices
        if policy == "mixed" and (span != 1 or sc.model.encoder_layers):
            continue
        for k, s in tp_configs(sc, span):
            layout = sc.layout(span, k, s)
            common = dict(
                tp_degree=k, tp_stages=s, num_devices=sc.devices, decoder_devices=sc.devices, worker_devices=w
            )
            fam = _single_family(sc, stats, space, policy, layout, common, sc.devices // span)
            if policy == "mixed":
                fam = replace(fam, ceiling=_mixed_ceiling(stats, tables, layout, sc.devices // span))
            elif policy != "static":  # static's decode context is shorter than the mean: no such ceiling
                fam = replace(fam, ceiling=_decode_ceiling(sc, stats, tables, layout, fam, sc.devices // span))
            fams.append(fam)
    return fams


def _decode_ceiling(
    sc: Scenario, stats: WorkloadStats, tables: _WaaTables, layout: PipelineLayout, fam: Family, n: int
) -> Callable[[], tuple[float, float]]:
    """A single-pipeline family's ceiling: every request decodes E[o-1] iterations in its worker's
    running batch, and a step that also encodes or prefills takes at least its decode iteration, so
    the rate of each of the ``n`` workers is at most its decode rate b / (E[o-1] t_dec(b)) at the
    best batch that fits (``_WaaTables.decoder_ceiling``); the latency is at least one p99 prompt's
    encode and o99 - 1 iterations of the smallest batch (RRA and continuous batching decode at the
    workload's mean context). RRA's is tighter: a cycle of B_E requests is their encode plus
    N_D iterations, and by Little's law N_D t_dec / B_E = E[o-1] t_dec(b) / b, so a request takes
    at least the least encode time per request over every B_E and encode micro-batch count
    (``_WaaTables.encode_share``, exact over the integers) plus the least decode time per request
    (the inverse of the decode rate's ceiling)."""
    micro = sorted({int(m) for m in fam.lines["m"]})
    enc_micro = sorted({int(m) for m in fam.lines["me"]}) if "me" in fam.lines else None

    def ceiling() -> tuple[float, float]:
        rate, least = tables.decoder_ceiling(layout, micro)
        if enc_micro is not None:  # RRA: a request's share of a cycle is its encode's share plus its decode's
            per_request = 1.0 / rate + tables.encode_share(layout, enc_micro, fam.max_batch)
            rate = 1.0 / per_request
        return n * rate, tables.encode_floor(layout) + (stats.o99 - 1) * least

    return ceiling


def _mixed_ceiling(
    stats: WorkloadStats, tables: _WaaTables, layout: PipelineLayout, n: int
) -> Callable[[], tuple[float, float]]:
    """A mixed family's ceiling: a step decoding b requests takes at least a decode iteration of b
    (its prompt chunks only add work), so the rate is at most the decode rate's ceiling, as for
    continuous batching; a p99-length request spends at least o99 steps (its prefill's last and
    o99 - 1 decodes, after the step it waited for), each at least the least iteration."""

    def ceiling() -> tuple[float, float]:
        rate, least = tables.decoder_ceiling(layout, [1])
        return n * rate, stats.o99 * least

    return ceiling


def _single_family(
    sc: Scenario,
    stats: WorkloadStats,
    space: SearchSpace,
    policy: str,
    layout: PipelineLayout,
    common: dict[str, int],
    n: int,
) -> Family:
    micro = _micro(space, layout.depth)
    expect: dict[str, Any] = dict(mean_input_len=stats.mean_in)  # keyword arguments of Schedule
    if policy == "rra":
        nds = [n for n in space.iters_per_encode if n <= max(sc.workload.output.maximum - 1, 1)]
        enc_micro = [m for m in space.encode_microbatches if m == 1 or m <= layout.depth]
        return Family(
            "rra",
            space.max_encode_batch,
            _grid(m=micro, nd=nds, me=enc_micro),
            lambda b, m, nd, me: analytic.replicated(analytic.rra(sc, stats, layout, b, nd, m, me), n),
            lambda b, f, m, nd, me: Schedule(
                "rra",
                encode_batch=b,
                decode_batch=_slots(f),
                decode_microbatches=m,
                decode_iters_per_encode=nd,
                mean_decode_batch=f.decode_batch,
                encode_microbatches=me,
                **expect,
                **common,
            ),
            kind="bounded",
            optimistic=lambda lo, hi, m, nd, me: analytic.replicated(
                analytic.rra_optimistic(sc, stats, layout, lo, hi, nd, m, me), n
            ),
        )
    if policy == "static":
        return Family(
            "static",
            space.static_max_batch,
            _grid(m=micro),
            lambda b, m: analytic.replicated(analytic.static(sc, stats, layout, b, m), n),
            lambda b, f, m: Schedule("static", encode_batch=b, decode_batch=b, decode_microbatches=m, **common),
        )
    if policy == "mixed":
        return Family(
            "mixed",
            space.mixed_max_batch,
            _grid(m=[1], c=space.chunk_tokens),
            lambda b, m, c: analytic.replicated(analytic.mixed(sc, stats, layout, b, c), n),
            lambda b, f, m, c: Schedule("mixed", encode_batch=b, decode_batch=b, chunk_tokens=c, **common),
        )
    return Family(
        "continuous",
        space.continuous_max_batch,
        _grid(m=micro),
        lambda b, m: analytic.replicated(analytic.continuous(sc, stats, layout, b, m), n),
        lambda b, f, m: Schedule("continuous", encode_batch=b, decode_batch=b, decode_microbatches=m, **common),
    )


def waa_shares(sc: Scenario, stats: WorkloadStats, encode_batch: float, decode_batch: float) -> tuple[float, float]:
    """The encoders' share of the devices under WAA-C (proportional to the compute a request
    needs to be encoded vs decoded) and under WAA-M (proportional to the memory each role holds),
    at an operating point: ``encode_batch`` requests per encode, ``decode_batch`` running in a
    decoder; per-request work on one device."""
    be, bd = max(float(encode_batch), 1.0), max(float(decode_batch), 1.0)
    one = sc.timer(sc.layout(1, 1, 0))
    enc = float(one.path_s(stats.prefill(be))) / be
    dec = stats.mean_decode_iters * float(one.path_s(stats.decode(bd, model=sc.model))) / bd
    weights = sc.model.layers * sc.model.decoder_layer_weight_bytes()
    kv = sc.model.kv_bytes_per_token_layer * sc.model.layers
    enc_m = weights + be * stats.q99_in * kv
    dec_m = weights + bd * stats.slot_tokens * kv
    return enc / (enc + dec), enc_m / (enc_m + dec_m)


def waa_label(
    sc: Scenario,
    stats: WorkloadStats,
    names: Sequence[Policy],
    encoder_devices: int,
    encode_batch: float,
    decode_batch: float,
) -> Policy:
    """The WAA policy a split is named after: the one asked for, or (both asked for) the rule
    whose share at the schedule's own B_E and B_D lies nearer the split (ties: WAA-C)."""
    if len(names) == 1:
        return names[0]
    compute, memory = waa_shares(sc, stats, encode_batch, decode_batch)
    share = encoder_devices / sc.devices
    return "waa-c" if abs(share - compute) <= abs(share - memory) else "waa-m"


def waa_splits(sc: Scenario, unit: int) -> list[int]:
    """Encoder devices of every split the search tries: multiples of ``unit`` (the TP degree, or
    the devices of one worker) leaving the decoders at least one unit (a whole number of workers)."""
    out = [e for e in range(unit, sc.devices - unit + 1, unit)]
    if sc.worker_devices:
        out = [e for e in out if (sc.devices - e) % unit == 0]
    return out


def _group_tp_stages(sc: Scenario, span: int, k: int, partial: bool) -> list[int]:
    """TP stages of degree ``k`` a WAA group of ``span`` devices may have: all of them (the
    paper's), or with ``partial`` any number (the rest single devices), within the model's layers."""
    if (fixed := sc.group_tp()) is not None:
        return [fixed[1]]
    if k == 1:
        return [0]
    full = span // k
    if span % k:
        return []
    options = range(0, full + 1) if partial else [full]
    depth_limit = min(sc.model.layers, sc.model.prefill_layers)
    return [s for s in options if span - s * (k - 1) <= depth_limit]


CEILING_RATIO = 1.05  # grid ratio of the decoders' rate ceiling (the bound is at most this loose)

# a pipeline as the WAA tables know it: (TP degree, decoder layers, encoder layers) per stage, and its links
_LayoutKey = tuple[tuple[tuple[int, int, int], ...], tuple[Link, ...]]


class _WaaTables:
    """What WAA families share, built once per search and only when asked: the decoders' curves
    per decoder layout and micro-batch count, and the encoders' best rate per encoder layout."""

    def __init__(self, sc: Scenario, stats: WorkloadStats, space: SearchSpace) -> None:
        self.sc, self.stats, self.space = sc, stats, space
        self._curves: dict[_LayoutKey, dict[int, DecodeCurve]] = {}
        self._enc: dict[tuple[object, ...], Any] = {}  # by what is cached: floats, or (rate, time) ceilings

    @staticmethod
    def _key(layout: PipelineLayout) -> _LayoutKey:
        return tuple((st.tp, st.decode_layers, st.encode_layers) for st in layout.stages), layout.links

    def curves(self, dec: PipelineLayout, micro: Sequence[int]) -> dict[int, DecodeCurve]:
        key = self._key(dec)
        got = self._curves.setdefault(key, {})
        missing = [m for m in micro if m not in got]
        if missing:
            got.update(analytic.decode_curves(self.sc, self.stats, dec, missing))
        return {m: got[m] for m in micro}

    def decoder_ceiling(self, dec: PipelineLayout, micro: Sequence[int]) -> tuple[float, float]:
        """(most requests per second one decoder pipeline sustains at any cap, least iteration
        time), without tabulating every batch: over a geometric grid b_0 < b_1 < ... (ratio
        ``CEILING_RATIO``) an iteration at a batch in [b_i, b_i+1] takes at least t(b_i), so its
        rate b / (E[o-1] t(b)) is at most b_i+1 / (E[o-1] t(b_i)): a true bound, at most that
        ratio above the real maximum."""
        key = (self._key(dec), tuple(micro))
        if key not in self._enc:
            sc, stats = self.sc, self.stats
            slots = max_slots(dec, sc.model, stats.slot_tokens, sc.cluster.usable_memory_bytes)
            top = int(min(max(slots, 1), 1 << 16)) + 1
            grid = np.unique(np.round(CEILING_RATIO ** np.arange(0, math.log(top, CEILING_RATIO) + 2)))
            grid = np.concatenate([grid[grid < top], [top]]).astype(float)
            timer, best, least = sc.timer(dec), 0.0, math.inf
            points = np.concatenate([[1e-9], grid])  # the least iteration, and the grid, in one call
            for m in micro:
                t_all = timer.iteration_s(stats.decode(points, model=sc.model), m)
                t = t_all[1:]
                upper = np.append(grid[1:], grid[-1]) / (max(stats.mean_decode_iters, 1e-9) * t)
                best = max(best, float(np.max(upper)))
                least = min(least, float(t_all[0]))
            self._enc[key] = (best, least)
        ceiling: tuple[float, float] = self._enc[key]
        return ceiling

    def encoder_rate(self, enc: PipelineLayout) -> float:
        """Most requests per second one encoder pipeline emits over B_E = 1..max."""
        key = self._key(enc)
        if key not in self._enc:
            be = np.arange(1, self.space.waa_max_encode_batch + 1, dtype=float)
            t = self.sc.timer(enc).bottleneck_s(self.stats.prefill(be))
            self._enc[key] = float(np.max(be / t))
        rate: float = self._enc[key]
        return rate

    def encode_share(self, layout: PipelineLayout, enc_micro: Sequence[int], max_batch: int) -> float:
        """Least encode seconds per request on ``layout`` over B_E = 1..``max_batch`` and the
        encode micro-batch counts ``enc_micro`` (RRA's encode, ``PipelineTimer.encode_s``)."""
        key = ("share", self._key(layout), tuple(enc_micro), max_batch)
        if key not in self._enc:
            be = np.arange(1, max_batch + 1, dtype=float)
            timer = self.sc.timer(layout)
            self._enc[key] = min(float(np.min(timer.encode_s(self.stats.prefill(be), m) / be)) for m in enc_micro)
        share: float = self._enc[key]
        return share

    def encode_floor(self, enc: PipelineLayout) -> float:
        """The least time an encode of one p99-length prompt takes on ``enc`` (a latency floor)."""
        key = ("floor", self._key(enc))
        if key not in self._enc:
            self._enc[key] = float(self.sc.timer(enc).path_s(self.stats.prefill_p99(1)))
        floor: float = self._enc[key]
        return floor


def _waa_families(
    sc: Scenario, stats: WorkloadStats, space: SearchSpace, names: Sequence[Policy], tables: _WaaTables
) -> list[Family]:
    """One family per TP degree, worker shape, encoder/decoder split and TP stages of each group:
    one encoder and one decoder pipeline, or encoder and decoder workers (replicas) of ``w``
    devices each."""
    fams = []
    caps = np.asarray(space.decode_caps)
    kv_req = sc.model.kv_bytes_per_request_layer(stats.mean_in, 0) * sc.model.layers
    for w in replica_spans(sc, space):
        for k in sc.tp_degrees():
            if w and w % k:
                continue
            unit = w or k  # devices are split between roles in whole workers (or TP groups)
            for e in waa_splits(sc, unit):
                d = sc.devices - e
                if w and d % w:
                    continue
                enc_span, dec_span = w or e, w or d
                if not (_weights_fit(sc, enc_span) and _weights_fit(sc, dec_span)):
                    continue
                for se in _group_tp_stages(sc, enc_span, k, space.partial_waa_tp):
                    for sd in _group_tp_stages(sc, dec_span, k, space.partial_waa_tp):
                        if k > 1 and se == 0 and sd == 0:
                            continue  # that is the k = 1 family
                        fams.append(_waa_family(sc, stats, space, names, tables, caps, kv_req, w, k, e, d, se, sd))
    return fams


def _waa_family(
    sc: Scenario,
    stats: WorkloadStats,
    space: SearchSpace,
    names: Sequence[Policy],
    tables: _WaaTables,
    caps: np.ndarray,
    kv_req: float,
    w: int,
    k: int,
    e: int,
    d: int,
    se: int,
    sd: int,
) -> Family:
    enc_span, dec_span = w or e, w or d
    enc, dec = sc.layout(enc_span, k, se), sc.layout(dec_span, k, sd, e)
    roles = dict(encoders=e // enc_span, decoders=d // dec_span)
    full = k == 1 or (se == enc_span // k and sd == dec_span // k)
    common: dict[str, Any] = dict(  # keyword arguments of Schedule (ints and a float)
        tp_degree=k,
        tp_stages=(sc.devices // k if full else sd),
        num_devices=sc.devices,
        encoder_devices=e,
        decoder_devices=d,
        worker_devices=w,
        mean_input_len=stats.mean_in,
        encoder_tp_stages=(-1 if full else se),
    )
    micro = _micro(space, dec.depth)

    def schedule(i: int, f: Figures, m: int, be: int) -> Schedule:
        label = waa_label(sc, stats, names, e, be, f.decode_batch)
        return Schedule(label, encode_batch=be, decode_batch=_slots(f), decode_microbatches=m, **common)

    def evaluate(i: np.ndarray, m: np.ndarray, be: np.ndarray) -> Predictions:
        return analytic.waa(sc, stats, enc, dec, be, caps[i - 1], m, tables.curves(dec, micro), **roles)

    def ceiling() -> tuple[float, float]:
        """rate <= min(encoders x their best rate, the hand-off link, decoders x the decoders'
        best rate over every cap); latency >= one p99-length encode + o99 iterations of the
        smallest batch."""
        link = sc.cluster.handoff_link(enc.stages[-1].first_device + enc.stages[-1].tp - 1, dec.stages[0].first_device)
        dec_rate, least = tables.decoder_ceiling(dec, micro)
        thr = min(
            roles["encoders"] * tables.encoder_rate(enc), link.bandwidth_Bps / kv_req, roles["decoders"] * dec_rate
        )
        return thr, tables.encode_floor(enc) + stats.o99 * least

    return Family(
        names[0],
        len(caps),
        _grid(m=micro, be=range(1, space.waa_max_encode_batch + 1)),
        evaluate,
        schedule,
        kind="monotone",
        ceiling=ceiling,
    )


def families(sc: Scenario, policies: Sequence[str], space: SearchSpace = SearchSpace()) -> list[Family]:
    stats = WorkloadStats(sc.workload)
    tables = _WaaTables(sc, stats, space)
    out: list[Family] = []
    waa = tuple(dict.fromkeys(p for p in policies if p in SPLIT_POLICIES))  # one set of splits for both
    for p in dict.fromkeys(policies):
        if p in SPLIT_POLICIES:
            if p == waa[0]:
                out += _waa_families(sc, stats, space, waa, tables)
        elif p in ("rra", "static", "continuous", "mixed"):
            out += _single_families(sc, stats, space, p, tables)
        else:
            raise ValueError(f"unknown policy {p!r}")
    return [replace(f, max_decode_batch=space.max_decode_batch) for f in out]


def space_size(sc: Scenario, policies: Sequence[str] = PRODUCT_POLICIES, space: SearchSpace = SearchSpace()) -> int:
    """Schedules in the space both searches cover: every batch of every line of every family."""
    return sum(f.size * f.max_batch for f in families(sc, policies, space))


_Found = tuple[float, int, int, tuple[np.intp, ...]]  # (throughput, row, batch, index) of a best point


def _ok(p: Predictions, bound: float) -> np.ndarray:
    return p.feasible & (p.latency_p99_s <= bound)


def _best_in(fam: Family, rows: np.ndarray, batch: np.ndarray, p: Predictions, bound: float) -> _Found | None:
    """Best (throughput, row, batch, flat index) among evaluated points meeting the bound."""
    score = np.where(_ok(p, bound), p.throughput_seq_s, -np.inf)
    flat = int(np.argmax(score))
    if not np.isfinite(score.flat[flat]):
        return None
    idx = np.unravel_index(flat, score.shape)
    return float(score.flat[flat]), int(rows[idx[0]]), int(batch[idx]), idx


class _Incumbent:
    def __init__(self, tol: Tolerances) -> None:
        self.thr, self.tol = -math.inf, tol
        self.candidate: Candidate | None = None

    def offer(self, fam: Family, found: _Found | None, p: Predictions) -> None:
        if found and found[0] > self.thr:
            thr, row, batch, idx = found
            self.thr, self.candidate = thr, fam.candidate(row, batch, p.at(idx))

    def beats(self, upper: np.ndarray) -> np.ndarray:
        """Where a throughput bound leaves room above the incumbent (within ``eps_t``)."""
        return upper * (1 - self.tol.eps_t) > max(self.thr, 0.0)


def _sample(max_batch: int) -> np.ndarray:
    """Batches 1, 2, 4, ... and ``max_batch``."""
    return np.unique(np.minimum(2 ** np.arange(int(math.log2(max_batch)) + 2), max_batch))


def _bisect(fam: Family, rows: np.ndarray, bound: float) -> tuple[np.ndarray, int]:
    """Largest batch per line meeting the bound and fitting memory (0: none); exact on a
    ``monotone`` family, where the batches that do form a prefix of the line."""
    lo, hi = np.zeros(len(rows), dtype=int), np.full(len(rows), fam.max_batch + 1)
    evals = 0
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        p = fam.run(np.maximum(mid, 1), rows)
        evals += len(rows)
        good = _ok(p, bound)
        lo, hi = np.where(good, mid, lo), np.where(good, hi, mid)
    return lo, evals


def _search_monotone(fam: Family, sample: Predictions, bound: float, inc: _Incumbent) -> tuple[int, bool]:
    """A line's best point is its largest batch meeting the bound; a line whose throughput at its
    largest batch (its maximum) cannot beat the incumbent, or whose batch 1 already fails, is
    pruned. Returns (evaluations, whether every line was pruned)."""
    alive = inc.beats(sample.throughput_seq_s[:, -1]) & _ok(sample, bound)[:, 0]
    rows = np.flatnonzero(alive)
    if len(rows) == 0:
        return 0, True
    end, evals = _bisect(fam, rows, bound)
    rows, end = rows[end > 0], end[end > 0]
    if len(rows):
        p = fam.run(end, rows)
        inc.offer(fam, _best_in(fam, rows, end, p, bound), p)
        evals += len(rows)
    return evals, False


def _search_intervals(fam: Family, bound: float, inc: _Incumbent) -> tuple[int, bool]:
    """Branch and bound over batch intervals of every line, all lines in lockstep: an interval
    lo..hi is evaluated at lo, bounded (``Family.bounds``), dropped when no batch of it can meet
    the bound, fit, or beat the incumbent, and otherwise cut in ``SPLIT_WAYS`` pieces. Returns (evaluations,
    whether every line was pruned at once)."""
    rows = np.arange(fam.size)
    lo, hi = np.ones(fam.size, dtype=int), np.full(fam.size, fam.max_batch)
    evals, first, root_pruned = 0, True, False
    while len(rows):
        p = fam.run(lo, rows)
        inc.offer(fam, _best_in(fam, rows, lo, p, bound), p)
        opt = fam.bounds(lo, hi, rows, p)
        evals += len(rows) * (2 if fam.kind == "bounded" else 1)
        keep = (hi > lo) & _ok(opt, bound) & inc.beats(opt.throughput_seq_s)
        if first:
            root_pruned, first = not keep.any(), False
        rows, lo, hi = rows[keep], lo[keep] + 1, hi[keep]  # lo itself is done
        rows, lo, hi = _split(rows, lo, hi, SPLIT_WAYS)
    return evals, root_pruned


SPLIT_WAYS = 8  # an interval is cut in this many (fewer, vectorised rounds: each round costs a call)


def _split(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, ways: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each interval lo..hi cut into up to ``ways`` near-equal non-empty pieces."""
    size = hi - lo + 1
    k = np.minimum(size, ways)
    piece = np.repeat(np.arange(len(rows)), k)
    j = np.arange(len(piece)) - np.repeat(np.cumsum(k) - k, k)  # index of the piece in its interval
    start = lo[piece] + (size[piece] * j) // k[piece]
    end = lo[piece] + (size[piece] * (j + 1)) // k[piece] - 1
    return rows[piece], start, end


def branch_and_bound(
    sc: Scenario,
    latency_bound_s: float,
    policies: Sequence[str] = SEARCH_POLICIES,
    space: SearchSpace = SearchSpace(),
    tol: Tolerances = Tolerances(),
) -> SearchResult:
    """The best schedule of the space (with the default ``tol``, the exhaustive search's answer).

    1. Every line of the RRA and baseline families is evaluated at batches 1, 2, 4, ... and its
       largest; the points meeting the bound seed the incumbent.
    2. Families in the order of their ``ceiling`` (an upper bound on throughput before any line
       is evaluated; WAA: the encoders', link's and decoders' best rates; RRA and continuous
       batching: the decode rate at the best batch that fits; none: first), each skipped whole
       when its ceiling cannot beat the incumbent or its latency floor fails the bound.
    3. ``monotone`` families: lines are pruned on their exact maximum, the rest bisected.
       Other families: branch and bound over batch intervals with the bounds ``Family.bounds``
       gives (true bounds: each rests on step times never falling when a step does more work).
    """
    fams = families(sc, policies, space)
    inc, evals, pruned = _Incumbent(tol), 0, 0

    def seed(fam: Family) -> tuple[Predictions, float]:
        nonlocal evals
        sample = _sample(fam.max_batch)
        rows = np.arange(fam.size)
        grid = np.broadcast_to(sample, (fam.size, len(sample)))
        p = fam.run(grid, rows)
        evals += p.throughput_seq_s.size
        found = _best_in(fam, rows, grid, p, latency_bound_s)
        inc.offer(fam, found, p)
        return p, (found[0] if found else -math.inf)

    seeded: dict[int, Predictions] = {}
    for i, fam in enumerate(fams):
        if fam.kind != "monotone":  # cheap to seed: they give the first incumbent
            seeded[i] = seed(fam)[0]
    ceilings = {i: (f.ceiling() if f.ceiling is not None else (math.inf, 0.0)) for i, f in enumerate(fams)}
    for i in sorted(range(len(fams)), key=lambda i: (-ceilings[i][0], i)):  # best ceiling first
        fam, (thr, floor) = fams[i], ceilings[i]
        if floor > latency_bound_s or not inc.beats(np.asarray(thr)):
            pruned += 1
            continue
        if fam.kind == "monotone":
            p = seeded[i] if i in seeded else seed(fam)[0]
            n, all_pruned = _search_monotone(fam, p, latency_bound_s, inc)
        else:
            n, all_pruned = _search_intervals(fam, latency_bound_s, inc)
        evals += n
        pruned += all_pruned
    return SearchResult(inc.candidate, evals, len(fams), pruned)


def exhaustive(
    sc: Scenario,
    latency_bound_s: float,
    policies: Sequence[str] = SEARCH_POLICIES,
    space: SearchSpace = SearchSpace(),
    chunk: int = 200_000,
) -> SearchResult:
    fams = families(sc, policies, space)
    inc, evals = _Incumbent(Tolerances()), 0
    for fam in fams:
        per = max(chunk // fam.max_batch, 1)
        for start in range(0, fam.size, per):
            rows = np.arange(start, min(start + per, fam.size))
            batch = np.broadcast_to(np.arange(1, fam.max_batch + 1), (len(rows), fam.max_batch))
            p = fam.run(batch, rows)
            evals += batch.size
            inc.offer(fam, _best_in(fam, rows, batch, p, latency_bound_s), p)
    return SearchResult(inc.candidate, evals, len(fams), 0)


def least_latency(
    sc: Scenario, policies: Sequence[str] = SEARCH_POLICIES, space: SearchSpace = SearchSpace()
) -> SearchResult:
    """The schedule with the least predicted p99-length latency that fits in memory (ties: the
    most throughput): what to run when no schedule meets the bound. Every line of every family
    at batches 1, 2, 3, 4 and then powers of two (latency grows with the batch, so the least
    lies at the small end)."""
    inc_lat, inc_thr, best, evals = math.inf, -math.inf, None, 0
    fams = families(sc, policies, space)
    for fam in fams:
        sample = np.unique(
            np.minimum(np.concatenate([[1, 2, 3], 2 ** np.arange(2, int(math.log2(fam.max_batch)) + 2)]), fam.max_batch)
        )
        rows = np.arange(fam.size)
        p = fam.run(np.broadcast_to(sample, (fam.size, len(sample))), rows)
        evals += p.latency_p99_s.size
        lat = np.where(p.feasible, p.latency_p99_s, np.inf)
        flat = int(np.lexsort((-p.throughput_seq_s.ravel(), lat.ravel()))[0])
        idx = np.unravel_index(flat, lat.shape)
        cand_lat, cand_thr = float(lat[idx]), float(p.throughput_seq_s[idx])
        if np.isfinite(cand_lat) and (cand_lat, -cand_thr) < (inc_lat, -inc_thr):
            inc_lat, inc_thr = cand_lat, cand_thr
            best = fam.candidate(int(rows[idx[0]]), int(sample[idx[1]]), p.at(idx))
    return SearchResult(best, evals, len(fams), 0)
