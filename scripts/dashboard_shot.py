"""A screenshot of the dashboard of a running mesh: joins a gateway to its namespace, opens the
page in headless Chromium and saves it once the scheduler has searched with calibration.

    python scripts/dashboard_shot.py --amqp-url amqp://... --redis-url redis://... \
        [--namespace NS | --prefix bench-ph-] [--out docs/dashboard.png] [--after-s 50]

Without ``--namespace`` it waits for a new namespace whose name starts with ``--prefix``: one
whose scheduler state record appears after the script starts (``exegpt bench adapt --phases``
names its meshes ``bench-ph-<hex>`` and runs the adaptive one first). It starts ``exegpt
gateway`` on a free loopback port with a fresh admin key, opens ``/dashboard#key=…`` at
1280×800, and saves the whole page once it has been open ``--after-s`` and the state record holds
candidates and calibration points (or at ``--wait-s``), then stops the gateway. Needs Playwright
and Debian's chromium (``deploy/ensure-browser.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dashboard_cpu import ROOT, free_port, stop, wait_ready  # noqa: E402


def new_namespace(client: redis.Redis, prefix: str, timeout_s: float) -> str:
    """The first namespace starting with ``prefix`` whose scheduler state record appears after
    this call began (a mesh started meanwhile, not one left from before)."""

    def names() -> set[str]:
        return {key.decode().split(":", 1)[0] for key in client.scan_iter(f"{prefix}*:scheduler:state")}

    before, deadline = names(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if fresh := names() - before:
            return sorted(fresh)[0]
        time.sleep(1.0)  # a script waiting for a mesh another process starts: polling is the point
    raise SystemExit(f"no new namespace starting with {prefix!r} got a scheduler state within {timeout_s:g} s")


def explained(state: dict) -> bool:
    """The state record shows a search's candidates and the calibrated model's points."""
    record = state.get("state") or {}
    return bool(record.get("candidates")) and bool(record.get("calibration"))


async def shoot(url: str, key: str, chromium: str, out: Path, after_s: float, wait_s: float) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=["--disable-gpu", "--disable-dev-shm-usage"])
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        await page.goto(f"{url}/dashboard#key={key}")
        await page.locator("#board").wait_for(state="visible", timeout=30_000)
        opened = time.monotonic()
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as client:
            while time.monotonic() - opened < wait_s:
                answer = await client.get(f"{url}/admin/dashboard/state", timeout=10)
                if time.monotonic() - opened >= after_s and answer.status_code == 200 and explained(answer.json()):
                    break
                await asyncio.sleep(2.0)  # the page polls on its own; this only decides when to shoot
        await page.screenshot(path=str(out), full_page=True)
        await browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--namespace")
    parser.add_argument("--prefix", default="bench-ph-")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument(
        "--after-s",
        type=float,
        default=50.0,
        help="least time the page is open before the shot (its charts gather a history)",
    )
    parser.add_argument("--wait-s", type=float, default=240.0, help="most time to wait for a search's reasoning")
    parser.add_argument("--chromium", default=os.environ.get("EXEGPT_TEST_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()
    namespace = args.namespace or new_namespace(redis.Redis.from_url(args.redis_url), args.prefix, 900.0)
    key, port = f"sk-{secrets.token_hex(8)}", free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "EXEGPT_ADMIN_KEYS": key, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "gateway",
            "--model",
            args.model,
            "--port",
            str(port),
            "--namespace",
            namespace,
            "--amqp-url",
            args.amqp_url,
            "--redis-url",
            args.redis_url,
            "--threads",
            "1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(url, process)
        asyncio.run(shoot(url, key, args.chromium, args.out, args.after_s, args.wait_s))
    finally:
        stop(process)
    print(f"namespace {namespace}: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
