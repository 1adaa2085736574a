"""Helpers that run.py starts *inside* the core namespace (``ip netns exec <core> python client.py ...``),
where the gateway and Redis addresses are reachable.

  load      send N completions (C at a time) to the gateway; one JSON line per request on stdout
            as it ends ({"ev": "end", ...}), the full records in --out at the end
  monitor   poll GET /admin/schedule every --interval s; one JSON line per poll: the schedule
            version and the worker ids in its allocation (what the scheduler considers live)
  status    listen to the workers' status fanout ({ns}.status): one JSON line per WorkerStatus
            heartbeat (worker id, state, schedule version), as the scheduler receives them
  health    GET <ops url>/health/ready of a worker (run inside the worker's namespace)
  lengths   the LengthSample records the workers left in Redis ({ns}:stats:lengths): request id ->
            worker that produced its last token (a sample is written once per request, with the
            request's done marker), as JSON on stdout

Only the standard library, httpx and the project's own codec are used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, os.environ.get("EXG_MH_SRC") or str(REPO))  # run.py's frozen copy of the product code

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, the first humans",
    "A recipe for pancakes:",
    "The mesh survived the network partition because",
    "Rabbits and redis walk into a bar;",
]


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


async def one_request(client, url: str, model: str, i: int, tag: str, max_tokens: int, deadline_s: float) -> dict:
    stream = i % 2 == 0  # even: SSE stream, odd: one JSON answer
    prompt = PROMPTS[i % len(PROMPTS)]
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    rec = {
        "i": i,
        "tag": tag,
        "stream": stream,
        "prompt": prompt,
        "id": None,
        "status": None,
        "completed": False,
        "text": "",
        "tokens": None,
        "error": None,
        "hung": False,
        "t_start": time.time(),
        "t_end": None,
        "t_first": None,
    }

    async def run() -> None:
        if not stream:
            r = await client.post(f"{url}/v1/completions", json=body)
            rec["status"] = r.status_code
            data = r.json()
            if r.status_code != 200:
                rec["error"] = json.dumps(data.get("error", data))[:500]
                return
            rec["id"] = data["id"]
            rec["text"] = data["choices"][0]["text"]
            rec["tokens"] = data.get("usage", {}).get("completion_tokens")
            rec["completed"] = data["choices"][0].get("finish_reason") is not None
            return
        body["stream_options"] = {"include_usage": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                rec["error"] = (await r.aread()).decode(errors="replace")[:500]
                return
            finished = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    rec["completed"] = finished
                    if not finished:
                        rec["error"] = "stream ended ([DONE]) without a finish_reason"
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    rec["error"] = json.dumps(chunk["error"])[:500]
                    return
                rec["id"] = rec["id"] or chunk.get("id")
                if chunk.get("usage"):
                    rec["tokens"] = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if rec["t_first"] is None:
                        rec["t_first"] = time.time()
                    rec["text"] += choice.get("text") or ""
                    if choice.get("finish_reason") is not None:
                        finished = True
            rec["error"] = rec["error"] or "stream closed without [DONE]"

    try:
        await asyncio.wait_for(run(), timeout=deadline_s)
    except TimeoutError:
        rec["hung"] = True
        rec["error"] = f"no answer within the {deadline_s:.0f} s deadline"
    except Exception as exc:  # connection refused/reset, bad JSON, ...
        rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
    rec["t_end"] = time.time()
    return rec


async def load(args) -> int:
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    timeout = httpx.Timeout(args.deadline + 30, connect=10)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = (await client.get(f"{args.url}/v1/models")).json()["data"][0]["id"]
        gate = asyncio.Semaphore(args.concurrency)
        records: list[dict] = []

        async def slot(i: int) -> None:
            async with gate:
                emit({"ev": "start", "tag": args.tag, "i": i, "t": time.time()})
                rec = await one_request(client, args.url, model, i, args.tag, args.max_tokens, args.deadline)
                records.append(rec)
                emit(
                    {
                        "ev": "end",
                        "tag": args.tag,
                        "i": i,
                        "ok": rec["completed"] and rec["status"] == 200,
                        "hung": rec["hung"],
                        "t": rec["t_end"],
                        "id": rec["id"],
                        "error": rec["error"],
                    }
                )

        await asyncio.gather(*(slot(i) for i in range(args.n)))
    records.sort(key=lambda r: r["i"])
    Path(args.out).write_text(json.dumps({"model": model, "records": records}, indent=1))
    emit({"ev": "finished", "tag": args.tag, "t": time.time()})
    return 0


async def monitor(args) -> int:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
        while True:
            t = time.time()
            try:
                r = await client.get(f"{args.url}/admin/schedule")
                update = r.json().get("update") or {}
                workers = sorted(a["worker_id"] for a in update.get("allocation") or [])
                emit({"t": t, "version": update.get("version"), "workers": workers})
            except Exception as exc:
                emit({"t": t, "error": f"{type(exc).__name__}: {exc}"[:300]})
            await asyncio.sleep(args.interval)


async def status(args) -> int:
    import aio_pika

    from common.messages import codec
    from common.messages.status import WorkerStatus
    from common.names import Names

    connection = await aio_pika.connect_robust(args.amqp)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        Names(args.namespace).status_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await queue.bind(exchange)
    emit({"t": time.time(), "listening": True})
    async with queue.iterator(no_ack=True) as it:
        async for message in it:
            try:
                s = codec.decode(message.body, WorkerStatus)
                emit(
                    {
                        "t": time.time(),
                        "worker": s.worker_id,
                        "state": s.state,
                        "version": s.schedule_version,
                        "running": s.running,
                    }
                )
            except Exception as exc:  # noqa: BLE001
                emit({"t": time.time(), "error": str(exc)[:200]})
    return 0


async def health(args) -> int:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
        try:
            r = await client.get(f"{args.url}/health/ready")
            print(json.dumps({"status": r.status_code, "body": r.json()}))
        except Exception as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]}))
    return 0


async def lengths(args) -> int:
    import redis.asyncio as aioredis

    from common.messages import codec
    from common.messages.status import LengthSample
    from common.names import Names

    store = aioredis.from_url(args.redis)
    raw = await store.lrange(Names(args.namespace).output_lengths, 0, -1)
    await store.aclose()
    out = []
    for item in raw:
        try:
            s = codec.decode(item, LengthSample)
        except Exception as exc:  # noqa: BLE001 - report, don't die
            out.append({"error": str(exc)})
            continue
        out.append(
            {
                "request_id": s.request_id,
                "worker": s.worker,
                "finished_at": s.finished_at,
                "output_len": s.output_len,
                "finish_reason": s.finish_reason,
            }
        )
    print(json.dumps(out))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("load")
    lp.add_argument("--url", required=True)
    lp.add_argument("--n", type=int, default=60)
    lp.add_argument("--concurrency", type=int, default=8)
    lp.add_argument("--max-tokens", type=int, default=32)
    lp.add_argument("--deadline", type=float, default=120.0)
    lp.add_argument("--tag", default="load")
    lp.add_argument("--out", required=True)
    mp = sub.add_parser("monitor")
    mp.add_argument("--url", required=True)
    mp.add_argument("--interval", type=float, default=1.0)
    sp = sub.add_parser("status")
    sp.add_argument("--amqp", required=True)
    sp.add_argument("--namespace", required=True)
    hp = sub.add_parser("health")
    hp.add_argument("--url", required=True)
    rp = sub.add_parser("lengths")
    rp.add_argument("--redis", required=True)
    rp.add_argument("--namespace", required=True)
    args = p.parse_args()
    fn = {"load": load, "monitor": monitor, "lengths": lengths, "health": health, "status": status}[args.cmd]
    return asyncio.run(fn(args))


if __name__ == "__main__":
    sys.exit(main())
