"""`exegpt loadgen`: load an OpenAI-compatible server and report latency, throughput, goodput.

Examples::

    exegpt loadgen --url http://127.0.0.1:8000 --task S --rate 10 --num-requests 200 --seed 1 \
        --out results/run.json
    exegpt loadgen --task C1 --arrival gamma --burstiness 0.5 --rate 4 --slo-ttft-ms 500
    exegpt loadgen --trace ../shared/traces/azure-llm-2023-conv.csv --time-scale 5 --length-scale 0.1
    exegpt loadgen --task S --sweep 1,2,4,8 --slo-e2e-ms 3000
    exegpt loadgen --task S --find-max-rate --target-attainment 0.9 --slo-ttft-ms 1000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cli import CliError

if TYPE_CHECKING:
    from loadgen.arrivals import ArrivalKind

DEFAULT_TRACE = Path(__file__).resolve().parents[1] / ".." / "shared" / "traces" / "azure-llm-2023-conv.csv"


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of rates: {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive: {text!r}")
    return rates


def add_arguments(p: argparse.ArgumentParser) -> None:
    tgt = p.add_argument_group("target")
    tgt.add_argument(
        "--target",
        choices=("rest", "batch"),
        default="rest",
        help="rest: an OpenAI-compatible server; batch: the mesh's batch-job queue "
        "(every request submitted at once as one batch, timed to the last result)",
    )
    tgt.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    tgt.add_argument("--amqp-url", help="batch target: RabbitMQ URL (default EXEGPT_AMQP_URL)")
    tgt.add_argument("--redis-url", help="batch target: Redis URL (default EXEGPT_REDIS_URL)")
    tgt.add_argument("--namespace", help="batch target: mesh namespace (default exegpt)")
    tgt.add_argument("--model", help="model name to request (default: the server's first model)")
    tgt.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    tgt.add_argument("--api-key", help="sent as a Bearer token")
    tgt.add_argument("--allow-remote", action="store_true", help="allow a target that is not on this machine")
    tgt.add_argument("--request-timeout-s", type=float, default=300.0)
    tgt.add_argument(
        "--no-ignore-eos", action="store_true", help="do not send ignore_eos/min_tokens (the server may stop early)"
    )

    wl = p.add_argument_group("requests")
    wl.add_argument("--num-requests", type=int, default=100)
    wl.add_argument("--seed", type=int, default=0)
    wl.add_argument("--task", default="S", help="paper task S|T|G|C1|C2 for the lengths")
    wl.add_argument("--input-tokens", type=int, help="fixed prompt length (overrides --task)")
    wl.add_argument("--output-tokens", type=int, help="fixed output length (overrides --task)")
    wl.add_argument("--lengths-file", type=Path, help="CSV or JSONL with input_tokens,output_tokens")
    wl.add_argument(
        "--trace",
        type=Path,
        nargs="?",
        const=DEFAULT_TRACE,
        help="replay a trace (default: the Azure 2023 conversation trace)",
    )
    wl.add_argument("--time-scale", type=float, default=1.0, help="trace speed-up factor")
    wl.add_argument("--length-scale", type=float, default=1.0, help="multiply every length")
    wl.add_argument("--max-input-tokens", type=int, help="cap prompt lengths")
    wl.add_argument(
        "--tokenizer",
        metavar="FILE|MODEL|auto|none",
        default="auto",
        help="size prompts to exactly the requested token count with a tokenizer.json "
        "or a model's tokenizer (smollm2, tiny-llama, a model folder); auto "
        "(default): the served model's, when this machine can load it; none: "
        "word prompts (about one token per word with BPE tokenizers)",
    )
    wl.add_argument(
        "--max-context",
        type=int,
        metavar="N",
        help="cap each request's prompt + output tokens at N (default: the context "
        "/v1/models states as max_model_len or context_length, else the context "
        "of the model whose tokenizer sizes the prompts)",
    )

    ar = p.add_argument_group("arrivals")
    ar.add_argument(
        "--arrival",
        choices=("poisson", "gamma", "constant", "closed", "trace"),
        help="default: trace with --trace, closed with --concurrency, else poisson",
    )
    ar.add_argument("--rate", type=float, help="requests per second")
    ar.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier, >1 smoother")
    ar.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    ar.add_argument(
        "--max-duration-s",
        type=float,
        default=600.0,
        help="stop each run after this long; in-flight requests count as aborted",
    )

    slo = p.add_argument_group("SLOs and rate search")
    slo.add_argument("--slo-ttft-ms", type=float)
    slo.add_argument("--slo-tpot-ms", type=float)
    slo.add_argument("--slo-e2e-ms", type=float)
    slo.add_argument("--sweep", type=_rates, metavar="R1,R2,...", help="one run per rate")
    slo.add_argument(
        "--find-max-rate", action="store_true", help="bisect to the highest rate meeting --target-attainment"
    )
    slo.add_argument("--target-attainment", type=float, default=0.9)
    slo.add_argument("--rate-min", type=float, default=0.25)
    slo.add_argument("--rate-max", type=float, default=32.0)
    slo.add_argument("--max-runs", type=int, default=7, help="bisection runs at most")

    out = p.add_argument_group("output")
    out.add_argument(
        "--out", type=Path, help="results JSON (CSV and PNG beside it); default results/loadgen-<time>.json"
    )
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadgen",
        help="load an OpenAI-compatible server, report TTFT/TPOT/goodput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def _arrival(args: argparse.Namespace) -> ArrivalKind:
    if args.arrival:
        return args.arrival  # one of ARRIVAL_KINDS: the option's choices
    if args.sweep or args.find_max_rate or args.rate is not None:
        return "poisson"
    if args.concurrency:
        return "closed"
    if args.trace:
        return "trace"
    raise CliError("give --rate, --concurrency, --trace, --sweep or --find-max-rate")


def _workload_spec(args: argparse.Namespace) -> Any:
    from loadgen.workload import WorkloadSpec

    arrival = _arrival(args)
    if (args.sweep or args.find_max_rate) and arrival not in ("poisson", "gamma", "constant"):
        raise CliError(f"a rate sweep or search needs rate-driven arrivals, not {arrival}")
    if args.trace is not None and not Path(args.trace).exists():
        raise CliError(f"trace file not found: {args.trace}")
    if args.lengths_file is not None and not args.lengths_file.exists():
        raise CliError(f"lengths file not found: {args.lengths_file}")
    try:
        return WorkloadSpec(
            num_requests=args.num_requests,
            seed=args.seed,
            arrival=arrival,
            rate_per_s=args.rate if args.rate is not None else (1.0 if args.sweep or args.find_max_rate else None),
            burstiness=args.burstiness,
            concurrency=args.concurrency,
            task=args.task,
            lengths_file=args.lengths_file,
            fixed_input_tokens=args.input_tokens,
            fixed_output_tokens=args.output_tokens,
            trace_file=args.trace,
            time_scale=args.time_scale,
            length_scale=args.length_scale,
            max_input_tokens=args.max_input_tokens,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from loadgen.safety import is_loopback_url

    if args.target == "batch":
        return _run_batch(args)
    if not args.allow_remote and not is_loopback_url(args.url):
        raise CliError(f"{args.url} is not a loopback address; pass --allow-remote to load it")
    if args.max_duration_s <= 0 or args.num_requests < 1:
        raise CliError("--max-duration-s must be > 0 and --num-requests >= 1")
    if args.find_max_rate and not 0 < args.rate_min < args.rate_max:
        raise CliError(f"need 0 < --rate-min < --rate-max, got {args.rate_min}, {args.rate_max}")
    spec = _workload_spec(args)
    return asyncio.run(_main(args, spec))


CONTEXT_FIELDS = ("max_model_len", "context_length", "max_context_length", "max_context")


async def _served_model(client: Any, url: str, wanted: str | None) -> tuple[str, int | None]:
    """The model to request (``wanted``, else the server's first) and the context length its
    ``/v1/models`` entry states, if any. Without ``wanted`` the listing must be readable."""
    import httpx

    root = url.rstrip("/")
    root = root if root.endswith("/v1") else root + "/v1"
    try:
        resp = await client.get(root + "/models", timeout=10.0)
        resp.raise_for_status()
        entries = [e for e in resp.json()["data"] if isinstance(e, dict)]
        entry = next((e for e in entries if e.get("id") == wanted), None) if wanted else entries[0]
        name = wanted or str(entries[0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
        if wanted:
            return wanted, None
        raise CliError(f"could not list models at {root}/models ({exc}); pass --model") from None
    for key in CONTEXT_FIELDS:
        value = (entry or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return name, value
    return name, None


@dataclasses.dataclass(frozen=True)
class PromptTokenizer:
    """What sizes the prompts: encode/decode (None: word prompts) and the context of the model the
    tokenizer belongs to (None when unknown or when prompts do not count towards it)."""

    encode: Any = None
    decode: Any = None
    max_context: int | None = None
    source: str | None = None  # for the printed note: which tokenizer


def load_model_tokenizer(model: str) -> Any:
    """``engine.load_tokenizer``: a model's tokenizer and context, read without weights or torch."""
    from engine import load_tokenizer

    return load_tokenizer(model)


def _prompt_tokenizer(spec: str | None, model: str | None) -> PromptTokenizer:
    """The tokenizer ``--tokenizer`` names; ``auto`` tries the served model's and quietly falls
    back to word prompts when this machine cannot load it."""
    if spec is None or spec == "none":
        return PromptTokenizer()
    if spec != "auto" and Path(spec).is_file() and not spec.endswith(".gguf"):
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(spec)
        except Exception as exc:  # the library raises a bare Exception for unreadable files
            raise CliError(f"cannot read tokenizer {spec}: {exc}") from None
        return PromptTokenizer(
            (lambda text: tok.encode(text, add_special_tokens=False).ids),
            (lambda ids: tok.decode(list(ids))),
            None,
            spec,
        )
    name = model if spec == "auto" else spec
    if name is None:
        return PromptTokenizer()
    try:
        info = load_model_tokenizer(name)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        if spec == "auto":
            return PromptTokenizer()
        raise CliError(f"--tokenizer {spec}: neither a tokenizer.json nor a loadable model ({exc})") from None
    context = info.max_context if getattr(info, "prompt_in_context", True) else None
    return PromptTokenizer(info.tokenizer.encode, info.tokenizer.decode, context, f"{name}'s tokenizer")


def _fit_spec(
    console: Any, args: argparse.Namespace, spec: Any, tok: PromptTokenizer, listed_context: int | None
) -> Any:
    """The workload spec with the context cap, and a note on how prompts are sized."""
    if args.max_context is not None and args.max_context < 2:
        raise CliError(f"--max-context must be >= 2, got {args.max_context}")
    context = args.max_context or listed_context or tok.max_context
    note = (
        f"prompts sized with {tok.source}"
        if tok.source
        else "prompts of common words (about one token per word with BPE tokenizers)"
    )
    if context:
        note += f"; prompt + output capped at {context} tokens"
    if not args.quiet:
        console.print(f"[dim]{note}")
    return dataclasses.replace(spec, max_context=context) if context else spec


async def _main(args: argparse.Namespace, spec: Any) -> int:
    import sys

    import httpx
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from loadgen.client import Target, send_request
    from loadgen.metrics import Slo, summarize
    from loadgen.runner import relative_clock, run_workload
    from loadgen.search import find_max_rate, sweep
    from loadgen.workload import build_workload

    # piped output (logs, reports) gets room for the wide tables; a terminal keeps its width
    console = Console() if sys.stdout.isatty() else Console(width=150)
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
    runs: list[tuple[float | None, Any, Any, int]] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=args.request_timeout_s) as client:
        model, listed_context = await _served_model(client, args.url, args.model)
        tok = _prompt_tokenizer(args.tokenizer, model)
        spec = _fit_spec(console, args, spec, tok, listed_context)
        encode, decode = tok.encode, tok.decode
        target = Target(
            args.url, model, args.endpoint, args.api_key, args.request_timeout_s, ignore_eos=not args.no_ignore_eos
        )

        async def measure(rate: float | None) -> Any:
            run_spec = spec if rate is None else dataclasses.replace(spec, rate_per_s=rate)
            workload = build_workload(run_spec, encode, decode)
            clock = relative_clock()
            label = f"{rate:g} req/s" if rate is not None else spec.arrival
            with Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
                disable=args.quiet,
            ) as progress:
                bar = progress.add_task(label, total=len(workload.specs))
                outcome = await run_workload(
                    workload,
                    lambda s: send_request(client, target, s, clock),
                    clock,
                    args.max_duration_s,
                    on_record=lambda r: progress.advance(bar),
                )
            summary = summarize(list(outcome.records), slo)
            runs.append((rate, summary, outcome.records, outcome.not_sent))
            if outcome.hit_deadline:
                console.print(
                    f"[yellow]{label}: stopped at --max-duration-s {args.max_duration_s:g}"
                    f" ({outcome.not_sent} not sent)"
                )
            return summary

        bisection = None
        if args.find_max_rate:
            bisection = await find_max_rate(
                measure, args.target_attainment, args.rate_min, args.rate_max, args.max_runs
            )
        elif args.sweep:
            await sweep(args.sweep, measure)
        else:
            await measure(args.rate if spec.arrival in ("poisson", "gamma", "constant") else None)

    _report(console, args, model, spec, slo, runs, bisection)
    return 0 if any(s.completed for _, s, _, _ in runs) else 1


