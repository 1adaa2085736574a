"""A follower rank of a worker group: ``python -m engine.parallel.follower --model M --shape JSON
--rank R --master-addr A --master-port P``. Started by rank 0 for a local group (``--parent``: exit
when that process does), or by hand on another host."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engine.parallel.group import follow
from engine.parallel.procs import die_with
from engine.parallel.shape import GroupShape


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--shape", required=True, help='{"tp": [2], "layers": null}')
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--models-dir", default=None)
    p.add_argument("--quant", default=None)
    p.add_argument("--parent", type=int, default=None)
    args = p.parse_args(argv)
    if args.parent is not None:
        die_with(args.parent)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {args.rank} %(levelname)s %(message)s")
    shape = GroupShape.from_plain(json.loads(args.shape))
    return follow(
        args.model,
        shape,
        args.rank,
        addr=args.master_addr,
        port=args.master_port,
        device=args.device,
        dtype=args.dtype,
        num_threads=args.threads,
        max_context=args.max_context,
        models_dir=args.models_dir,
        quant=args.quant,
    )


if __name__ == "__main__":
    sys.exit(main())
