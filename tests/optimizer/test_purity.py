"""optimizer/ imports nothing with I/O or hardware behind it (see the import-linter contract)."""

import shutil
import subprocess
import sys
from pathlib import Path

from tests.brokers import need

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("services", "common.transport", "engine", "loadgen", "aio_pika", "redis", "torch", "fastapi")


def test_importing_every_optimizer_module_loads_nothing_forbidden():
    modules = sorted(p.stem for p in (ROOT / "optimizer").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        + "".join(f"import optimizer.{m}\n" for m in modules)
        + f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m in {FORBIDDEN!r}]\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert len(modules) >= 8
    assert out.stdout.strip() == ""


def test_import_linter_contracts_hold():
    need(shutil.which("lint-imports") is not None, "import-linter not installed (pip install -e '.[test]')")
    out = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "optimizer is pure: no services, transports, engine or torch KEPT" in out.stdout
    assert "only common.transport talks to RabbitMQ, Redis and NIXL KEPT" in out.stdout
