"""Cluster description and collective costs (alpha-beta model per link kind).

A *device* is what runs one pipeline stage or TP rank: a GPU, or on a CPU machine one worker
process with its torch threads (``device_threads``) and its share of the memory. Link kinds:

- ``intra_node`` / ``inter_node``: activations between stages and TP all-reduces;
- ``handoff`` (optional): moving one request's KV cache from an encoder worker to a decoder
  worker. On the mesh that is a Redis payload write + read and one RabbitMQ message, measured by
  ``exegpt profile --amqp-url --redis-url``; without it the hand-off uses ``link_between``.

``parse_cluster`` reads the JSON form (``cluster_to_dict`` writes it; ``optimizer.io.load_cluster``
reads the file):

```
{"format": "exegpt-cluster/1", "name": "...", "devices": 2, "devices_per_node": 2,
 "device": {"memory_bytes": 12.6e9, "threads": 1, "usable_memory_fraction": 0.9},
 "links": {"intra_node": {"name": "...", "bandwidth_Bps": 1e9, "latency_s": 1e-4, "source": "..."},
           "inter_node": {...}, "handoff": {...}},
 "notes": "..."}
```
``devices`` (0 or absent: any number), ``threads``, ``usable_memory_fraction``, ``inter_node``
(default: ``intra_node``), ``handoff``, ``source`` and ``notes`` are optional. ``"worker_group": [2, 1]``
(optional) says that each worker is a process group of that shape (the TP degree of each pipeline
stage; ``engine.parallel``): plans then span whole groups and use their TP layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

CLUSTER_FORMAT = "exegpt-cluster/1"


class ClusterError(ValueError):
    """A cluster description that cannot be used; the message quotes the bad value."""


@dataclass(frozen=True)
class Link:
    """A link kind: bandwidth per direction and per-message latency (seconds = latency + bytes / bandwidth)."""

    name: str
    bandwidth_Bps: float
    latency_s: float
    source: str = ""  # how the figures were obtained (measured, or why a default)

    def __post_init__(self) -> None:
        if self.bandwidth_Bps <= 0 or self.latency_s < 0:
            raise ValueError(f"link {self.name!r}: bandwidth must be > 0 and latency >= 0")

    @overload
    def seconds(self, nbytes: float) -> float: ...
    @overload
    def seconds(self, nbytes: npt.NDArray[Any]) -> npt.NDArray[np.float64]: ...
    def seconds(self, nbytes: float | npt.NDArray[Any]) -> float | npt.NDArray[np.float64]:
        return self.latency_s + nbytes / self.bandwidth_Bps


NVLINK4 = Link("nvlink4", 450e9, 2e-6)
NVLINK3 = Link("nvlink3", 300e9, 2e-6)
PCIE4 = Link("pcie4", 25e9, 5e-6)
INFINIBAND_NDR = Link("infiniband-ndr400", 50e9, 5e-6)
INFINIBAND_HDR = Link("infiniband-hdr200", 25e9, 5e-6)


@dataclass(frozen=True)
class Cluster:
    """Identical devices, ``devices_per_node`` per node; devices are numbered node by node."""

    name: str
    device_memory_bytes: float
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    usable_memory_fraction: float = 0.9  # the rest: workspace, activations, fragmentation
    handoff: Link | None = None  # encoder -> decoder KV hand-off, when it has its own path
    device_threads: int = 0  # torch threads per device (CPU worker processes); 0: not a CPU worker
    device_count: int = 0  # devices described (worker processes here); 0: as many as asked for
    notes: str = field(default="", compare=False)
    worker_group: tuple[int, ...] = ()  # each worker a process group of this shape (TP per stage); (): one process

    def __post_init__(self) -> None:
        if self.device_memory_bytes <= 0 or self.devices_per_node < 1:
            raise ValueError(f"cluster {self.name!r}: memory and devices_per_node must be positive")
        if not 0 < self.usable_memory_fraction <= 1:
            raise ValueError(f"cluster {self.name!r}: usable_memory_fraction must be in (0, 1]")
        if self.device_threads < 0 or self.device_count < 0:
            raise ValueError(f"cluster {self.name!r}: device_threads and device_count must be >= 0")
        if any(not isinstance(t, int) or t < 1 for t in self.worker_group):
            raise ValueError(
                f"cluster {self.name!r}: worker_group must list TP degrees >= 1, got {self.worker_group!r}"
            )

    @property
    def usable_memory_bytes(self) -> float:
        return self.device_memory_bytes * self.usable_memory_fraction

    def link_between(self, device_a: int, device_b: int) -> Link:
        same = device_a // self.devices_per_node == device_b // self.devices_per_node
        return self.intra_node if same else self.inter_node

    @property
    def worker_devices(self) -> int:
        """Devices one worker spans: a CPU worker process is one device and forms no pipeline
        or tensor-parallel group with others (0: accelerators, which plans pipeline over)."""
        return 1 if self.device_threads else 0

    @property
    def handoff_note(self) -> str | None:
        """What a plan should say when this cluster cannot know the mesh's hand-off path (None:
        it was measured): WAA plans then cost the KV hand-off at the link between the devices,
        which the mesh's hand-off (a store write and read, a broker hop) does not use."""
        if self.handoff is not None:
            return None
        return (
            f"cluster {self.name!r} has no measured hand-off link: WAA hand-offs are costed at its device link, "
            "not the path the mesh moves KV caches on (`exegpt profile --amqp-url --redis-url` measures it)"
        )

    def handoff_link(self, device_a: int, device_b: int) -> Link:
        """The path a request's KV cache takes from encoder device ``a`` to decoder device ``b``."""
        return self.handoff if self.handoff is not None else self.link_between(device_a, device_b)


