"""GPU check for the engine: device, oracle, decode speed against the memory roofline, benchmark.

    python scripts/gpu_check.py [--model M] [--json PATH] [--budget-s 300]
    python scripts/gpu_check.py --device cpu --quick      # every part with small sizes, no capture

One run on one CUDA device, about five minutes at most:

1. Device: name, memory, GPU count, and the measured device-to-device copy bandwidth (a plain copy
   of 1 GiB; bytes read + written / time), the bandwidth every roofline below uses.
2. Oracle on ``--model`` (default: SmolLM2 from its GGUF when the file and the ``gguf`` package are
   here, else a random-weight Llama of SmolLM2-135M's shape, written at run time):
   - float32 engine (TF32 off) vs ``transformers`` float32 on the same weights: max |dlogit| over
     32 greedy steps and whether the 32 greedy tokens are identical, and max |dlogit| teacher-forced
     over a fixed text (~120 positions; both within 5e-3);
   - float32 CUDA graphs vs the eager path: identical greedy tokens and logits within 5e-3 for
     requests of different lengths joining and leaving (a subset decode and a padded step included);
   - bfloat16 engine vs the float32 reference, teacher-forced over the fixed text: top-1 agreement
     rate and max |dlogit| (a random-weight model greedily repeats one token, so a greedy prefix
     says little; it is printed too). Reported, not checked.
3. Decode step time in bfloat16 at batch 1, 2, 4, ..., 256 at a fixed context (``--context``) with
   and without CUDA graphs, for random-weight Llamas of SmolLM2-135M's and Llama-3.2-1B's shapes:
   ms/step (a step includes the argmax and its copy to the host, as the engine's does), tokens/s,
   achieved GB/s and % of the roofline (weights + KV read per step / copy bandwidth); the greedy
   tokens of both paths from the same state are compared.
4. TP=2 when two or more GPUs are present (with one: says so).
5. The engine vs ``transformers`` generate benchmark (eager, then with CUDA graphs) while the time
   budget allows.

Tables are printed; ``--json PATH`` writes every result. Exit 1 when the float32 oracle or the
float32 CUDA-graph check fails, or a part crashes. With ``--device cuda`` and no CUDA device it
says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FP32_LOGIT_TOL = 5e-3
GREEDY_STEPS = 32
DECODE_SHAPES = "smollm2-135m,llama-1b"
DECODE_BATCHES = "1,2,4,8,16,32,64,128,256"
# --quick: a small Llama of the same structure (GQA, tied head) in place of every real shape
QUICK_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
PROMPT_TEXT = "What is the capital of France?"
FIXED_TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to "
    "exchange grain, salt and cloth. Over the centuries the market grew into a town, the town into a "
    "city, and the old river crossings into stone bridges that still carry traffic today."
)


# ---- helpers ---------------------------------------------------------------------------------


def log(*parts: Any) -> None:
    print(*parts, flush=True)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def smollm2_available() -> bool:
    """The SmolLM2 GGUF and the ``gguf`` reader are both installed (checked without importing gguf)."""
    try:
        if importlib.util.find_spec("gguf") is None:
            return False
        from engine.gguf_loader import smollm2_path

        smollm2_path()
    except (ImportError, ValueError):
        return False
    return True


def shape_of(name: str) -> str | dict[str, Any]:
    return QUICK_SHAPE if name == "quick" else name


def random_folder(name: str, models_dir: Path, device: str) -> Path:
    from engine.tiny import write_random_llama

    started = time.perf_counter()
    folder = write_random_llama(
        models_dir / name, shape_of(name), dtype="bfloat16", device="cuda" if device.startswith("cuda") else "cpu"
    )
    log(f"  random-weight Llama {name}: {folder} ({time.perf_counter() - started:.1f} s)")
    return folder


def resolve_model(args: argparse.Namespace, models_dir: Path) -> tuple[str, str, bool]:
    """(label, what load_engine takes, real weights?)."""
    from engine.tiny import RANDOM_LLAMA_SHAPES

    name = args.model or ("quick" if args.quick else "smollm2" if smollm2_available() else "smollm2-135m")
    if name == "quick" or name in RANDOM_LLAMA_SHAPES:
        return f"{name} (random weights)", str(random_folder(name, models_dir, args.device)), False
    return name, name, not name.startswith("tiny-")


def chat_prompt(engine) -> list[int]:
    text = PROMPT_TEXT
    if engine.tokenizer.chat_template:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return engine.tokenizer.encode(text)


def greedy_with_logits(engine, prompt: list[int], steps: int):
    from engine.runners import greedy_logits

    tokens, logits = greedy_logits(engine.runner, prompt, steps)
    return tokens, logits.float()


def teacher_forced(engine, prompt: list[int], tokens: list[int]):
    """Logits (len(tokens), V) of prefill(prompt) then decode steps fed ``tokens[:-1]``."""
    import torch

    runner = engine.runner
    with torch.inference_mode():
        rows = [runner.prefill([prompt])[0]]
        for t in tokens[:-1]:
            rows.append(runner.decode([t])[0])
        runner.remove(0)
    return torch.stack(rows).float()


def reference_logits(hf, prompt: list[int], tokens: list[int], device: str):
    import torch

    with torch.inference_mode():
        out = hf(input_ids=torch.tensor([prompt + tokens[:-1]], device=device)).logits[0].float()
    return out[len(prompt) - 1 :]


def reference_greedy(hf, prompt: list[int], n: int, device: str) -> list[int]:
    import torch

    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def mixed_run(engine) -> tuple[dict[str, list[int]], list[Any]]:
    """Greedy requests of different lengths joining and leaving, a subset decode, a padded step:
    (tokens per request, logits of every forward pass on the host)."""
    from engine.api import GenerationRequest, SamplingParams

    spec = {
        "a": (b"Once upon a time", 40),
        "b": (b"hi", 7),
        "c": (b"The quick brown fox jumps over the lazy dog.", 24),
        "d": (b"x", 30),
        "e": (b"0123456789abcdef", 5),
    }

    def req(rid: str) -> GenerationRequest:
        prompt, n = spec[rid]
        return GenerationRequest(rid, tuple(prompt), SamplingParams(max_tokens=n, ignore_eos=True))

    out: dict[str, list[int]] = {rid: [] for rid in spec}
    logits: list[Any] = []
    runner = engine.runner
    step = runner.step

    def recording(*a: Any) -> Any:
        rows = step(*a)
        logits.append(rows.float().cpu())
        return rows

    def add(events) -> None:
        for e in events:
            out[e.request_id].append(e.token_id)

    runner.step = recording
    try:
        add(engine.prefill([req("a"), req("b")]))
        for _ in range(3):
            add(engine.decode_step())
        add(engine.step(prefill=[req("c")], decode=engine.running()))  # joins while the others decode
        for _ in range(5):
            add(engine.decode_step())  # b leaves
        add(engine.step(decode=engine.running()[-1:]))  # a subset: the others wait
        add(engine.step(decode=engine.running(), padding=3))
        add(engine.prefill([req("d"), req("e")]))
        while engine.running():
            add(engine.decode_step())
    finally:
        del runner.step
    return out, logits


def max_diff(a: list[Any], b: list[Any]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---- 1. device -------------------------------------------------------------------------------


def device_part(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "device": args.device}
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            gpus=torch.cuda.device_count(),
            cuda=torch.version.cuda,
        )
    else:
        info.update(name="cpu", gpus=0, threads=torch.get_num_threads())
    size = (32 << 20) if args.quick else (1 << 30)
    src = torch.empty(size, dtype=torch.uint8, device=args.device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(3 if args.quick else 10):
        sync(args.device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    info["copy_bytes"] = size
    info["copy_gb_s"] = 2 * size / best / 1e9  # read + written
    info["copy_gb_s_median"] = 2 * size / statistics.median(times) / 1e9
    del src, dst
    free(args.device)
    log(
        f"device: {info['name']} ({info.get('memory_gib', '-')} GiB, {info['gpus']} GPU(s)), torch {torch.__version__}"
        + (f", CUDA {info['cuda']}" if "cuda" in info else "")
    )
    log(
        f"device-to-device copy of {size / 2**30:.2f} GiB: {info['copy_gb_s']:.0f} GB/s read+written "
        f"(best of {len(times)}; median {info['copy_gb_s_median']:.0f} GB/s)"
    )
    return info


# ---- 2. oracle -------------------------------------------------------------------------------


def fixed_sequence(engine, n: int) -> list[int]:
    """The first ``n`` tokens of a fixed text (repeated if short): what the teacher-forced checks read."""
    ids = engine.tokenizer.encode(FIXED_TEXT)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def oracle_part(args: argparse.Namespace, label: str, model: str, real: bool) -> dict[str, Any]:
    from engine import load_engine
    from engine.bench import reference_model
    from engine.cuda_graph import attach, detach

    device = args.device
    res: dict[str, Any] = {"model": label, "real_weights": real}
    fp32 = load_engine(model, device=device, dtype="float32")
    hf = reference_model(fp32, model)
    prompt = chat_prompt(fp32)
    res["prompt_tokens"] = len(prompt)

    # greedy 32 from a chat prompt
    tokens, ours = greedy_with_logits(fp32, prompt, GREEDY_STEPS)
    ref = reference_logits(hf, prompt, tokens, device)
    res["fp32_max_dlogit"] = (ours - ref).abs().max().item()
    res["fp32_max_logit"] = ref.abs().max().item()
    res["fp32_greedy_same"] = tokens == reference_greedy(hf, prompt, GREEDY_STEPS, device)
    res["fp32_greedy_distinct"] = len(set(tokens))

    # teacher-forced over a fixed text: prefill its first 8 tokens, then decode steps fed the rest
    seq = fixed_sequence(fp32, 40 if args.quick else 128)
    tf_prompt, tf_tokens = seq[:8], seq[8:]
    ref_tf = reference_logits(hf, tf_prompt, tf_tokens, device)
    ours_tf = teacher_forced(fp32, tf_prompt, tf_tokens)
    res["tf_positions"] = len(tf_tokens)
    res["fp32_tf_max_dlogit"] = (ours_tf - ref_tf).abs().max().item()
    res["fp32_tf_top1"] = (ours_tf.argmax(-1) == ref_tf.argmax(-1)).float().mean().item()
    res["tf_ref_distinct_top1"] = len(set(ref_tf.argmax(-1).tolist()))

    # CUDA graphs vs eager, float32: same greedy tokens (off CUDA: the static path without capture)
    eager_tokens, eager_logits = mixed_run(fp32)
    graphs = attach(fp32.runner, capture=device.startswith("cuda"))
    static_tokens, static_logits = mixed_run(fp32)
    res["fp32_graphs_same"] = static_tokens == eager_tokens
    res["fp32_graphs_max_dlogit"] = max_diff(eager_logits, static_logits)
    res["fp32_graphs_counts"] = dict(graphs.counts)
    res["fp32_graphs_disabled"] = graphs.disabled
    detach(fp32.runner)
    del fp32, hf, eager_logits, static_logits
    free(device)

    bf16 = load_engine(model, device=device, dtype="bfloat16")
    rows = teacher_forced(bf16, tf_prompt, tf_tokens)
    res["bf16_tf_top1"] = (rows.argmax(-1) == ref_tf.argmax(-1)).float().mean().item()
    res["bf16_tf_max_dlogit"] = (rows - ref_tf).abs().max().item()
    tokens16, ours16 = greedy_with_logits(bf16, prompt, GREEDY_STEPS)
    prefix = next((i for i, (a, b) in enumerate(zip(tokens16, tokens)) if a != b), len(tokens))
    res["bf16_greedy_prefix"] = prefix
    res["bf16_greedy_max_dlogit"] = (ours16[: prefix + 1] - ref[: prefix + 1]).abs().max().item()
    del bf16
    free(device)

    captured = not device.startswith("cuda") or (graphs.disabled is None and graphs.counts["captures"] > 0)
    res["pass"] = bool(
        res["fp32_max_dlogit"] < FP32_LOGIT_TOL
        and res["fp32_greedy_same"]
        and res["fp32_tf_max_dlogit"] < FP32_LOGIT_TOL
        and captured
        and res["fp32_graphs_same"]
        and res["fp32_graphs_max_dlogit"] < FP32_LOGIT_TOL
    )
    n = res["tf_positions"]
    log(f"\noracle ({label} vs transformers, same weights, {device}; max |logit| {res['fp32_max_logit']:.1f})")
    log(f"{'check':<46} {'max |dlogit|':>12} {'result':>24}")
    log(
        f"{'float32 vs float32 HF, greedy 32':<46} {res['fp32_max_dlogit']:>12.2e} "
        f"{('same' if res['fp32_greedy_same'] else 'DIFFERENT') + f' ({len(set(tokens))} distinct)':>24}"
    )
    log(
        f"{f'float32 vs float32 HF, teacher-forced {n}':<46} {res['fp32_tf_max_dlogit']:>12.2e} "
        f"{'top-1 agree ' + format(res['fp32_tf_top1'], '.1%'):>24}"
    )
    counts = res["fp32_graphs_counts"]
    what = "CUDA graphs" if device.startswith("cuda") else "static (no capture)"
    log(
        f"{'float32 ' + what + ' vs eager, mixed run':<46} {res['fp32_graphs_max_dlogit']:>12.2e} "
        f"{('same' if res['fp32_graphs_same'] else 'DIFFERENT') + ' (' + str(counts['static']) + ' steps)':>24}"
    )
    if res["fp32_graphs_disabled"]:
        log(f"  graphs disabled: {res['fp32_graphs_disabled']}")
    log(
        f"{f'bfloat16 vs float32 HF, teacher-forced {n}':<46} {res['bf16_tf_max_dlogit']:>12.2e} "
        f"{'top-1 agree ' + format(res['bf16_tf_top1'], '.1%'):>24}"
    )
    log(
        f"{'bfloat16 vs float32 HF, greedy prefix':<46} {res['bf16_greedy_max_dlogit']:>12.2e} "
        f"{f'{prefix}/{GREEDY_STEPS} same':>24}"
    )
    return res


# ---- 3. decode step time vs roofline ---------------------------------------------------------


def decode_part(args: argparse.Namespace, models_dir: Path, shape: str, bandwidth: float) -> dict[str, Any]:
    import torch

    from engine import load_engine
    from engine.cuda_graph import attach

    device = args.device
    on_cuda = device.startswith("cuda")
    folder = random_folder(shape, models_dir, device)
    engine = load_engine(str(folder), device=device, dtype="bfloat16")
    runner, cache = engine.runner, engine.runner.cache
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_pp = cache.bytes_per_position
    ctx, warm, steps = args.context, 2, args.decode_steps
    batches = sorted({int(b) for b in args.decode_batches.split(",")}, reverse=True)
    res: dict[str, Any] = {
        "shape": shape,
        "params": sum(p.numel() for p in runner.model.parameters()),
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_pp,
        "context": ctx,
        "copy_gb_s": bandwidth / 1e9,
        "rows": [],
    }

    def lengths(b: int) -> list[int]:
        return [ctx - (i % 8) for i in range(b)]  # contexts differ a little: the length mask is exercised

    gen = torch.Generator(device=device).manual_seed(0)
    graphs = None
    with torch.inference_mode():
        cache.add_slots(lengths(batches[0]))  # capacity for the largest batch, once
        steps = max(1, min(steps, cache.kv.shape[4] - ctx - warm - 1))  # no step may grow the cache
        cache.kv[:, :, : batches[0], :, :ctx].normal_(generator=gen)  # K/V of the contexts: random, seeded
        cache.truncate(0)

        def run(b: int, use_graphs: bool) -> dict[str, Any]:
            cache.truncate(0)
            cache.add_slots(lengths(b))  # same state for both paths: only positions past these are written
            runner.decode_graphs = graphs if use_graphs else None
            tokens = [(7 * i + 3) % 256 for i in range(b)]
            seen, first, kv_read = [], None, 0
            for s in range(warm + steps):
                if s == warm:
                    sync(device)
                    t0 = time.perf_counter()
                if s >= warm:
                    kv_read += sum(cache.lengths) + b  # positions each row reads, its own included
                logits = runner.step([], [], tokens, 0)
                tokens = logits.argmax(-1).tolist()  # the host needs the tokens, as the engine does
                if first is None:
                    first = logits.clone()
                seen.append(tokens)
            dt = (time.perf_counter() - t0) / steps
            runner.decode_graphs = None
            moved = weight_bytes + kv_pp * kv_read / steps
            return {
                "ms": dt * 1e3,
                "tok_s": b / dt,
                "gb_s": moved / dt / 1e9,
                "bytes": moved,
                "roofline_ms": moved / bandwidth * 1e3,
                "pct_roofline": 100 * moved / bandwidth / dt,
                "tokens": seen,
                "first": first,
            }

        for b in batches:
            eager = run(b, False)
            if graphs is None:
                graphs = attach(runner, capture=on_cuda)
                runner.decode_graphs = None
            static = run(b, True)
            e_tok, s_tok = eager.pop("tokens"), static.pop("tokens")
            same = sum(x == y for r, t in zip(e_tok, s_tok) for x, y in zip(r, t))
            total = sum(len(r) for r in e_tok)
            row = {
                "batch": b,
                "eager": {k: v for k, v in eager.items() if k != "first"},
                "graphs": {k: v for k, v in static.items() if k != "first"},
                "speedup": eager["ms"] / static["ms"],
                "tokens_same": same / total,
                "greedy_same": e_tok == s_tok,
                "first_step_max_dlogit": (eager["first"] - static["first"]).abs().max().item(),
            }
            res["rows"].append(row)
        res["graphs_counts"] = dict(graphs.counts) if graphs else {}
        res["graphs_disabled"] = graphs.disabled if graphs else None
        if graphs:
            graphs.clear()
        cache.truncate(0)
    res["rows"].sort(key=lambda r: r["batch"])
    what = "CUDA graphs" if on_cuda else "static path (no capture)"
    log(
        f"\ndecode step, bfloat16, random-weight {shape}: {res['params'] / 1e6:.1f}M params, weights "
        f"{weight_bytes / 1e6:.0f} MB, KV {kv_pp / 1e3:.1f} kB/token, context ~{ctx}, {steps} steps; "
        f"roofline at {bandwidth / 1e9:.0f} GB/s; graphs: {what}"
    )
    log(
        f"{'batch':>5} {'roof ms':>8} | {'eager ms':>8} {'tok/s':>9} {'GB/s':>6} {'%roof':>6} | "
        f"{'graph ms':>8} {'tok/s':>9} {'GB/s':>6} {'%roof':>6} | {'speedup':>7} {'same tok':>8} {'dlogit':>8}"
    )
    for r in res["rows"]:
        e, g = r["eager"], r["graphs"]
        log(
            f"{r['batch']:>5} {e['roofline_ms']:>8.3f} | {e['ms']:>8.3f} {e['tok_s']:>9.0f} {e['gb_s']:>6.0f} "
            f"{e['pct_roofline']:>5.1f}% | {g['ms']:>8.3f} {g['tok_s']:>9.0f} {g['gb_s']:>6.0f} "
            f"{g['pct_roofline']:>5.1f}% | {r['speedup']:>6.2f}x {r['tokens_same']:>7.0%} "
            f"{r['first_step_max_dlogit']:>8.1e}"
        )
    log(f"graphs: {res['graphs_counts']}" + (f"; DISABLED: {res['graphs_disabled']}" if res["graphs_disabled"] else ""))
    return res  # the engine goes with this frame; the caller frees its memory


# ---- 4. tensor parallel ----------------------------------------------------------------------


def tp_part(args: argparse.Namespace, model: str) -> dict[str, Any]:
    import torch

    from engine import load_engine

    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    if gpus < 2:
        log(f"\n{gpus} GPU: TP=2 not run" if args.device.startswith("cuda") else f"\n{args.device}: TP=2 not run")
        return {"run": False, "gpus": gpus}
    from engine.parallel import GroupShape
    from engine.parallel.group import load_group_engine

    one = load_engine(model, device=args.device, dtype="float32")
    prompt = chat_prompt(one)
    tokens, logits = greedy_with_logits(one, prompt, GREEDY_STEPS)
    del one
    free(args.device)
    two = load_group_engine(model, GroupShape((2,)), device=args.device, dtype="float32")  # NCCL, 2 GPUs
    tokens2, logits2 = greedy_with_logits(two, prompt, GREEDY_STEPS)
    two.runner.close()
    del two
    free(args.device)
    res = {
        "run": True,
        "gpus": gpus,
        "greedy_same": tokens == tokens2,
        "max_dlogit": (logits.cpu() - logits2.cpu()).abs().max().item(),
    }
    log(
        f"\nTP=2 vs TP=1, float32: greedy {GREEDY_STEPS} {'same' if res['greedy_same'] else 'DIFFERENT'}, "
        f"max |dlogit| {res['max_dlogit']:.2e}"
    )
    return res


# ---- 5. benchmark ----------------------------------------------------------------------------


def bench_part(args: argparse.Namespace, model: str, cuda_graphs: bool) -> dict[str, Any]:
    from engine.bench import benchmark, format_table, summary

    batches = [int(b) for b in args.batch_sizes.split(",")]
    cells, _ = benchmark(
        model,
        batches,
        args.prompt_len,
        args.new_tokens,
        repeats=1 if args.quick else 3,
        device=args.device,
        dtype="bfloat16",
        cuda_graphs=cuda_graphs,
    )
    ours = (
        "eager"
        if not cuda_graphs
        else "with CUDA graphs"
        if args.device.startswith("cuda")
        else "cuda_graphs=True, which is ignored off CUDA"
    )
    log(
        f"\nbenchmark vs transformers generate (bfloat16, prompts ~{args.prompt_len} tokens varied, "
        f"{args.new_tokens} new tokens varied; ours {ours})"
    )
    log(format_table(cells))
    log(summary(cells))
    free(args.device)
    return {
        "cuda_graphs": cuda_graphs,
        "cells": [
            dict(batch=c.batch, phase=c.phase, ours_tok_s=c.ours_tok_s, hf_tok_s=c.hf_tok_s, ratio=c.ratio)
            for c in cells
        ],
    }


# ---- main ------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default=None,
        help="smollm2, smollm2-135m | llama-1b (random weights of that shape), tiny-llama, a folder "
        "(default: smollm2 if its GGUF and gguf are installed, else smollm2-135m)",
    )
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try this script's logic")
    p.add_argument("--quick", action="store_true", help="small sizes everywhere (to try the script on a CPU)")
    p.add_argument("--json", default=None, help="write every result to this file")
    p.add_argument("--models-dir", default=None, help="where random-weight models are written (default: temp dir)")
    p.add_argument("--budget-s", type=float, default=300.0, help="parts 3-5 are skipped once this is near")
    p.add_argument("--decode-shapes", default=None, help=f"default {DECODE_SHAPES}")
    p.add_argument("--decode-batches", default=None, help=f"default {DECODE_BATCHES}")
    p.add_argument("--context", type=int, default=None, help="decode context (default 512)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per cell (default 20)")
    p.add_argument("--batch-sizes", default=None, help="benchmark batches (default 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=None, help="benchmark prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, default=None, help="benchmark new tokens (default 64)")
    p.add_argument("--no-bench", action="store_true", help="skip part 5")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "decode_shapes": "quick" if quick else DECODE_SHAPES,
        "decode_batches": "4,3,1" if quick else DECODE_BATCHES,
        "context": 24 if quick else 512,
        "decode_steps": 3 if quick else 20,
        "batch_sizes": "1,2" if quick else "1,8,32",
        "prompt_len": 16 if quick else 128,
        "new_tokens": 8 if quick else 64,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    sys.stdout.reconfigure(line_buffering=True)
    args = parse(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("gpu_check: no CUDA device here; nothing to check (the test suite runs on CPU).")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if not args.device.startswith("cuda"):
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    if hasattr(signal, "SIGALRM"):  # a part that overruns the budget by far is stopped; the rest still report

        def overrun(signum, frame):
            raise TimeoutError(f"over the time budget ({args.budget_s:.0f} s + 45 s)")

        signal.signal(signal.SIGALRM, overrun)
        signal.alarm(int(args.budget_s + 45))
    models_dir = Path(
        args.models_dir or os.environ.get("EXEGPT_GPU_CHECK_DIR") or Path(tempfile.gettempdir()) / "exegpt-gpu-check"
    )
    results: dict[str, Any] = {"args": vars(args), "errors": {}, "timings_s": {}}
    failed = False

    def part(name: str, fn, *a):
        nonlocal failed
        t0 = time.perf_counter()
        try:
            return fn(*a)
        except Exception as exc:  # one part's crash must not lose the others' results
            failed = True
            traceback.print_exc()
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"{name}: FAILED ({type(exc).__name__}: {exc})")
            free(args.device)
            return None
        finally:
            results["timings_s"][name] = round(time.perf_counter() - t0, 2)

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    try:
        results["device"] = info = part("device", device_part, args)
        bandwidth = (info or {}).get("copy_gb_s", 1.0) * 1e9
        resolved = part("model", resolve_model, args, models_dir)
        label, load_name, real = resolved or (None, None, False)
        results["model"] = label
        oracle = part("oracle", oracle_part, args, label, load_name, real) if resolved else None
        results["oracle"] = oracle
        if oracle is None:
            failed = True
        if oracle is not None and not oracle["pass"]:
            failed = True
        results["decode"] = []
        for shape in args.decode_shapes.split(","):
            if left() < 30:
                log(f"\ndecode {shape}: skipped, {left():.0f} s of the budget left")
                continue
            row = part(f"decode:{shape}", decode_part, args, models_dir, shape, bandwidth)
            free(args.device)
            if row is not None:
                results["decode"].append(row)
        results["tp"] = part("tp", tp_part, args, load_name or "tiny-llama")
        results["bench"] = []
        for graphs in (False, True):
            if args.no_bench or load_name is None:
                break
            if left() < (60 if not graphs else 40):
                log(f"\nbenchmark ({'graphs' if graphs else 'eager'}): skipped, {left():.0f} s of the budget left")
                continue
            cells = part(f"bench:{'graphs' if graphs else 'eager'}", bench_part, args, load_name, graphs)
            if cells is not None:
                results["bench"].append(cells)
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
        elapsed = time.perf_counter() - started
        results["elapsed_s"] = round(elapsed, 1)
        results["pass"] = not failed
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    oracle = results.get("oracle") or {}
    log(
        f"\n{'PASS' if not failed else 'FAIL'}: float32 oracle (tolerance {FP32_LOGIT_TOL:.0e}) and float32 "
        f"CUDA-graph check{'' if oracle.get('pass') else ' NOT passed'}"
        + (f"; errors in {', '.join(results['errors'])}" if results["errors"] else "")
        + f"; {elapsed:.0f} s"
        + (f"; results in {args.json}" if args.json else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
