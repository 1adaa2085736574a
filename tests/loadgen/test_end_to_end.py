"""The load generator against a fake streaming server on loopback: client, runner, CLI, files."""

import json

import httpx
import numpy as np
import pytest

from loadgen.client import RequestSpec, Target, send_request
from loadgen.runner import Workload, relative_clock, run_workload
from services.cli import main


async def test_stream_is_timed_per_chunk_and_forced_length_is_requested(fake_server):
    fake_server.behaviour.first_token_delay_s = 0.05
    fake_server.behaviour.token_delay_s = 0.01
    clock = relative_clock()
    async with httpx.AsyncClient() as client:
        rec = await send_request(client, Target(fake_server.url, "fake-model"), RequestSpec(0, "a b c", 3, 5), clock)
    assert rec.ok and rec.output_tokens == 5 and len(rec.chunk_times_s) == 5
    assert rec.input_tokens == 3  # from the usage chunk
    # the server waits 50 ms before the first token and 10 ms between tokens: the client cannot
    # see token k before 50 + 10 k ms (a chunk read late shortens the next gap, so single gaps
    # are not bounded below)
    assert all(t - rec.sent_s >= 0.05 + 0.01 * k for k, t in enumerate(rec.chunk_times_s))
    assert len(rec.itls_s) == 4
    body = fake_server.behaviour.bodies[0]
    assert body["max_tokens"] == 5 and body["min_tokens"] == 5 and body["ignore_eos"] is True
    assert body["stream"] is True and body["prompt"] == "a b c"


async def test_chat_endpoint(fake_server):
    async with httpx.AsyncClient() as client:
        rec = await send_request(
            client, Target(fake_server.url, "m", endpoint="chat"), RequestSpec(0, "hi there", 2, 4), relative_clock()
        )
    assert rec.ok and rec.output_tokens == 4
    assert fake_server.behaviour.bodies[0]["messages"] == [{"role": "user", "content": "hi there"}]


async def test_errors_are_classified(fake_server):
    fake_server.behaviour.fail_every = 2
    clock = relative_clock()
    async with httpx.AsyncClient() as client:
        target = Target(fake_server.url, "m")
        outcome = await run_workload(
            Workload(tuple(RequestSpec(i, "x", 1, 2) for i in range(4)), concurrency=1),
            lambda s: send_request(client, target, s, clock),
            clock,
            30,
        )
        refused = await send_request(client, Target("http://127.0.0.1:9", "m"), RequestSpec(9, "x", 1, 1), clock)
    assert [r.error for r in outcome.records] == [None, "http_500", None, "http_500"]
    assert refused.error == "connect"


async def test_hung_stream_is_aborted_at_the_deadline(fake_server):
    fake_server.behaviour.hang_every = 2
    clock = relative_clock()
    async with httpx.AsyncClient() as client:
        target = Target(fake_server.url, "m")
        outcome = await run_workload(
            Workload(tuple(RequestSpec(i, "x", 1, 3) for i in range(2)), offsets_s=np.zeros(2)),
            lambda s: send_request(client, target, s, clock),
            clock,
            1.0,
        )
    assert outcome.hit_deadline
    assert sorted(r.error or "ok" for r in outcome.records) == ["aborted", "ok"]


