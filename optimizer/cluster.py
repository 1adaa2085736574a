"""Cluster description and collective costs (alpha-beta model per link kind)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    """A link kind: bandwidth per direction and per-message latency."""

    name: str
    bandwidth_Bps: float
    latency_s: float

    def __post_init__(self) -> None:
        if self.bandwidth_Bps <= 0 or self.latency_s < 0:
            raise ValueError(f"link {self.name!r}: bandwidth must be > 0 and latency >= 0")


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

    def __post_init__(self) -> None:
        if self.device_memory_bytes <= 0 or self.devices_per_node < 1:
            raise ValueError(f"cluster {self.name!r}: memory and devices_per_node must be positive")
        if not 0 < self.usable_memory_fraction <= 1:
            raise ValueError(f"cluster {self.name!r}: usable_memory_fraction must be in (0, 1]")

    @property
    def usable_memory_bytes(self) -> float:
        return self.device_memory_bytes * self.usable_memory_fraction

    def link_between(self, device_a: int, device_b: int) -> Link:
        same = device_a // self.devices_per_node == device_b // self.devices_per_node
        return self.intra_node if same else self.inter_node


def allreduce_s(link: Link, nbytes, group: int):
    """Ring all-reduce of ``nbytes`` over ``group`` devices: 2(k-1) steps of nbytes/k each."""
    if group <= 1:
        return 0.0 * nbytes
    steps = 2 * (group - 1)
    return steps * link.latency_s + steps * nbytes / group / link.bandwidth_Bps


def p2p_s(link: Link, nbytes):
    """One point-to-point message (pipeline activations, KV hand-off)."""
    return link.latency_s + nbytes / link.bandwidth_Bps


H200_CLUSTER = Cluster("h200-nvlink-ib", 141e9, 8, NVLINK4, INFINIBAND_NDR)
A100_CLUSTER = Cluster("a100-80g-nvlink-ib", 80e9, 8, NVLINK3, INFINIBAND_HDR)
A40_CLUSTER = Cluster("a40-pcie", 48e9, 8, PCIE4, INFINIBAND_HDR)
CLUSTERS = {c.name: c for c in (H200_CLUSTER, A100_CLUSTER, A40_CLUSTER)}
