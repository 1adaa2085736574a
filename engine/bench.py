"""`exegpt bench engine`: our engine vs Hugging Face ``generate`` on the same weights, same run.

Prompts have different lengths (uniform in [L(1-s), L(1+s)], ``--prompt-spread s``), so Hugging
Face must pad a batch while our engine packs it. Output lengths differ too (``--output-spread``):
each request decodes exactly its own number of tokens (EOS ignored); ``generate`` must run the
whole batch to the longest one (static batching), our engine drops each request when it is done
(early termination). ``--output-spread 0`` gives every request the same length.
Prefill tokens/s counts real prompt tokens; decode tokens/s counts each request's generated tokens
after its first. Both sides greedy, same weights, dtype and threads, under inference_mode.

``--llamacpp`` compares with llama.cpp (``llama-cpp-python``) on the same GGUF file instead of
``generate``: llama.cpp runs one stream (a ``--prompt-len`` prompt, then ``--new-tokens`` tokens
greedily, ``--threads`` threads), our engine each batch size; the ratio is our tokens/s (all the
batch's streams together) over llama.cpp's one stream. Use ``--clock wall`` with it when
``--threads`` is above 1 (the process clock adds up every thread's time).

``--step`` times our engine alone instead: one mixed ``step`` (``--step-prompts`` new prompts of
``--prompt-len`` tokens prefilled while ``--step-decodes`` running requests decode, one forward
pass) against the same work as two calls (``decode_step()`` then ``prefill``), alternating, median
of ``--rounds``.

A bad argument, or a model the benchmark cannot load, is a ``ValueError`` (``exegpt bench`` prints
it as one line).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_BATCHES = "1,8,32"
CLOCK = time.perf_counter  # --clock process: this process's CPU time (steadier on a shared machine)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2, tiny-llama, tiny-opt or a decoder-only folder")
    p.add_argument("--batch-sizes", default=DEFAULT_BATCHES, help="comma-separated (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=64, help="mean prompt length in tokens (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="mean tokens generated per request (default %(default)s)")
    p.add_argument(
        "--prompt-spread", type=float, default=0.5, help="prompt lengths in L*(1 +- s) (default %(default)s)"
    )
    p.add_argument(
        "--output-spread",
        type=float,
        default=0.5,
        help="output lengths in N*(1 +- s); 0: all equal (default %(default)s)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="process: this process's CPU time, steadier on a shared machine with --threads 1",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the best counts (default %(default)s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    p.add_argument("--quant", default=None, help="weight-only quantization (CPU): fp16, int8, int4 or none")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (and llama.cpp's)")
    p.add_argument(
        "--llamacpp",
        action="store_true",
        help="compare with llama.cpp's one stream on the same GGUF instead of transformers",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--step",
        action="store_true",
        help="time a mixed step against decode_step() + prefill() instead (no transformers needed)",
    )
    p.add_argument("--step-prompts", type=int, default=8, help="--step: new prompts per step (default %(default)s)")
    p.add_argument(
        "--step-decodes", type=int, default=16, help="--step: running requests decoded (default %(default)s)"
    )
    p.add_argument(
        "--rounds", type=int, default=9, help="--step: timed rounds, the median counts (default %(default)s)"
    )


@dataclass(frozen=True)
class Cell:
    batch: int
    phase: str  # "prefill" or "decode"
    ours_tok_s: float
    hf_tok_s: float  # the baseline: transformers' generate, or llama.cpp's one stream (--llamacpp)

    @property
    def ratio(self) -> float:
        return self.ours_tok_s / self.hf_tok_s


def run(args: argparse.Namespace) -> int:
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError as exc:
        raise ValueError(f"--batch-sizes must be integers, got {args.batch_sizes!r}") from exc
    if not batches or min(batches) < 1 or args.prompt_len < 2 or args.new_tokens < 4:
        raise ValueError("need batch sizes >= 1, --prompt-len >= 2 and --new-tokens >= 4")
    if not (0 <= args.prompt_spread < 1 and 0 <= args.output_spread < 1):
        raise ValueError("spreads must be in [0, 1)")
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    if args.step:
        return run_step(args)
    if args.llamacpp:
        return run_llamacpp(args, batches)
    cells, device = benchmark(
        args.model,
        batches,
        args.prompt_len,
        args.new_tokens,
        repeats=args.repeats,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        seed=args.seed,
        prompt_spread=args.prompt_spread,
        output_spread=args.output_spread,
        quant=args.quant,
    )
    import torch

    print(
        f"engine vs transformers generate: model {args.model}, {device}, {_weights(args)}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, prompts {args.prompt_len}*(1+-{args.prompt_spread}) "
        f"tokens, outputs {args.new_tokens}*(1+-{args.output_spread}) tokens, best of {args.repeats}"
    )
    print(format_table(cells))
    print(summary(cells))
    return 0


def _weights(args: argparse.Namespace) -> str:
    """The engine's weights as the header names them: dtype, and the quantization if any."""
    from engine import is_gguf

    dtype = args.dtype or "default dtype"
    if args.quant is None and is_gguf(args.model) and getattr(args, "device", "cpu") in ("cpu", "auto", None):
        return f"{dtype}, the GGUF's own quantization (int4 where it is Q4_0/Q4_1; on a CPU)"
    return f"{dtype}, quant {args.quant}" if args.quant not in (None, "none") else dtype