@overload
def allreduce_s(link: Link, nbytes: float, group: int) -> float: ...
@overload
def allreduce_s(link: Link, nbytes: npt.NDArray[Any], group: int) -> npt.NDArray[np.float64]: ...
def allreduce_s(link: Link, nbytes: float | npt.NDArray[Any], group: int) -> float | npt.NDArray[np.float64]:
    """Ring all-reduce of ``nbytes`` over ``group`` devices: 2(k-1) steps of nbytes/k each."""
    if group <= 1:
        return 0.0 * nbytes
    steps = 2 * (group - 1)
    return steps * link.latency_s + steps * nbytes / group / link.bandwidth_Bps


@overload
def p2p_s(link: Link, nbytes: float) -> float: ...
@overload
def p2p_s(link: Link, nbytes: npt.NDArray[Any]) -> npt.NDArray[np.float64]: ...
def p2p_s(link: Link, nbytes: float | npt.NDArray[Any]) -> float | npt.NDArray[np.float64]:
    """One point-to-point message (pipeline activations, KV hand-off)."""
    return link.latency_s + nbytes / link.bandwidth_Bps


H200_CLUSTER = Cluster("h200-nvlink-ib", 141e9, 8, NVLINK4, INFINIBAND_NDR)
A100_CLUSTER = Cluster("a100-80g-nvlink-ib", 80e9, 8, NVLINK3, INFINIBAND_HDR)
A40_CLUSTER = Cluster("a40-pcie", 48e9, 8, PCIE4, INFINIBAND_HDR)
CLUSTERS = {c.name: c for c in (H200_CLUSTER, A100_CLUSTER, A40_CLUSTER)}


# --- the JSON form ---------------------------------------------------------------------------


def _require(doc: dict[str, Any], key: str, where: str) -> object:
    if key not in doc:
        raise ClusterError(f"{where}: missing {key!r}")
    return doc[key]


def _number(value: object, where: str, *, positive: bool = False) -> float:
    return float(_checked(value, where, positive=positive, integer=False))


def _integer(value: object, where: str, *, positive: bool = False) -> int:
    return int(_checked(value, where, positive=positive, integer=True))


