"""`exegpt generate`: one completion from a model, printed to stdout."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion with the engine")
    p.add_argument("--model", default="smollm2", help="smollm2, tiny-llama, tiny-opt, tiny-t5, a folder or a .gguf")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="decode exactly --max-tokens tokens")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument(
        "--quant",
        default=None,
        help="weight-only quantization on the CPU: fp16, int8, int4 or none "
        "(default: a Q4_0/Q4_1 GGUF as int4 on its own codes, else none)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (per process)")
    p.add_argument(
        "--tp",
        default="1",
        help="tensor-parallel degree, or one per pipeline stage (2,1); "
        "more than one process runs the model (torch.distributed)",
    )
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--stage-layers", default=None, help="layers per pipeline stage, e.g. 20,10")
    p.add_argument("--pp-microbatches", type=int, default=1, help="decode micro-batches per step through the stages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from common.cli import CliError
    from engine import load_engine
    from engine.api import GenerationRequest, SamplingParams
    from engine.parallel import GroupShape
    from engine.parallel.group import load_group_engine

    engine = None
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=tuple(args.stop),
            ignore_eos=args.ignore_eos,
        )
        shape = GroupShape.parse(args.tp, args.pp, args.stage_layers, args.pp_microbatches)
        if shape.single:
            engine = load_engine(
                args.model, device=args.device, dtype=args.dtype, num_threads=args.threads, quant=args.quant
            )
        else:
            engine = load_group_engine(
                args.model, shape, device=args.device, dtype=args.dtype, num_threads=args.threads, quant=args.quant
            )
        prompt = args.prompt
        if not args.raw and engine.tokenizer.chat_template is not None:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        events = engine.prefill([GenerationRequest("cli", tuple(engine.tokenizer.encode(prompt)), params)])
        while True:
            for event in events:
                sys.stdout.write(event.text)
            sys.stdout.flush()
            if not engine.running():
                break
            events = engine.decode_step()
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    finally:
        if engine is not None and hasattr(engine.runner, "close"):  # a process group: stop its followers
            engine.runner.close()
    sys.stdout.write("\n")
    return 0
