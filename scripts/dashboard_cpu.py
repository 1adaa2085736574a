"""What one open dashboard costs the gateway: its process's CPU time over a window with no page,
then over the same window with one headless Chromium page polling ``/dashboard``.

    python scripts/dashboard_cpu.py [--model tiny-llama] [--window-s 60] [--chromium /usr/bin/chromium]

Starts ``exegpt serve`` (embedded: gateway, scheduler and one worker in one process) with an
admin key on a free port, waits until it answers, lets it settle, then reads the process's user
+ system CPU seconds (``/proc/PID/stat``) over ``--window-s`` without a page and again with the
page open (a fresh browser, the key given as ``#key=``). Prints both, the difference, and that
difference as a share of one core. No traffic is sent: the figure is the page's own cost on a
mesh that is otherwise idle. Needs Playwright and Debian's chromium (``deploy/ensure-browser.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parents[1]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"exegpt serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # a script waiting for a server it started: polling is the point
    raise SystemExit(f"exegpt serve did not become ready within {timeout_s:g} s")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL if it has not exited within 30 s."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


async def with_page(url: str, key: str, chromium: str, window_s: float, pid: int) -> float:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium)
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        await page.goto(f"{url}/dashboard#key={key}")
        await page.locator("#board").wait_for(state="visible", timeout=30_000)
        start = cpu_s(pid)
        await asyncio.sleep(window_s)  # the measuring window
        used = cpu_s(pid) - start
        polls = await page.evaluate(
            "performance.getEntriesByType('resource').filter(e => e.name.includes('/admin/dashboard/state')).length"
        )
        await browser.close()
    print(f"  page polls seen by the browser: {polls}")
    return used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--settle-s", type=float, default=10.0, help="wait after ready before measuring")
    parser.add_argument("--chromium", default=os.environ.get("EXEGPT_TEST_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()
    key, port = f"sk-{secrets.token_hex(8)}", free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "EXEGPT_ADMIN_KEYS": key, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--model", args.model, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(url, process)
        time.sleep(args.settle_s)  # let start-up work (the first plan, warm-up) finish
        start = cpu_s(process.pid)
        time.sleep(args.window_s)  # the measuring window
        idle = cpu_s(process.pid) - start
        page = asyncio.run(with_page(url, key, args.chromium, args.window_s, process.pid))
    finally:
        stop(process)
    added = page - idle
    print(f"exegpt serve --model {args.model}, {args.window_s:g} s windows:")
    print(f"  no page:       {idle:.2f} CPU s ({100 * idle / args.window_s:.1f} % of a core)")
    print(f"  one page open: {page:.2f} CPU s ({100 * page / args.window_s:.1f} % of a core)")
    print(
        f"  added by the page: {added:.2f} CPU s ({100 * added / args.window_s:.1f} % of a core, "
        f"{1000 * added / args.window_s:.1f} ms per second)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