def format_table(cells: list[Cell], baseline: str = "HF") -> str:
    lines = [f"{'batch':>5}  {'phase':<8} {'ours tok/s':>11} {baseline + ' tok/s':>15} {'ratio':>6}"]
    for c in cells:
        lines.append(f"{c.batch:>5}  {c.phase:<8} {c.ours_tok_s:>11.1f} {c.hf_tok_s:>15.1f} {c.ratio:>6.2f}")
    return "\n".join(lines)


def benchmark(
    model: str,
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    *,
    repeats: int = 2,
    device: str = "auto",
    dtype: str | None = None,
    threads: int | None = None,
    seed: int = 0,
    prompt_spread: float = 0.5,
    output_spread: float = 0.5,
    cuda_graphs: bool = False,
    quant: str | None = None,
) -> tuple[list[Cell], str]:
    import torch

    from engine import load_engine

    engine = load_engine(model, device=device, dtype=dtype, num_threads=threads, cuda_graphs=cuda_graphs, quant=quant)
    if engine.runner.layout.startswith("t5"):
        raise ValueError("the engine benchmark compares decoder-only models")
    hf = reference_model(engine, model)
    gen = torch.Generator().manual_seed(seed)
    cells: list[Cell] = []
    warm = make_prompts(gen, 2, prompt_len, engine.vocab_size, prompt_spread)
    _ours(engine, warm, [3, 3])
    _hf(hf, warm, [3, 3], engine.device)
    for b in batches:
        prompts = make_prompts(gen, b, prompt_len, engine.vocab_size, prompt_spread)
        outputs = spread_lengths(gen, b, new_tokens, output_spread, low=2)
        ours, theirs = [], []
        for _ in range(repeats):  # interleaved, best of each: load from other processes hits both sides
            ours.append(_ours(engine, prompts, outputs))
            theirs.append(_hf(hf, prompts, outputs, engine.device))
        n_prompt, n_decode = sum(map(len, prompts)), sum(n - 1 for n in outputs)
        cells.append(Cell(b, "prefill", n_prompt / min(o[0] for o in ours), n_prompt / min(t[0] for t in theirs)))
        cells.append(Cell(b, "decode", n_decode / min(o[1] for o in ours), n_decode / min(t[1] for t in theirs)))
    return cells, engine.device


def spread_lengths(gen, batch: int, mean: int, spread: float, *, low: int = 1) -> list[int]:
    """``batch`` lengths uniform in [mean(1-spread), mean(1+spread)], at least ``low``."""
    import torch

    lo, hi = max(low, round(mean * (1 - spread))), max(low, round(mean * (1 + spread)))
    return torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()


def make_prompts(gen, batch: int, mean_len: int, vocab: int, spread: float = 0.5) -> list[list[int]]:
    import torch

    return [
        torch.randint(32, vocab, (n,), generator=gen).tolist() for n in spread_lengths(gen, batch, mean_len, spread)
    ]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _ours(engine, prompts: list[list[int]], outputs: list[int]) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for the whole batch; prefill includes the first token's sampling."""
    from engine.api import GenerationRequest, SamplingParams

    reqs = [
        GenerationRequest(f"bench-{i}", tuple(p), SamplingParams(max_tokens=n, ignore_eos=True))
        for i, (p, n) in enumerate(zip(prompts, outputs))
    ]
    _sync(engine.device)
    t0 = CLOCK()
    engine.prefill(reqs)
    _sync(engine.device)
    t1 = CLOCK()
    while engine.running():
        engine.decode_step()
    _sync(engine.device)
    return t1 - t0, CLOCK() - t1


def _hf(hf, prompts: list[list[int]], outputs: list[int], device: str) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one ``generate`` call to the longest output, split where
    the first logits reach the logits processors (the end of the prefill forward)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstLogits(LogitsProcessor):
        at: float | None = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                _sync(device)
                self.at = CLOCK()
            return scores

    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    mark = FirstLogits()
    _sync(device)
    t0 = CLOCK()
    with torch.inference_mode():
        hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(outputs),
            min_new_tokens=max(outputs),
            do_sample=False,
            logits_processor=LogitsProcessorList([mark]),
        )
    _sync(device)
    end = CLOCK()
    assert mark.at is not None
    return mark.at - t0, end - mark.at


