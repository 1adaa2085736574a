"""The shape of a worker group: pipeline stages, each with its own tensor-parallel degree.

Ranks are numbered stage by stage: stage 0 holds ranks ``0..T_0-1``, stage 1 the next ``T_1``, and
so on. Rank 0 (stage 0, TP rank 0) drives the group; the others follow it.
"""

from __future__ import annotations

from dataclasses import dataclass


def split(n: int, parts: int, index: int) -> range:
    """The ``index``-th of ``parts`` contiguous, near-equal pieces of ``range(n)`` (the first
    ``n % parts`` pieces are one longer)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def weighted_split(n: int, weights: tuple[int, ...]) -> tuple[int, ...]:
    """``n`` items over parts in proportion to ``weights`` (largest remainders), each part >= 1 when
    ``n`` allows."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    for i, c in enumerate(counts):  # no empty stage while another has two or more
        if c == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] = 1
    return tuple(counts)


@dataclass(frozen=True)
class GroupShape:
    """``tp[s]``: tensor-parallel degree of stage ``s`` (partial TP: degrees may differ);
    ``layers[s]``: layers of stage ``s`` (None: in proportion to each stage's TP degree, since a
    stage of T ranks runs a layer about T times faster)."""

    tp: tuple[int, ...] = (1,)
    layers: tuple[int, ...] | None = None
    # decode micro-batches per step through the pipeline. 1 by default: on CPU a decode step streams
    # its weights from memory whatever its rows, so M micro-batches read them M times (docs/parallel.md)
    microbatches: int = 1

    def __post_init__(self) -> None:
        if not self.tp or any(not isinstance(t, int) or t < 1 for t in self.tp):
            raise ValueError(f"tensor-parallel degrees must be integers >= 1, got {self.tp!r}")
        if self.layers is not None:
            if len(self.layers) != len(self.tp):
                raise ValueError(f"{len(self.layers)} stage layer counts for {len(self.tp)} stages")
            if any(n < 0 for n in self.layers):
                raise ValueError(f"stage layer counts must be >= 0, got {self.layers!r}")
        if self.microbatches < 1:
            raise ValueError(f"decode micro-batches must be >= 1, got {self.microbatches}")

    @classmethod
    def parse(cls, tp: str | int = 1, pp: int = 1, layers: str | None = None, microbatches: int = 1) -> GroupShape:
        """``--tp T`` (every stage) or ``--tp 2,1`` (one degree per stage), ``--pp P``,
        ``--stage-layers 20,10`` and ``--pp-microbatches M``."""
        degrees = tuple(int(t) for t in str(tp).split(",")) if str(tp).strip() else (1,)
        if pp < 1:
            raise ValueError(f"--pp must be >= 1, got {pp}")
        if len(degrees) == 1:
            degrees = degrees * pp
        elif len(degrees) != pp and pp != 1:
            raise ValueError(f"--tp names {len(degrees)} stages but --pp is {pp}")
        counts = tuple(int(n) for n in layers.split(",")) if layers else None
        return cls(degrees, counts, microbatches)

    @property
    def pp(self) -> int:
        return len(self.tp)

    @property
    def world(self) -> int:
        return sum(self.tp)

    @property
    def single(self) -> bool:
        return self.world == 1

    def first_rank(self, stage: int) -> int:
        return sum(self.tp[:stage])

    def ranks(self, stage: int) -> range:
        first = self.first_rank(stage)
        return range(first, first + self.tp[stage])

    def place(self, rank: int) -> tuple[int, int]:
        """(stage, tp rank) of ``rank``."""
        for stage in range(self.pp):
            if rank in self.ranks(stage):
                return stage, rank - self.first_rank(stage)
        raise ValueError(f"rank {rank} outside a group of {self.world}")

    def stage_layers(self, n: int) -> tuple[range, ...]:
        """The layer range of each stage for a stack of ``n`` layers."""
        counts = self.layers if self.layers is not None else weighted_split(n, self.tp)
        if sum(counts) != n:
            raise ValueError(f"stage layers {counts} add up to {sum(counts)}, the model has {n}")
        out, start = [], 0
        for c in counts:
            out.append(range(start, start + c))
            start += c
        return tuple(out)

    def describe(self) -> str:
        if self.single:
            return "1 process"
        tp = ",".join(map(str, self.tp)) if len(set(self.tp)) > 1 else str(self.tp[0])
        return f"tp={tp} pp={self.pp} ({self.world} processes)"

    def to_plain(self) -> dict:
        return {
            "tp": list(self.tp),
            "layers": list(self.layers) if self.layers is not None else None,
            "microbatches": self.microbatches,
        }

    @classmethod
    def from_plain(cls, d: dict) -> GroupShape:
        layers = d.get("layers")
        return cls(tuple(d["tp"]), tuple(layers) if layers is not None else None, d.get("microbatches", 1))
