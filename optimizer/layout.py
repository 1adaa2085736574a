"""Pipeline layout: devices grouped into stages, partial tensor parallelism, layers per stage."""

from __future__ import annotations

from dataclasses import dataclass

from optimizer.cluster import Cluster, Link


@dataclass(frozen=True)
class Stage:
    tp: int
    first_device: int
    decode_layers: int  # decoder layers held (all layers of a decoder-only model)
    encode_layers: int  # layers a prompt passes (encoder layers for T5, else = decode_layers)


@dataclass(frozen=True)
class PipelineLayout:
    """Stages in pipeline order; ``links[i]`` joins stage i to stage i+1."""

    stages: tuple[Stage, ...]
    links: tuple[Link, ...]
    tp_link: Link

    @property
    def depth(self) -> int:
        return len(self.stages)

    @property
    def devices(self) -> int:
        return sum(s.tp for s in self.stages)


def _spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _balance(total: int, costs: list[float]) -> list[int]:
    """``total`` layers over stages whose layer takes ``costs[i]`` seconds, each stage at least
    one, so that the slowest stage (layers x cost) is as fast as it can be: each next layer goes
    to the stage that would finish it soonest (earlier stages first on ties). With equal costs
    this is the even split, larger shares first."""
    counts = [1] * len(costs)
    for _ in range(total - len(costs)):
        i = min(range(len(costs)), key=lambda j: ((counts[j] + 1) * costs[j], j))
        counts[i] += 1
    return counts


def validate_tp(devices: int, tp_degree: int, tp_stages: int, cluster: Cluster) -> None:
    if devices < 1:
        raise ValueError(f"need at least one device, got {devices}")
    if tp_degree < 1 or tp_stages < 0 or tp_degree * tp_stages > devices:
        raise ValueError(f"tp {tp_degree} on {tp_stages} stages does not fit {devices} devices")
    if tp_degree > 1 and cluster.devices_per_node % tp_degree:
        raise ValueError(f"tp {tp_degree} must divide the {cluster.devices_per_node} devices of a node")


def stage_tps(devices: int, tp_degree: int, tp_stages: int) -> list[int]:
    """TP degree of each stage: ``tp_stages`` stages of degree k first, then single devices."""
    k_stages = tp_stages if tp_degree > 1 else 0
    return [tp_degree] * k_stages + [1] * (devices - k_stages * tp_degree)


def build_layout(
    devices: int,
    tp_degree: int,
    tp_stages: int,
    decode_layers: int,
    encode_layers: int,
    cluster: Cluster,
    first_device: int = 0,
    layer_cost: dict[int, float] | None = None,
) -> PipelineLayout:
    """Layers assigned to the stages by their speed: ``layer_cost[k]`` is a layer's time on a
    stage of TP degree k, and the layers are placed so that the slowest stage is as fast as it can
    be (``_balance``). Without costs, layers are split evenly (the faster TP stages take any
    remainder)."""
    validate_tp(devices, tp_degree, tp_stages, cluster)
    tps = stage_tps(devices, tp_degree, tp_stages)
    if len(tps) > min(decode_layers, encode_layers):
        raise ValueError(f"{len(tps)} pipeline stages exceed the model's {decode_layers} layers")
    firsts = [first_device + sum(tps[:i]) for i in range(len(tps))]
    if layer_cost and len(set(tps)) > 1:
        costs = [layer_cost[tp] for tp in tps]
        dec, enc = _balance(decode_layers, costs), _balance(encode_layers, costs)
    else:
        dec, enc = _spread(decode_layers, len(tps)), _spread(encode_layers, len(tps))
    stages = tuple(Stage(tp, first, d, e) for tp, first, d, e in zip(tps, firsts, dec, enc))
    links = tuple(cluster.link_between(firsts[i + 1] - 1, firsts[i + 1]) for i in range(len(tps) - 1))
    return PipelineLayout(stages, links, cluster.intra_node)
