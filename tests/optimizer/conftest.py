from pathlib import Path

import pytest

from optimizer.cluster import H200_CLUSTER
from optimizer.lengths import TASKS
from optimizer.model import MODELS
from optimizer.profile import parse_profile
from tests.brokers import need

# The repository sits beside shared/ (a fresh clone in CI, a worktree here).
SHARED = Path(__file__).resolve().parents[2] / "../shared"
PROFILES = SHARED / "profiles"
TRACES = SHARED / "traces"


def _read(path: Path) -> str:
    need(path.exists(), f"{path} not present (the shared folder beside the repository)")
    return path.read_text()


@pytest.fixture(scope="session")
def split_text() -> str:
    return _read(PROFILES / "h200-reference-split.jsonl")


@pytest.fixture(scope="session")
def layers_text() -> str:
    return _read(PROFILES / "h200-reference-layers.jsonl")


@pytest.fixture(scope="session")
def trace_text() -> str:
    return _read(TRACES / "azure-llm-2023-conv.csv")


@pytest.fixture(scope="session")
def profile(split_text):
    return parse_profile(split_text)


@pytest.fixture(scope="session")
def opt13b_s(profile):
    from optimizer.analytic import Scenario

    return Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, TASKS["S"], 4)
