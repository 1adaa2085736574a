"""End to end on this machine: `exegpt profile` writes what `exegpt plan` reads."""

from __future__ import annotations

import json

import pytest

from services.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def _models_dir(models, monkeypatch):
    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(models))  # tiny models are written here, not in ~/.cache


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, models):
    """A quick tiny-llama profile (lengths up to 1024: task S's prompts and contexts) and this machine."""
    out = tmp_path_factory.mktemp("profile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXEGPT_MODELS_DIR", str(models))
        assert (
            main(
                [
                    "profile",
                    "--model",
                    "tiny-llama",
                    "--quick",
                    "--repeats",
                    "1",
                    "--device",
                    "cpu",
                    "--out",
                    str(out / "p.jsonl"),
                    "--cluster-out",
                    str(out / "cluster.json"),
                ]
            )
            == 0
        )
    return out


def _plan(profiled, *extra, cluster=None, devices="2", task="S"):
    return main(
        [
            "plan",
            "--profile",
            str(profiled / "p.jsonl"),
            "--cluster",
            cluster or str(profiled / "cluster.json"),
            "--model",
            "tiny-llama",
            "--devices",
            devices,
            "--task",
            task,
            "--latency-bound",
            "inf",
            *extra,
        ]
    )


def test_profile_then_plan_on_this_machine(profiled, capsys):
    assert _plan(profiled, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schedule"]["num_devices"] == 2 and doc["predicted"]["throughput_seq_s"] > 0
    assert doc["latency_bound_s"] is None


def test_the_whole_layer_file_plans_too(profiled, capsys):
    assert (
        main(
            [
                "plan",
                "--profile",
                str(profiled / "p-layers.jsonl"),
                "--cluster",
                str(profiled / "cluster.json"),
                "--model",
                "tiny-llama",
                "--devices",
                "2",
                "--task",
                "S",
                "--latency-bound",
                "inf",
            ]
        )
        == 0
    )
    assert "seq/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(devices="3"), "has 2 devices, --devices asks for 3"),
        (dict(cluster="no-such-cluster"), "unknown cluster 'no-such-cluster': not a preset"),
        (dict(task="C2"), "profile longer lengths with `exegpt profile --max-len 1544`"),
    ],
)
def test_plan_errors_on_this_machine_are_one_line(profiled, capsys, extra, message):
    assert _plan(profiled, **extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_cluster_file_with_a_bad_value_is_quoted(profiled, tmp_path, capsys):
    doc = json.loads((profiled / "cluster.json").read_text())
    doc["links"]["handoff"]["latency_s"] = "fast"
    (tmp_path / "c.json").write_text(json.dumps(doc))
    assert _plan(profiled, cluster=str(tmp_path / "c.json")) == 2
    assert "cluster.links.handoff.latency_s must be a number >= 0, got 'fast'" in capsys.readouterr().err


def test_a_profile_for_another_model_names_what_it_has(profiled, capsys):
    assert (
        main(
            [
                "plan",
                "--profile",
                str(profiled / "p.jsonl"),
                "--model",
                "tiny-opt",
                "--devices",
                "2",
                "--task",
                "S",
                "--latency-bound",
                "inf",
            ]
        )
        == 2
    )
    assert "no rows for model 'tiny-opt'" in capsys.readouterr().err