def _report(
    console: Any,
    args: argparse.Namespace,
    model: str,
    spec: Any,
    slo: Any,
    runs: Sequence[tuple[float | None, Any, Any, int]],
    bisection: Any,
) -> None:
    from loadgen import report
    from loadgen.search import RatePoint

    for rate, summary, _, _ in runs:
        title = f"{args.url} {model} · {spec.arrival}" + (f" {rate:g} req/s" if rate else "")
        if len(runs) == 1:
            console.print(report.summary_table(summary, title))
    if len(runs) > 1:
        points = [RatePoint(r, s) for r, s, _, _ in runs if r is not None]
        console.print(
            report.rates_table(
                sorted(points, key=lambda p: p.rate_per_s),
                f"{args.url} {model} · {spec.arrival} " + ("rate search" if bisection is not None else "rate sweep"),
            )
        )
    for rate, summary, _, _ in runs:  # the server's own words, printed as they are
        if (line := report.failure_line(summary)) is not None:
            console.print(
                f"{rate:g} req/s: {line}" if rate and len(runs) > 1 else line,
                style="red",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    if bisection is not None:
        best = bisection.max_rate_per_s
        console.print(
            f"highest rate with SLO attainment >= {bisection.target_attainment:.0%}: "
            + (f"{best:.3g} req/s" if best is not None else "none (even the lowest failed)")
        )

    out = args.out or Path("results") / f"loadgen-{time.strftime('%Y%m%d-%H%M%S')}.json"
    config = {
        "url": args.url,
        "model": model,
        "endpoint": args.endpoint,
        "workload": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(spec).items()},
        "slo": dataclasses.asdict(slo),
        "max_duration_s": args.max_duration_s,
        "ignore_eos": not args.no_ignore_eos,
    }
    report.write_json(out, report.results_payload(config, runs, bisection))
    report.write_requests_csv(out.with_suffix(".csv"), [(r, recs) for r, _, recs, _ in runs])
    written = [out, out.with_suffix(".csv")]
    if len(runs) > 1:
        rates_csv = out.with_name(out.stem + "-rates.csv")
        report.write_rates_csv(rates_csv, [(r, s) for r, s, _, _ in runs])
        written.append(rates_csv)
    if not args.no_plots:
        note = report.failure_note([s for _, s, _, _ in runs])
        plot_title = f"{model} · {spec.lengths_source} · {args.url}" + (f" · {note}" if note else "")
        cdf = out.with_name(out.stem + "-cdf.png")
        report.plot_cdfs(cdf, [(f"{r:g} req/s" if r else spec.arrival, recs) for r, _, recs, _ in runs], plot_title)
        written.append(cdf)
        if len(runs) > 1:
            rates_png = out.with_name(out.stem + "-rates.png")
            report.plot_rates(rates_png, [(r, s) for r, s, _, _ in runs if r is not None], plot_title)
            written.append(rates_png)
    console.print("wrote " + ", ".join(str(p) for p in written))