def _checked(value: object, where: str, *, positive: bool, integer: bool) -> float:
    kind = "an integer" if integer else "a number"
    bad = ClusterError(f"{where} must be {kind} {'> 0' if positive else '>= 0'}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad
    if (integer and not float(value).is_integer()) or not (value > 0 if positive else value >= 0):
        raise bad
    return value


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ClusterError(f"{where} must be a JSON object, got {value!r}")
    return value


def _unknown(doc: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(doc) - allowed)
    if extra:
        raise ClusterError(f"{where}: unknown field {extra[0]!r} (known: {', '.join(sorted(allowed))})")


def _text(doc: dict[str, Any], key: str, where: str, default: str = "") -> str:
    value = doc.get(key, default)
    if not isinstance(value, str):
        raise ClusterError(f"{where}.{key} must be a string, got {value!r}")
    return value


def parse_link(doc: object, where: str) -> Link:
    d = _object(doc, where)
    _unknown(d, {"name", "bandwidth_Bps", "latency_s", "source"}, where)
    return Link(
        _text(d, "name", where, where.rsplit(".", 1)[-1]),
        _number(_require(d, "bandwidth_Bps", where), f"{where}.bandwidth_Bps", positive=True),
        _number(_require(d, "latency_s", where), f"{where}.latency_s"),
        _text(d, "source", where),
    )


def parse_cluster(doc: object) -> Cluster:
    """A ``Cluster`` from its JSON form (see the module docstring); ClusterError quotes what is wrong."""
    d = _object(doc, "cluster")
    _unknown(
        d, {"format", "name", "devices", "devices_per_node", "device", "links", "notes", "worker_group"}, "cluster"
    )
    fmt = d.get("format", CLUSTER_FORMAT)
    if fmt != CLUSTER_FORMAT:
        raise ClusterError(f"cluster.format must be {CLUSTER_FORMAT!r}, got {fmt!r}")
    name = _text(d, "name", "cluster")
    if not name:
        raise ClusterError("cluster: missing 'name'")
    device = _object(_require(d, "device", "cluster"), "cluster.device")
    _unknown(device, {"memory_bytes", "threads", "usable_memory_fraction"}, "cluster.device")
    fraction = _number(
        device.get("usable_memory_fraction", 0.9), "cluster.device.usable_memory_fraction", positive=True
    )
    if fraction > 1:
        raise ClusterError(f"cluster.device.usable_memory_fraction must be <= 1, got {fraction!r}")
    links = _object(_require(d, "links", "cluster"), "cluster.links")
    _unknown(links, {"intra_node", "inter_node", "handoff"}, "cluster.links")
    intra = parse_link(_require(links, "intra_node", "cluster.links"), "cluster.links.intra_node")
    inter = parse_link(links["inter_node"], "cluster.links.inter_node") if "inter_node" in links else intra
    handoff = parse_link(links["handoff"], "cluster.links.handoff") if links.get("handoff") is not None else None
    return Cluster(
        name,
        _number(_require(device, "memory_bytes", "cluster.device"), "cluster.device.memory_bytes", positive=True),
        _integer(_require(d, "devices_per_node", "cluster"), "cluster.devices_per_node", positive=True),
        intra,
        inter,
        fraction,
        handoff,
        _integer(device.get("threads", 0), "cluster.device.threads"),
        _integer(d.get("devices", 0), "cluster.devices"),
        _text(d, "notes", "cluster"),
        _worker_group(d.get("worker_group")),
    )


def _worker_group(doc: object) -> tuple[int, ...]:
    if doc is None:
        return ()
    if not isinstance(doc, list) or not doc or any(type(t) is not int or t < 1 for t in doc):
        raise ClusterError(f"cluster.worker_group must be a list of TP degrees >= 1, got {doc!r}")
    return tuple(doc)


def link_to_dict(link: Link) -> dict[str, Any]:
    out = {"name": link.name, "bandwidth_Bps": link.bandwidth_Bps, "latency_s": link.latency_s}
    return {**out, "source": link.source} if link.source else out


def cluster_to_dict(cluster: Cluster) -> dict[str, Any]:
    """The JSON form ``parse_cluster`` reads back to an equal ``Cluster``."""
    c = cluster
    links = {"intra_node": link_to_dict(c.intra_node), "inter_node": link_to_dict(c.inter_node)}
    if c.handoff is not None:
        links["handoff"] = link_to_dict(c.handoff)
    device: dict[str, Any] = {"memory_bytes": c.device_memory_bytes, "usable_memory_fraction": c.usable_memory_fraction}
    if c.device_threads:
        device["threads"] = c.device_threads
    out: dict[str, Any] = {"format": CLUSTER_FORMAT, "name": c.name}
    if c.device_count:
        out["devices"] = c.device_count
    out.update({"devices_per_node": c.devices_per_node, "device": device, "links": links})
    if c.worker_group:
        out["worker_group"] = list(c.worker_group)
    return {**out, "notes": c.notes} if c.notes else out