def test_cli_poisson_run_writes_results(fake_server, tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = main(
        [
            "loadgen",
            "--url",
            fake_server.url,
            "--task",
            "S",
            "--rate",
            "50",
            "--num-requests",
            "20",
            "--seed",
            "1",
            "--max-input-tokens",
            "64",
            "--slo-ttft-ms",
            "5000",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    summary = result["runs"][0]["summary"]
    assert summary["requests"] == 20 and summary["completed"] == 20 and summary["errors"] == {}
    assert summary["slo_attainment"] == 1.0 and summary["goodput"] > 0
    assert result["config"]["model"] == "fake-model"  # asked the server's /v1/models
    # the forced output lengths of task S reached the server and came back
    sent = [b["max_tokens"] for b in fake_server.behaviour.bodies]
    got = [r["output_tokens"] for r in sorted(result["runs"][0]["requests"], key=lambda r: r["index"])]
    assert sorted(sent) == sorted(got) and all(1 <= n <= 80 for n in sent)
    assert (tmp_path / "run.csv").read_text().count("\n") == 21
    assert (tmp_path / "run-cdf.png").stat().st_size > 1000
    assert "TTFT" in capsys.readouterr().out


def test_cli_sweep_and_bisection(fake_server, tmp_path):
    fake_server.behaviour.token_delay_s = 0.002
    rc = main(
        [
            "loadgen",
            "--url",
            fake_server.url,
            "--model",
            "m",
            "--input-tokens",
            "8",
            "--output-tokens",
            "4",
            "--sweep",
            "20,40",
            "--num-requests",
            "10",
            "--out",
            str(tmp_path / "sweep.json"),
            "--quiet",
        ]
    )
    assert rc == 0
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert [r["rate_per_s"] for r in runs] == [20, 40]
    assert (tmp_path / "sweep-rates.png").exists() and (tmp_path / "sweep-rates.csv").exists()

    # a fake server that takes 0.3 s per request meets a 100 ms E2E SLO at no rate
    fake_server.behaviour.first_token_delay_s = 0.3
    rc = main(
        [
            "loadgen",
            "--url",
            fake_server.url,
            "--model",
            "m",
            "--input-tokens",
            "8",
            "--output-tokens",
            "2",
            "--find-max-rate",
            "--rate-min",
            "10",
            "--rate-max",
            "40",
            "--slo-e2e-ms",
            "100",
            "--num-requests",
            "4",
            "--no-plots",
            "--out",
            str(tmp_path / "bisect.json"),
            "--quiet",
        ]
    )
    bisection = json.loads((tmp_path / "bisect.json").read_text())["bisection"]
    assert rc == 0 and bisection["max_rate_per_s"] is None
    assert [t[0] for t in bisection["tried"]] == [40, 10]


def test_cli_closed_loop_and_trace(fake_server, tmp_path):
    rc = main(
        [
            "loadgen",
            "--url",
            fake_server.url,
            "--model",
            "m",
            "--concurrency",
            "4",
            "--input-tokens",
            "8",
            "--output-tokens",
            "3",
            "--num-requests",
            "12",
            "--no-plots",
            "--out",
            str(tmp_path / "closed.json"),
            "--quiet",
        ]
    )
    assert rc == 0
    assert json.loads((tmp_path / "closed.json").read_text())["runs"][0]["summary"]["completed"] == 12
    trace = tmp_path / "t.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(f"2023-11-16 18:15:{10 + i}.0000000,{100 * (i + 1)},{10 * (i + 1)}\n" for i in range(5))
    )
    rc = main(
        [
            "loadgen",
            "--url",
            fake_server.url,
            "--model",
            "m",
            "--trace",
            str(trace),
            "--time-scale",
            "50",
            "--length-scale",
            "0.1",
            "--num-requests",
            "5",
            "--no-plots",
            "--out",
            str(tmp_path / "trace.json"),
            "--quiet",
        ]
    )
    assert rc == 0
    sent = [(len(b["prompt"].split()), b["max_tokens"]) for b in fake_server.behaviour.bodies[12:]]
    assert sorted(sent) == [(10, 1), (20, 2), (30, 3), (40, 4), (50, 5)]


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.1.2.3:8000"])
def test_cli_refuses_remote_targets(url, capsys):
    assert main(["loadgen", "--url", url, "--rate", "1", "--num-requests", "1"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_cli_needs_an_arrival_choice(capsys):
    assert main(["loadgen", "--num-requests", "1"]) == 2
    assert "--rate" in capsys.readouterr().err


async def test_failed_requests_keep_the_servers_message(fake_server):
    fake_server.behaviour.fail_every = 2
    fake_server.behaviour.stream_error_every = 3
    clock = relative_clock()
    async with httpx.AsyncClient() as client:
        target = Target(fake_server.url, "m")
        records = [await send_request(client, target, RequestSpec(i, "x", 1, 3), clock) for i in range(3)]
    assert [(r.error, r.error_message) for r in records] == [
        (None, None),
        ("http_500", "boom"),
        ("stream_error", "engine fell over"),
    ]


def test_cli_caps_prompt_and_output_by_the_listed_context(fake_server, tmp_path, capsys):
    """Task S prompts run to 512 tokens; a server listing a 200-token context gets none longer
    than it holds, so nothing is refused."""
    fake_server.behaviour.max_context = 200
    out = tmp_path / "run.json"
    rc = main(
        [
            "loadgen",
            "--url",
            fake_server.url,
            "--task",
            "S",
            "--rate",
            "200",
            "--num-requests",
            "40",
            "--seed",
            "3",
            "--no-plots",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads(out.read_text())["runs"][0]["summary"]
    assert summary["completed"] == 40 and summary["errors"] == {}
    sizes = [len(b["prompt"].split()) + b["max_tokens"] for b in fake_server.behaviour.bodies]
    assert max(sizes) == 200  # capped, and some prompts were cut to the cap
    assert "capped at 200 tokens" in capsys.readouterr().out
    # --max-context overrides what the server lists
    fake_server.behaviour.bodies.clear()
    assert (
        main(
            [
                "loadgen",
                "--url",
                fake_server.url,
                "--task",
                "S",
                "--rate",
                "200",
                "--num-requests",
                "20",
                "--seed",
                "3",
                "--max-context",
                "50",
                "--no-plots",
                "--out",
                str(tmp_path / "small.json"),
                "--quiet",
            ]
        )
        == 0
    )
    assert max(len(b["prompt"].split()) + b["max_tokens"] for b in fake_server.behaviour.bodies) <= 50


def test_cli_reports_failures_in_files_summary_and_plot_title(fake_server, tmp_path, capsys):
    from PIL import Image

    fake_server.behaviour.fail_every = 3
    out = tmp_path / "run.json"
    rc = main(
        [
            "loadgen",
            "--url",
            fake_server.url,
            "--task",
            "S",
            "--rate",
            "100",
            "--num-requests",
            "9",
            "--seed",
            "2",
            "--max-input-tokens",
            "32",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    requests = json.loads(out.read_text())["runs"][0]["requests"]
    assert sorted(r["error_message"] for r in requests) == [""] * 6 + ["boom"] * 3
    summary = json.loads(out.read_text())["runs"][0]["summary"]
    assert summary["error_messages"] == {"http_500": "boom"}
    csv_text = (tmp_path / "run.csv").read_text()
    assert "error_message" in csv_text.splitlines()[0] and csv_text.count(",boom") == 3
    printed = capsys.readouterr().out
    assert "3/9 requests failed (33%); most common: http_500 ×3: boom" in printed
    title = Image.open(tmp_path / "run-cdf.png").text["Title"]
    assert all(part in title for part in ("fake-model", "task S", fake_server.url, "3/9 failed"))
    assert "http_500" in title


def test_cli_sweep_prints_each_rates_failures(fake_server, tmp_path, capsys):
    fake_server.behaviour.fail_every = 2
    rc = main(
        [
            "loadgen",
            "--url",
            fake_server.url,
            "--model",
            "m",
            "--input-tokens",
            "4",
            "--output-tokens",
            "2",
            "--sweep",
            "50,100",
            "--num-requests",
            "4",
            "--out",
            str(tmp_path / "sweep.json"),
            "--quiet",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "50 req/s: 2/4 requests failed" in printed and "100 req/s: 2/4 requests failed" in printed
    from PIL import Image

    assert "4/8 failed" in Image.open(tmp_path / "sweep-rates.png").text["Title"]