def _run_batch(args: argparse.Namespace) -> int:
    """Submit the workload's requests as one batch on the job queue and time it."""
    from pydantic import ValidationError

    from common.config import MeshConfig
    from loadgen.safety import is_loopback_url

    overrides = {
        k: v
        for k, v in (("amqp_url", args.amqp_url), ("redis_url", args.redis_url), ("namespace", args.namespace))
        if v
    }
    try:
        config = MeshConfig(**overrides)
    except ValidationError as exc:
        raise CliError(str(exc).splitlines()[-1]) from None
    if not config.distributed:
        raise CliError("--target batch needs --amqp-url and --redis-url (or EXEGPT_* variables)")
    for url in (config.amqp_url or "", config.redis_url or ""):  # both set: the configuration is distributed
        if not args.allow_remote and not is_loopback_url(url):
            raise CliError(f"{url} is not a loopback address; pass --allow-remote to load it")
    if args.rate is None and not args.concurrency and not args.trace:
        args.rate = 1.0  # arrivals do not matter: the whole batch is submitted at once
    spec = _workload_spec(args)
    return asyncio.run(_batch_main(args, config, spec))


async def _batch_main(args: argparse.Namespace, config: Any, spec: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    from common.names import Names
    from common.transport.batchdir import BatchDir
    from common.transport.connect import LocalHub, open_bus
    from loadgen import report
    from loadgen.batch_target import run_batch
    from loadgen.workload import build_workload

    names = Names(config.namespace)
    console = Console() if sys.stdout.isatty() else Console(width=150)
    model = args.model or config.model
    tok = _prompt_tokenizer(args.tokenizer, model)
    spec = _fit_spec(console, args, spec, tok, None)
    workload = build_workload(spec, tok.encode, tok.decode)
    try:
        bus = await open_bus(config, names, LocalHub())
    except (OSError, ConnectionError) as exc:
        raise CliError(f"cannot reach the broker: {exc}") from None
    try:
        summary = await run_batch(
            bus, BatchDir(config.batch_dir, config.namespace), names, workload.specs, model, args.max_duration_s
        )
    finally:
        await bus.close()
    table = Table(title=f"batch {summary.batch_id} on {names.jobs_queue}", title_justify="left")
    for col in (
        "jobs",
        "completed",
        "failed",
        "missing",
        "submit s",
        "wall s",
        "jobs/s",
        "out tok/s",
        "latency p50 ms",
        "latency p99 ms",
    ):
        table.add_column(col, justify="right")
    lat = summary.job_latency
    table.add_row(
        str(summary.jobs),
        str(summary.completed),
        str(summary.failed),
        str(summary.missing),
        f"{summary.submit_s:.2f}",
        f"{summary.wall_s:.2f}",
        f"{summary.jobs_per_s:.1f}",
        f"{summary.output_tokens_per_s:.1f}",
        f"{lat.p50_ms or 0:.0f}",
        f"{lat.p99_ms or 0:.0f}",
    )
    console.print(table)
    out = args.out or Path("results") / f"loadgen-batch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report.write_json(
        out,
        {
            "config": {
                "target": "batch",
                "namespace": config.namespace,
                "workload": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(spec).items()},
            },
            "batch": dataclasses.asdict(summary),
        },
    )
    console.print(f"wrote {out}")
    return 0 if summary.missing == 0 else 1
