"""The layers of docs/architecture.md hold: import-linter's contracts pass, with no exceptions."""

import shutil
import subprocess
import tomllib
from pathlib import Path

from tests.brokers import need

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["services", "loadgen", "common | engine | optimizer"]


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_layers_contract_names_every_package_in_order():
    (layers,) = [c for c in contracts() if c["type"] == "layers" and "containers" not in c]
    assert layers["layers"] == LAYERS
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == {"services", "loadgen", "common", "engine", "optimizer"}


def test_the_services_contract_places_every_part_of_services():
    (inside,) = [c for c in contracts() if c.get("containers") == ["services"]]
    named = {part.strip() for layer in inside["layers"] for part in layer.split("|")}
    parts = {p.parent.name for p in (ROOT / "services").glob("*/__init__.py")}
    parts |= {p.stem for p in (ROOT / "services").glob("*.py") if p.stem != "__init__"}
    assert named == parts


def test_no_contract_has_exceptions():
    assert all("ignore_imports" not in c for c in contracts())


def test_every_contract_holds():
    need(shutil.which("lint-imports") is not None, "import-linter not installed (pip install -e '.[test]')")
    out = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(contracts())} kept, 0 broken" in out.stdout
