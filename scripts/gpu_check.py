"""GPU check for the engine: oracle and benchmark on one CUDA device, in well under 3 minutes.

    python scripts/gpu_check.py [--model smollm2] [--batch-sizes 1,8,32]

1. Oracle, float32 (TF32 off): our SmolLM2 vs transformers on the same weights, on CUDA:
   max abs logit diff over 32 greedy steps and whether the 32 greedy tokens are identical.
2. Oracle, bfloat16: our bf16 engine vs the float32 reference: logit diff, matching greedy prefix.
3. Benchmark, bfloat16: engine vs transformers generate, prefill and decode tok/s, as ratios.
Without CUDA it says so and exits 0. Exit status 1 when the float32 oracle fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FP32_LOGIT_TOL = 5e-3


def greedy_with_logits(engine, prompt: list[int], steps: int):
    from engine.runners import greedy_logits

    tokens, logits = greedy_logits(engine.runner, prompt, steps)
    return tokens, logits.float()


def reference_logits(hf, prompt: list[int], tokens: list[int], device: str):
    import torch

    with torch.inference_mode():
        out = hf(input_ids=torch.tensor([prompt + tokens[:-1]], device=device)).logits[0].float()
    return out[len(prompt) - 1:]


def reference_greedy(hf, prompt: list[int], n: int, device: str) -> list[int]:
    import torch

    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try this script's logic")
    args = parser.parse_args()

    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (the test suite runs on CPU).")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from engine import load_engine
    from engine.bench import benchmark, format_table, reference_model, summary

    started = time.perf_counter()
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    fp32 = load_engine(args.model, device=device, dtype="float32")
    hf = reference_model(fp32, args.model)
    text = "What is the capital of France?"
    if fp32.tokenizer.chat_template:
        text = fp32.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    prompt = fp32.tokenizer.encode(text)

    tokens, ours = greedy_with_logits(fp32, prompt, 32)
    ref = reference_logits(hf, prompt, tokens, device)
    diff32 = (ours - ref).abs().max().item()
    same32 = tokens == reference_greedy(hf, prompt, 32, device)

    bf16 = load_engine(args.model, device=device, dtype="bfloat16")
    tokens16, ours16 = greedy_with_logits(bf16, prompt, 32)
    prefix = next((i for i, (a, b) in enumerate(zip(tokens16, tokens)) if a != b), len(tokens))
    diff16 = (ours16[:prefix + 1] - ref[:prefix + 1]).abs().max().item()
    del fp32, hf, bf16
    if device == "cuda":
        torch.cuda.empty_cache()

    print(f"\noracle ({args.model} vs transformers, same weights, {device})")
    print(f"{'check':<34} {'max |dlogit|':>12} {'greedy 32':>10}")
    print(f"{'float32 engine vs float32 HF':<34} {diff32:>12.2e} {'same' if same32 else 'DIFFERENT':>10}")
    print(f"{'bfloat16 engine vs float32 HF':<34} {diff16:>12.2e} {f'{prefix}/32 same':>10}")

    batches = [int(b) for b in args.batch_sizes.split(",")]
    cells, _ = benchmark(args.model, batches, args.prompt_len, args.new_tokens, repeats=3,
                         device=device, dtype="bfloat16")
    print(f"\nbenchmark (bfloat16, prompts ~{args.prompt_len} tokens varied, {args.new_tokens} new tokens)")
    print(format_table(cells))
    print(summary(cells))
    ok = diff32 < FP32_LOGIT_TOL and same32
    print(f"\n{'PASS' if ok else 'FAIL'}: float32 oracle (tolerance {FP32_LOGIT_TOL:.0e}); "
          f"{time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
