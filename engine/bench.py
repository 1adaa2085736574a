"""`exegpt bench engine`: our engine vs Hugging Face ``generate`` on the same weights, same run.

Prompts have different lengths (uniform in [len/2, 3len/2]), so Hugging Face must pad a batch while
our engine packs it. Prefill tokens/s counts real prompt tokens; decode tokens/s counts generated
tokens after the first. Both sides run forced-length (EOS ignored), greedy, under inference_mode.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_BATCHES = "1,8,32"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2, tiny-llama, tiny-opt or a decoder-only folder")
    p.add_argument("--batch-sizes", default=DEFAULT_BATCHES, help="comma-separated (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=64, help="mean prompt length in tokens (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the best counts (default %(default)s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class Cell:
    batch: int
    phase: str  # "prefill" or "decode"
    ours_tok_s: float
    hf_tok_s: float

    @property
    def ratio(self) -> float:
        return self.ours_tok_s / self.hf_tok_s


def run(args: argparse.Namespace) -> int:
    from services.cli import CliError

    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError as exc:
        raise CliError(f"--batch-sizes must be integers, got {args.batch_sizes!r}") from exc
    if not batches or min(batches) < 1 or args.prompt_len < 2 or args.new_tokens < 2:
        raise CliError("need batch sizes >= 1, --prompt-len >= 2 and --new-tokens >= 2")
    try:
        cells, device = benchmark(args.model, batches, args.prompt_len, args.new_tokens, repeats=args.repeats,
                                  device=args.device, dtype=args.dtype, threads=args.threads, seed=args.seed)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    print(f"engine vs transformers generate: model {args.model}, {device}, prompts ~{args.prompt_len} tokens "
          f"(varied), {args.new_tokens} new tokens")
    print(format_table(cells))
    return 0


def format_table(cells: list[Cell]) -> str:
    lines = [f"{'batch':>5}  {'phase':<8} {'ours tok/s':>11} {'HF tok/s':>11} {'ratio':>6}"]
    for c in cells:
        lines.append(f"{c.batch:>5}  {c.phase:<8} {c.ours_tok_s:>11.1f} {c.hf_tok_s:>11.1f} {c.ratio:>6.2f}")
    return "\n".join(lines)


def benchmark(model: str, batches: list[int], prompt_len: int, new_tokens: int, *, repeats: int = 2,
              device: str = "auto", dtype: str | None = None, threads: int | None = None,
              seed: int = 0) -> tuple[list[Cell], str]:
    import torch

    from engine import load_engine

    engine = load_engine(model, device=device, dtype=dtype, num_threads=threads)
    if engine.runner.layout.startswith("t5"):
        raise ValueError("the engine benchmark compares decoder-only models")
    hf = reference_model(engine, model)
    gen = torch.Generator().manual_seed(seed)
    cells: list[Cell] = []
    warm = make_prompts(gen, 2, prompt_len, engine.vocab_size)
    _ours(engine, warm, 3)
    _hf(hf, warm, 3, engine.device)
    for b in batches:
        prompts = make_prompts(gen, b, prompt_len, engine.vocab_size)
        ours, theirs = [], []
        for _ in range(repeats):  # interleaved, best of each: load from other processes hits both sides
            ours.append(_ours(engine, prompts, new_tokens))
            theirs.append(_hf(hf, prompts, new_tokens, engine.device))
        n_prompt, n_decode = sum(map(len, prompts)), b * (new_tokens - 1)
        cells.append(Cell(b, "prefill", n_prompt / min(o[0] for o in ours), n_prompt / min(t[0] for t in theirs)))
        cells.append(Cell(b, "decode", n_decode / min(o[1] for o in ours), n_decode / min(t[1] for t in theirs)))
    return cells, engine.device


def make_prompts(gen, batch: int, mean_len: int, vocab: int) -> list[list[int]]:
    import torch

    lo, hi = max(1, mean_len // 2), max(2, mean_len * 3 // 2)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()
    return [torch.randint(32, vocab, (n,), generator=gen).tolist() for n in lengths]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _ours(engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for the whole batch."""
    from engine.api import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    reqs = [GenerationRequest(f"bench-{i}", tuple(p), params) for i, p in enumerate(prompts)]
    _sync(engine.device)
    t0 = time.perf_counter()
    engine.prefill(reqs)
    _sync(engine.device)
    t1 = time.perf_counter()
    while engine.running():
        engine.decode_step()
    _sync(engine.device)
    return t1 - t0, time.perf_counter() - t1


def _hf(hf, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[float, float]:
    """(prefill seconds, decode seconds): generate 1 token, then generate all; decode is the rest."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)

    def timed(n: int) -> float:
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        _sync(device)
        return time.perf_counter() - t

    prefill = timed(1)
    return prefill, max(timed(new_tokens) - prefill, 1e-9)


def reference_model(engine, model: str) -> Any:
    """The same weights in a transformers model (test/bench-only dependency)."""
    import torch

    try:
        import transformers
    except ImportError as exc:
        raise ValueError("the engine benchmark needs transformers (pip install transformers)") from exc
    ours = engine.runner.model
    if ours.kind == "llama":
        cfg = {k: v for k, v in ours.args.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")}
        with torch.device(engine.device):
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
        hf.load_state_dict(dict(ours.state_dict()), strict=False)
        hf.tie_weights()
    else:
        from pathlib import Path

        from engine import TINY_MODELS
        from engine.tiny import default_dir

        folder = default_dir(model) if model in TINY_MODELS else Path(model)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    param = next(ours.parameters())
    hf = hf.to(device=param.device, dtype=param.dtype).eval()
    hf.generation_config.eos_token_id = None  # forced length on both sides
    hf.generation_config.pad_token_id = 0
    return hf


def summary(cells: list[Cell]) -> str:
    return ", ".join(f"b{c.batch} {c.phase} {c.ratio:.2f}x" for c in cells) + \
        f" (geomean {statistics.geometric_mean([c.ratio for c in cells]):.2f}x)"
