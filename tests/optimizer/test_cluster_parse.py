"""Cluster descriptions: presets, link kinds, the JSON form and its validation (pure, no files)."""

import copy
import json

import pytest

from optimizer.cluster import CLUSTERS, H200_CLUSTER, Cluster, ClusterError, Link, cluster_to_dict, parse_cluster

CPU = {
    "format": "exegpt-cluster/1",
    "name": "cpu-2x1t",
    "devices": 2,
    "devices_per_node": 2,
    "device": {"memory_bytes": 12e9, "threads": 1, "usable_memory_fraction": 0.9},
    "links": {
        "intra_node": {"name": "loopback", "bandwidth_Bps": 1e9, "latency_s": 1e-4},
        "handoff": {"name": "redis+rabbitmq", "bandwidth_Bps": 3e8, "latency_s": 6e-4, "source": "measured"},
    },
    "notes": "two worker processes",
}


def test_presets_keep_working_without_link_kinds():
    assert set(CLUSTERS) == {"h200-nvlink-ib", "a100-80g-nvlink-ib", "a40-pcie"}
    for c in CLUSTERS.values():
        assert c.handoff is None and c.device_count == 0
        assert c.handoff_link(0, 1) is c.intra_node and c.handoff_link(7, 8) is c.inter_node
        assert parse_cluster(cluster_to_dict(c)) == c


def test_a_cpu_cluster_parses_with_its_handoff_link_and_threads():
    c = parse_cluster(CPU)
    assert (c.name, c.device_count, c.devices_per_node, c.device_threads) == ("cpu-2x1t", 2, 2, 1)
    assert c.usable_memory_bytes == pytest.approx(0.9 * 12e9)
    assert c.inter_node == c.intra_node  # one node: inter_node defaults to intra_node
    assert c.handoff_link(0, 1) == Link("redis+rabbitmq", 3e8, 6e-4, "measured")
    assert c.handoff_link(0, 1).seconds(3e8) == pytest.approx(1.0006)
    assert c.link_between(0, 1).name == "loopback"


def test_round_trip_through_json_text():
    c = parse_cluster(CPU)
    again = parse_cluster(json.loads(json.dumps(cluster_to_dict(c))))
    assert again == c and again.notes == c.notes


def _with(path: str, value):
    doc = copy.deepcopy(CPU)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize(
    "path, value, message",
    [
        (
            "links.handoff.bandwidth_Bps",
            "10 GB/s",
            "cluster.links.handoff.bandwidth_Bps must be a number > 0, got '10 GB/s'",
        ),
        ("links.intra_node.latency_s", -1, "cluster.links.intra_node.latency_s must be a number >= 0, got -1"),
        ("device.memory_bytes", 0, "cluster.device.memory_bytes must be a number > 0, got 0"),
        ("device.memory_bytes", KeyError, "cluster.device: missing 'memory_bytes'"),
        ("device.threads", 1.5, "cluster.device.threads must be an integer >= 0, got 1.5"),
        ("device.usable_memory_fraction", 1.5, "usable_memory_fraction must be <= 1, got 1.5"),
        ("devices_per_node", True, "cluster.devices_per_node must be an integer > 0, got True"),
        ("devices", "two", "cluster.devices must be an integer >= 0, got 'two'"),
        ("links", [], "cluster.links must be a JSON object, got []"),
        ("links.intra_node", KeyError, "cluster.links: missing 'intra_node'"),
        ("links.handoff.bandwith_Bps", 1, "cluster.links.handoff: unknown field 'bandwith_Bps'"),
        ("format", "exegpt-cluster/9", "cluster.format must be 'exegpt-cluster/1', got 'exegpt-cluster/9'"),
        ("name", 3, "cluster.name must be a string, got 3"),
        ("gpus", 8, "cluster: unknown field 'gpus'"),
    ],
)
def test_bad_values_are_quoted_in_the_error(path, value, message):
    with pytest.raises(ClusterError) as exc:
        parse_cluster(_with(path, value))
    assert message in str(exc.value)


def test_a_cluster_must_be_an_object():
    with pytest.raises(ClusterError, match=r"cluster must be a JSON object, got \[1\]"):
        parse_cluster([1])


def test_cluster_fields_default_as_before():
    c = Cluster("x", 1e9, 8, H200_CLUSTER.intra_node, H200_CLUSTER.inter_node)
    assert (c.handoff, c.device_threads, c.device_count, c.usable_memory_fraction) == (None, 0, 0, 0.9)


def test_load_cluster_names_the_file_in_errors(tmp_path):
    from optimizer.io import load_cluster

    good, bad, broken = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "broken.json"
    good.write_text(json.dumps(CPU))
    bad.write_text(json.dumps(_with("device.memory_bytes", -5)))
    broken.write_text("{")
    assert load_cluster(good) == parse_cluster(CPU)
    with pytest.raises(ClusterError, match=f"{bad}: cluster.device.memory_bytes must be a number > 0, got -5"):
        load_cluster(bad)
    with pytest.raises(ClusterError, match=f"{broken}: not JSON"):
        load_cluster(broken)
    with pytest.raises(ValueError, match="cannot read"):
        load_cluster(tmp_path / "missing.json")