def reference_model(engine, model: str) -> Any:
    """The same weights in a transformers model (test/bench-only dependency)."""
    import torch

    from engine.models.common import model_dtype

    try:
        import transformers
    except ImportError as exc:
        raise ValueError("the engine benchmark needs transformers (pip install transformers)") from exc
    ours = engine.runner.model
    hf: transformers.PreTrainedModel
    if ours.kind == "llama":
        cfg = {
            k: v for k, v in ours.args.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")
        }
        with torch.device(engine.device):
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
        state = dict(ours.state_dict())
        if any(t.is_meta for t in state.values()):  # a model in the file's own precision: dense from the file
            from engine import read_checkpoint

            state = read_checkpoint(model)[2]
        hf.load_state_dict(state, strict=False)
        hf.tie_weights()
    else:
        from pathlib import Path

        from engine import TINY_MODELS
        from engine.tiny import default_dir

        folder = default_dir(model) if model in TINY_MODELS else Path(model)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    # transformers' ``to`` is ``functools.wraps(nn.Module.to)``, which mypy types as the unbound function
    hf = hf.to(device=engine.device, dtype=model_dtype(ours)).eval()  # type: ignore[call-arg]
    hf.generation_config.eos_token_id = None  # forced length on both sides
    hf.generation_config.pad_token_id = 0
    return hf


# ---- llama.cpp's one stream as the anchor ---------------------------------------------------------


def run_llamacpp(args: argparse.Namespace, batches: list[int]) -> int:
    cells, anchor = benchmark_llamacpp(
        args.model,
        batches,
        args.prompt_len,
        args.new_tokens,
        repeats=args.repeats,
        dtype=args.dtype,
        quant=args.quant,
        threads=args.threads,
        seed=args.seed,
        prompt_spread=args.prompt_spread,
        output_spread=args.output_spread,
    )
    print(
        f"engine vs llama.cpp's one stream: model {args.model}, cpu, {_weights(args)}, {anchor}, "
        f"{args.clock} clock, prompts {args.prompt_len}*(1+-{args.prompt_spread}) tokens, "
        f"outputs {args.new_tokens}*(1+-{args.output_spread}) tokens, best of {args.repeats}"
    )
    print(format_table(cells, "llama.cpp"))
    print(summary(cells))
    return 0


def benchmark_llamacpp(
    model: str,
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    *,
    repeats: int = 2,
    dtype: str | None = None,
    quant: str | None = None,
    threads: int | None = None,
    seed: int = 0,
    prompt_spread: float = 0.5,
    output_spread: float = 0.5,
) -> tuple[list[Cell], str]:
    """Our engine at each batch size against llama.cpp's one stream of a ``prompt_len`` prompt and
    ``new_tokens`` tokens, on the same GGUF file and threads, interleaved, best of ``repeats``."""
    import torch

    from engine import load_engine

    path = gguf_path(model)
    try:
        import llama_cpp
    except ImportError as exc:
        raise ValueError("--llamacpp needs llama-cpp-python (pip install llama-cpp-python)") from exc
    engine = load_engine(model, device="cpu", dtype=dtype, num_threads=threads, quant=quant)
    n_threads = torch.get_num_threads()
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=prompt_len + new_tokens + 8,
        n_batch=max(512, prompt_len),
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )
    gen = torch.Generator().manual_seed(seed)
    one = make_prompts(gen, 1, prompt_len, engine.vocab_size, 0.0)[0]
    _ours(engine, [one[:8]] * 2, [3, 3])  # warm-up
    _llamacpp(llm, one[:8], 3)
    cells: list[Cell] = []
    for b in batches:
        prompts = make_prompts(gen, b, prompt_len, engine.vocab_size, prompt_spread)
        outputs = spread_lengths(gen, b, new_tokens, output_spread, low=2)
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(_ours(engine, prompts, outputs))
            theirs.append(_llamacpp(llm, one, new_tokens))
        n_prompt, n_decode = sum(map(len, prompts)), sum(n - 1 for n in outputs)
        cells.append(Cell(b, "prefill", n_prompt / min(o[0] for o in ours), len(one) / min(t[0] for t in theirs)))
        cells.append(
            Cell(b, "decode", n_decode / min(o[1] for o in ours), (new_tokens - 1) / min(t[1] for t in theirs))
        )
    return cells, f"{n_threads} threads (both), llama-cpp-python {llama_cpp.__version__}"


def gguf_path(model: str):
    """The GGUF file behind ``model`` (smollm2 or a .gguf path); ValueError for anything else."""
    from pathlib import Path

    if model == "smollm2":
        from engine.gguf_loader import smollm2_path

        return smollm2_path()
    if model.endswith(".gguf"):
        return Path(model)
    raise ValueError(f"--llamacpp runs a GGUF model (smollm2 or a .gguf file), not {model!r}")


