"""`exegpt schedule`: read and steer the scheduler through a gateway's admin API.

    exegpt schedule show [--json]            # the schedule in force and why (--json: raw)
    exegpt schedule set-bound 2.5            # plan for a 2.5 s latency bound (inf or none: no bound)
    exegpt schedule set-slo --ttft 1.5 --tpot 0.08 [--percentile 0.99]   # TTFT / TPOT bounds (none: off)
    exegpt schedule replan --reason "new traffic"
    exegpt schedule pin plan.json            # a file or JSON of Schedule fields (or `exegpt plan --json`)
    exegpt schedule pin --unpin              # let the scheduler choose again

Every subcommand takes --url (default EXEGPT_GATEWAY_URL or http://127.0.0.1:8000) and --key (an
admin-scope key; default EXEGPT_API_KEY). The scheduler acts on requests when it takes them from
its queue: `show` tells what it made of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.cli import CliError

DEFAULT_URL = "http://127.0.0.1:8000"
HINTS = {401: " (give an admin key: --key or EXEGPT_API_KEY)", 404: " (is this an ExeGPT gateway with the admin API?)"}


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("EXEGPT_GATEWAY_URL", DEFAULT_URL),
        help="the gateway (default: EXEGPT_GATEWAY_URL or %(default)s)",
    )
    common.add_argument(
        "--key", default=os.environ.get("EXEGPT_API_KEY"), help="API key of scope admin (default: EXEGPT_API_KEY)"
    )
    common.add_argument("--timeout-s", type=float, default=10.0, help="how long to wait for the gateway")
    parser = sub.add_parser(
        "schedule",
        help="show or steer the scheduler (admin API)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = parser.add_subparsers(dest="schedule_command", metavar="SUBCOMMAND")
    cmds.required = True
    p = cmds.add_parser("show", parents=[common], help="the schedule in force, its basis, predicted vs observed")
    p.add_argument("--json", action="store_true", help="print the admin API's raw JSON")
    p = cmds.add_parser("set-bound", parents=[common], help="latency bound in seconds (inf: none)")
    p.add_argument("seconds", help="seconds to generate a p99-length output; inf or none: no bound")
    p = cmds.add_parser("set-slo", parents=[common], help="TTFT and TPOT bounds in seconds (none: off)")
    p.add_argument("--ttft", default="none", help="seconds from arrival to the first token (none: no bound)")
    p.add_argument("--tpot", default="none", help="seconds per output token after the first (none: no bound)")
    p.add_argument(
        "--percentile",
        type=float,
        default=0.99,
        help="share of requests each bound is for (default 0.99; --ttft-percentile/--tpot-percentile apart)",
    )
    p.add_argument("--ttft-percentile", type=float, default=None)
    p.add_argument("--tpot-percentile", type=float, default=None)
    p = cmds.add_parser("replan", parents=[common], help="search again now")
    p.add_argument("--reason", default="", help="recorded as the replan's reason")
    p = cmds.add_parser("pin", parents=[common], help="run this schedule (or --unpin)")
    p.add_argument("schedule", nargs="?", help="file or JSON of Schedule fields")
    p.add_argument("--unpin", action="store_true", help="let the scheduler choose again")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(execute(args))


async def execute(args: argparse.Namespace, transport: Any = None) -> int:
    """The subcommand against the gateway at ``args.url`` (``transport``: an httpx transport, for tests)."""
    method, path, body = request_of(args)
    answer = await call(args, method, path, body, transport)
    if args.schedule_command == "show":
        print(json.dumps(answer, indent=2) if args.json else summary(answer))
    else:
        print(accepted(answer))
    return 0


def request_of(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    command = args.schedule_command
    if command == "show":
        return "GET", "/admin/schedule", None
    if command == "set-bound":
        return "PUT", "/admin/schedule/bound", {"latency_bound_s": bound_of(args.seconds, "set-bound")}
    if command == "set-slo":
        return (
            "PUT",
            "/admin/schedule/slo",
            {
                "ttft_s": bound_of(args.ttft, "set-slo --ttft"),
                "tpot_s": bound_of(args.tpot, "set-slo --tpot"),
                "ttft_percentile": args.ttft_percentile or args.percentile,
                "tpot_percentile": args.tpot_percentile or args.percentile,
            },
        )
    if command == "replan":
        return "POST", "/admin/schedule/replan", {"reason": args.reason}
    if args.unpin == (args.schedule is not None):
        raise CliError("pin takes a schedule (file or JSON) or --unpin, not both")
    return "PUT", "/admin/schedule/pin", {"schedule": None if args.unpin else schedule_fields(args.schedule)}


def bound_of(text: str, what: str) -> float | None:
    if text.strip().lower() in ("inf", "none", "infinity"):
        return None
    try:
        return float(text)
    except ValueError:
        raise CliError(f"{what}: not a number of seconds: {text!r}") from None


def schedule_fields(text: str) -> dict[str, Any]:
    """Schedule fields from JSON or a file (``exegpt plan --json``'s output: its "schedule")."""
    try:
        source = text if text.lstrip().startswith("{") else Path(text).read_text()
        fields = json.loads(source)
    except OSError as exc:
        raise CliError(f"pin: cannot read {text}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"pin: not JSON: {exc}") from None
    if isinstance(fields, dict) and isinstance(fields.get("schedule"), dict):
        fields = fields["schedule"]
    if not isinstance(fields, dict):
        raise CliError("pin: expected a JSON object of Schedule fields")
    return fields


async def call(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None, transport: Any
) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    try:
        async with httpx.AsyncClient(
            base_url=args.url, transport=transport, headers=headers, timeout=args.timeout_s
        ) as client:
            response = await client.request(method, path, json=body)
    except httpx.ConnectError as exc:
        raise CliError(f"cannot reach the gateway at {args.url}: {exc or 'connection refused'}") from None
    except httpx.TimeoutException:
        raise CliError(f"the gateway at {args.url} did not answer within {args.timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise CliError(f"{args.url}: {type(exc).__name__}: {exc}") from None
    if response.status_code >= 400:
        raise CliError(f"{response.status_code}: {error_message(response)}{HINTS.get(response.status_code, '')}")
    return response.json()


def error_message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:200] or response.reason_phrase


def accepted(answer: dict[str, Any]) -> str:
    kind = answer.get("requested")
    if kind == "set_bound":
        bound = answer.get("latency_bound_s")
        what = "no latency bound" if bound is None else f"latency bound {bound:g} s"
    elif kind == "set_slo":
        what = f"the SLO {slo_text(answer)}"
    elif kind == "replan":
        what = f"a replan ({answer.get('reason')})"
    elif answer.get("schedule") is None:
        what = "unpinning the schedule"
    else:
        what = f"pinning {describe(answer['schedule'])}"
    return f"requested {what}; the scheduler applies it when it takes the request (see `exegpt schedule show`)"


# --- show -------------------------------------------------------------------------------------


def summary(answer: dict[str, Any]) -> str:
    update, state = answer.get("update"), answer.get("state")
    lines = update_lines(update) if update else ["no schedule published yet"]
    lines += state_lines(state) if state else ["scheduler state: none recorded (no scheduler has planned yet)"]
    return "\n".join(lines)


def describe(s: dict[str, Any]) -> str:
    text = f"{s.get('policy')} B_E {s.get('encode_batch')} B_D {s.get('decode_batch')}"
    if s.get("policy") == "rra":
        text += f" N_D {s.get('decode_iters_per_encode')}"
    return text


def update_lines(update: dict[str, Any]) -> list[str]:
    s = update["schedule"]
    roles = ", ".join(f"{a['worker_id']}={a['role']}" for a in update.get("allocation", [])) or "none"
    return [
        f"schedule v{update['version']} (epoch {update.get('epoch')}, token {update.get('token')}), "
        f"published {when(update.get('published_at'))}",
        f"  policy {s['policy']}  B_E {s['encode_batch']}  B_D {s['decode_batch']}  "
        f"N_D {s['decode_iters_per_encode']}  micro-batches {s['decode_microbatches']}  "
        f"TP {s['tp_degree']}x{s['tp_stages']}",
        f"  devices {s['num_devices']} (encoders {s['encoder_devices']}, decoders {s['decoder_devices']}, "
        f"per worker {s['worker_devices']})",
        f"  allocation: {roles}",
    ]


def state_lines(st: dict[str, Any]) -> list[str]:
    bound = st.get("latency_bound_s")
    lines = [
        f"scheduler {st['leader']} (token {st['token']}): v{st['version']} {st['policy']}, "
        f"{'pinned' if st['pinned'] else 'planned'}, {st['workers']} workers",
        f"  SLO: {slo_text(st)}; end-to-end bound (p99-length request): {'none' if bound is None else f'{bound:g} s'}",
    ]
    if not st["meets_bound"]:
        lines.append("  ALERT: no schedule meets the latency bound; the least-latency one runs")
    lines += [
        f"  basis: {st['basis']} ({st['samples']} samples)",
        f"  input length  p50/p90/p99: {quantiles(st['input_quantiles'])} (mean {num(st['input_mean'])})",
        f"  output length p50/p90/p99: {quantiles(st['output_quantiles'])} (mean {num(st['output_mean'])})",
        f"  arrivals: {num(st['arrival_rate_s'])}/s, CV {num(st['arrival_cv'])}",
        f"  throughput: predicted {num(st['predicted_throughput_seq_s'])} seq/s, "
        f"observed {num(st['observed_throughput_seq_s'])} seq/s",
        f"  latency (p99): predicted {secs(st['predicted_latency_s'])}, observed {secs(st['observed_latency_s'])}",
        f"  planned for: {plan_load(st)}",
        f"  SLO attainment: predicted {pct(st.get('predicted_attainment'))} (raw profile "
        f"{pct(st.get('raw_predicted_attainment'))}), observed {pct(st.get('observed_attainment'))} over 30 s; "
        f"TTFT predicted {secs(st.get('predicted_ttft_s'))}, observed {secs(st.get('observed_ttft_s'))}; "
        f"TPOT predicted {ms(st.get('predicted_tpot_s'))}, observed {ms(st.get('observed_tpot_s'))}",
        f"  raw profile (no calibration): {num(st.get('raw_predicted_throughput_seq_s'))} seq/s, "
        f"{secs(st.get('raw_predicted_latency_s'))}",
        f"  calibration ({st.get('calibration_samples', 0)} steps): {calibration_text(st.get('calibration') or [])}",
        f"  drift: statistic {num(st['drift_statistic'])} (p {num(st['drift_p_value'])})",
        f"  replans: {st['replans']}"
        + (
            f", last {when(st['last_replan_at'])}: {st['last_replan_reason']}" + searched(st)
            if st["replans"] or st.get("last_replan_reason")  # also a search asked that could not run
            else ""
        ),
    ] + ([f"  outcome: {st['last_outcome']}"] if st.get("last_outcome") else [])
    return lines + candidate_lines(st.get("candidates") or [])


def slo_text(d: dict[str, Any]) -> str:
    """TTFT/TPOT bounds of a state record (``ttft_bound_s``) or of a SetSlo answer (``ttft_s``)."""
    parts = []
    for name, unit in (("ttft", "s"), ("tpot", "ms")):
        bound = d.get(f"{name}_bound_s", d.get(f"{name}_s"))
        if bound is not None:
            value = f"{bound:g} s" if unit == "s" else f"{bound * 1e3:g} ms"
            parts.append(f"{name.upper()} p{(d.get(f'{name}_percentile') or 0.99) * 100:g} <= {value}")
    return ", ".join(parts) or "no TTFT/TPOT bound"


def plan_load(st: dict[str, Any]) -> str:
    rate = st.get("forecast_rate_s") or 0.0
    if not rate:
        return "a saturated closed loop (no arrivals counted yet)"
    return f"{rate:.3g} requests/s forecast, burstiness CV {num(st.get('forecast_cv'))}"


def calibration_text(points: list[dict[str, Any]]) -> str:
    if not points:
        return "none (the profile as measured)"
    return ", ".join(f"{p['kind']} ~{p['tokens']:.0f} tok x{p['factor']:.2f}" for p in points)


def candidate_lines(candidates: list[dict[str, Any]]) -> list[str]:
    if not candidates:
        return []
    lines = [
        "  candidates weighed (at the forecast load):",
        "      schedule                          capacity  attainment  TTFT     TPOT      p99 e2e",
    ]
    for c in candidates:
        mark = "->" if c.get("chosen") else "  "
        lines.append(
            f"    {mark}{describe(c['schedule']):32s} {num(c.get('capacity_seq_s')):>8s}  "
            f"{pct(c.get('attainment')):>10s}  {secs(c.get('ttft_s')):8s} {ms(c.get('tpot_s')):9s} "
            f"{secs(c.get('e2e_p99_s'))}"
            + (f"  sustains {num(c['sustained_rate_s'])}/s" if c.get("sustained_rate_s") is not None else "")
        )
    return lines


def pct(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1%}"


def ms(value: float | None) -> str:
    return "unknown" if value is None else f"{value * 1e3:.3g} ms"


def num(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3g}"


def searched(st: dict[str, Any]) -> str:
    """The last search's wall time, as ``schedule show`` gives it ("" for a scheduler that does not say)."""
    if not st.get("last_search_s") or str(st.get("last_outcome", "")).startswith("not searched"):
        return ""  # none yet, or the last one asked could not run: the time is an earlier search's
    return f" (searched {secs(st['last_search_s'])})"


def secs(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.3g} s"


def quantiles(values: list[float | None]) -> str:
    return "/".join(num(v) for v in values) or "none"


def when(at: float | None) -> str:
    if not at:
        return "never"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
