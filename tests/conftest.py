"""Fixtures every service test shares: a unique namespace, and both transports."""

from __future__ import annotations

import uuid

import pytest

from tests.brokers import require_broker


@pytest.fixture
def namespace() -> str:
    """Every queue, exchange and key of one test lives under this; parallel runs never collide."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", pytest.param("broker", marks=pytest.mark.broker)])
def transport_kind(request: pytest.FixtureRequest) -> str:
    """The same case runs on the in-memory twins and on the real RabbitMQ and Redis."""
    if request.param == "broker":
        require_broker()
    return request.param


@pytest.fixture(autouse=True)
def batch_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """Batch data of a test (and of the processes it starts) goes to a folder of its own."""
    folder = str(tmp_path_factory.mktemp("batches"))
    monkeypatch.setenv("EXEGPT_BATCH_DIR", folder)
    return folder