def _llamacpp(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one llama.cpp stream: the prompt and its first token's
    argmax, then ``new_tokens - 1`` greedy tokens, each fed back."""
    import numpy as np

    llm.reset()
    t0 = CLOCK()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = CLOCK()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return t1 - t0, CLOCK() - t1


def summary(cells: list[Cell]) -> str:
    return (
        ", ".join(f"b{c.batch} {c.phase} {c.ratio:.2f}x" for c in cells)
        + f" (geomean {statistics.geometric_mean([c.ratio for c in cells]):.2f}x)"
    )


# ---- one mixed step vs two calls ------------------------------------------------------------------


@dataclass(frozen=True)
class StepTiming:
    """Medians over the rounds, in seconds: the mixed step, the two calls together, and each call."""

    mixed_s: float
    separate_s: float
    decode_s: float
    prefill_s: float

    @property
    def ratio(self) -> float:
        return self.separate_s / self.mixed_s


def run_step(args: argparse.Namespace) -> int:
    if min(args.step_prompts, args.step_decodes, args.rounds) < 1 or args.prompt_len < 1:
        raise ValueError("--step needs --step-prompts, --step-decodes, --rounds and --prompt-len >= 1")
    from engine import load_engine

    engine = load_engine(args.model, device=args.device, dtype=args.dtype, num_threads=args.threads, quant=args.quant)
    import torch

    timing = time_mixed_step(engine, args.step_prompts, args.step_decodes, args.prompt_len, args.rounds, args.seed)
    print(
        f"mixed step vs separate calls: model {args.model}, {engine.device}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock, {args.step_prompts} prompts x {args.prompt_len} tokens + {args.step_decodes} "
        f"decodes, median of {args.rounds} rounds"
    )
    print(format_step(timing))
    return 0


def format_step(t: StepTiming) -> str:
    return "\n".join(
        [
            f"  {'mixed step (one pass)':<32} {t.mixed_s * 1e3:9.2f} ms",
            f"  {'decode_step() then prefill()':<32} {t.separate_s * 1e3:9.2f} ms"
            f"  (decode {t.decode_s * 1e3:.2f} ms, prefill {t.prefill_s * 1e3:.2f} ms)",
            f"  {'separate / mixed':<32} {t.ratio:9.2f}x",
        ]
    )


def time_mixed_step(engine, n_prompts: int, n_decodes: int, prompt_len: int, rounds: int, seed: int = 0) -> StepTiming:
    """``n_decodes`` requests keep running (forced length); each round times ``step`` prefilling
    ``n_prompts`` new prompts while decoding them, and the same work as ``decode_step()`` then
    ``prefill``, in alternating order after one untimed warm-up round. The new requests are
    aborted after each, so every call sees the same running batch (one token longer per call)."""
    import torch

    from engine.api import GenerationRequest, SamplingParams

    gen = torch.Generator().manual_seed(seed)
    keep = SamplingParams(max_tokens=2 * rounds + 4, ignore_eos=True)
    running = [
        GenerationRequest(f"run-{i}", tuple(p), keep)
        for i, p in enumerate(make_prompts(gen, n_decodes, prompt_len, engine.vocab_size, 0.0))
    ]
    prompts = make_prompts(gen, n_prompts, prompt_len, engine.vocab_size, 0.0)
    new = [
        GenerationRequest(f"new-{i}", tuple(p), SamplingParams(max_tokens=2, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    ids = [r.request_id for r in running]
    engine.prefill(running)

    def mixed() -> tuple[float, ...]:
        t0 = CLOCK()
        engine.step(prefill=new, decode=ids)
        _sync(engine.device)
        return (CLOCK() - t0,)

    def separate() -> tuple[float, ...]:
        t0 = CLOCK()
        engine.decode_step()
        _sync(engine.device)
        t1 = CLOCK()
        engine.prefill(new)
        _sync(engine.device)
        return CLOCK() - t0, t1 - t0, CLOCK() - t1

    times: dict[str, list[tuple[float, ...]]] = {"mixed": [], "separate": []}
    for r in range(rounds + 1):
        for name, fn in (
            (("mixed", mixed), ("separate", separate)) if r % 2 else (("separate", separate), ("mixed", mixed))
        ):
            _sync(engine.device)
            took = fn()
            for request in new:
                engine.abort(request.request_id)
            if r:
                times[name].append(took)
    for request_id in ids:
        engine.abort(request_id)
    med = lambda rows, i: statistics.median(row[i] for row in rows)  # noqa: E731
    return StepTiming(
        med(times["mixed"], 0), med(times["separate"], 0), med(times["separate"], 1), med(times["separate"], 2)
    )
