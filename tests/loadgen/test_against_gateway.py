"""The load generator against our own gateway: an embedded mesh on tiny-llama behind uvicorn."""

import json
import socket
import threading

import pytest
import uvicorn

from common.config import MeshConfig
from common.transport.connect import LocalHub
from services.cli import main
from services.gateway import ServedModel, create_app
from services.hosting.engines import EngineRunner, load_engine
from services.run.embedded import local_workers

pytestmark = pytest.mark.slow
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def gateway_url():
    config = MeshConfig(model=MODEL, threads=1, device="cpu", namespace="loadgen-gw")
    hub = LocalHub()
    runner = EngineRunner(load_engine(config))
    model = ServedModel(MODEL, runner.engine.tokenizer, runner.engine.max_context)
    app = create_app(config, model, hub=hub, workers=lambda: local_workers(config, hub, runners=[runner]))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # requests queue in the backlog until the app has started
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        runner.close()
        assert not thread.is_alive(), "gateway did not stop"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_forced_lengths_and_metrics_through_our_gateway(gateway_url, tmp_path, endpoint):
    out = tmp_path / "gw.json"
    rc = main(
        [
            "loadgen",
            "--url",
            gateway_url,
            "--endpoint",
            endpoint,
            "--input-tokens",
            "12",
            "--output-tokens",
            "6",
            "--rate",
            "20",
            "--num-requests",
            "16",
            "--seed",
            "4",
            "--max-duration-s",
            "120",
            "--no-plots",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["summary"]["completed"] == 16 and run["summary"]["errors"] == {}
    assert json.loads(out.read_text())["config"]["model"] == MODEL  # from /v1/models
    # ignore_eos + min_tokens reached the engine: exactly the forced length, every request
    assert {r["output_tokens"] for r in run["requests"]} == {6}
    assert all(r["ttft_ms"] is not None and r["ttft_ms"] <= r["e2e_ms"] for r in run["requests"])
    assert run["summary"]["tpot"]["count"] == 16


def test_task_s_fits_tiny_llamas_context(gateway_url, tmp_path):
    """Task S word prompts run to ~2,800 characters, and tiny-llama's byte-level tokenizer counts
    characters: past its 2,048-token context. Sized with its own tokenizer, every request fits."""
    out = tmp_path / "s.json"
    rc = main(
        [
            "loadgen",
            "--url",
            gateway_url,
            "--task",
            "S",
            "--length-scale",
            "1",
            "--rate",
            "50",
            "--num-requests",
            "12",
            "--seed",
            "0",
            "--max-duration-s",
            "300",
            "--no-plots",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["summary"]["errors"] == {}, run["summary"]["error_messages"]
    assert max(r["input_tokens"] for r in run["requests"]) > 400  # long prompts were sent, sized
