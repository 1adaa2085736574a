"""A worker group: one model over several processes, driven by rank 0 as one engine.

    rank 0:  LocalEngine -> ParallelRunner --broadcast(command)--> every rank: Stage.run(command)
    stage s: recv activations from stage s-1 (rank 0 of it) -> its layers (TP all-reduces inside)
             -> send to every rank of stage s+1 | last stage: LM head -> logits to rank 0

Commands are the runner's calls (step, swap, remove, export, import), broadcast as Python objects
over a gloo group; activations and logits go point-to-point over the group's backend (gloo on CPU,
NCCL on CUDA). Every rank builds the same ``Batch`` from the same command and its own cache, whose
slot bookkeeping is identical everywhere, so only tensors travel.

A hand-off always carries the whole KV of a request (every layer, every head): ``export`` gathers
the stages' and TP ranks' pieces on rank 0, ``import_`` gives each rank its layers and heads. So a
request moves between groups of any shape (a TP=2 group's hand-off continues on one process).

A failed collective (a rank died) makes the group unusable: the runner raises ``GroupFailure``
from then on, and the service running it exits so that its requests are redelivered.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from engine.api import EngineBroken
from engine.kv_cache import KVCache
from engine.models.common import Batch
from engine.parallel.procs import child_env, free_port, repo_root
from engine.parallel.shape import GroupShape, split
from engine.parallel.shard import T5_BIAS, hidden_width, keep_layers, shard_tp, stacks, stage_filter
from engine.runners import drop_padding, undo_step

if TYPE_CHECKING:
    from engine.models import Model

log = logging.getLogger(__name__)

TIMEOUT_S = 120.0  # a collective that waits this long on a silent rank fails


class GroupFailure(EngineBroken):
    """A rank of the group failed or left: the group cannot run another step."""


class Comm:
    """This rank's place in the group and its process groups. Every rank must construct it, in the
    same order, right after ``init_process_group``."""

    def __init__(self, shape: GroupShape, rank: int) -> None:
        self.shape, self.rank = shape, rank
        self.stage, self.tp_rank = shape.place(rank)
        world_backend = dist.get_backend()
        self.ctrl = dist.group.WORLD if world_backend == "gloo" else dist.new_group(backend="gloo")
        tp_groups = [dist.new_group(list(shape.ranks(s))) for s in range(shape.pp)]
        self.tp_group = tp_groups[self.stage] if shape.tp[self.stage] > 1 else None
        self.first = self.stage == 0
        self.last = self.stage == shape.pp - 1

    def broadcast(self, command: Any = None) -> Any:
        box = [command]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        return box[0]

    def send_next(self, x: torch.Tensor) -> None:
        """Activations to every rank of the next stage (only this stage's TP rank 0 sends: after the
        all-reduce every TP rank holds the same)."""
        if self.tp_rank == 0:
            x = x.contiguous()
            for r in self.shape.ranks(self.stage + 1):
                dist.send(x, r)

    def recv_prev(self, like: torch.Tensor) -> torch.Tensor:
        dist.recv(like, self.shape.first_rank(self.stage - 1))
        return like

    def last_rank(self) -> int:
        return self.shape.first_rank(self.shape.pp - 1)


def prepare(model: Model, comm: Comm) -> None:
    """Cut a just-loaded model down to this rank's heads and FFN units (``load_state``'s hook)."""
    shard_tp(model, comm.shape.tp[comm.stage], comm.tp_rank, comm.tp_group)


def stage_layers(model: Model, shape: GroupShape, stage: int) -> dict[str, range]:
    return {name: shape.stage_layers(len(layers))[stage] for name, layers in stacks(model).items()}


def full_kv_heads(model: Model) -> int:
    return model.cache_geometry()[1]


class Stage:
    """What one rank runs: its layers of the model, its part of the KV cache, and its side of each
    command's communication."""

    def __init__(
        self,
        model: Model,
        comm: Comm,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_context: int,
        layers: dict[str, range],
    ) -> None:
        self.model, self.comm, self.device, self.dtype = model, comm, device, dtype
        self.t5 = model.kind == "t5"
        self.layers = layers
        self.dec = layers["decoder" if self.t5 else "layers"]
        _, _, head_dim = model.cache_geometry()
        kv_heads = getattr(model, "local_kv_heads", full_kv_heads(model))
        make = lambda: KVCache(
            len(self.dec),
            kv_heads,
            head_dim,
            dtype=dtype,
            device=device,  # noqa: E731
            max_context=max_context,
        )
        self.cache = make()
        self.cross = make() if self.t5 else None
        self.width = hidden_width(model)
        self.microbatches = comm.shape.microbatches if not self.t5 else 1  # T5 runs whole steps
        self.vocab = model.lm_head.weight.shape[0]

    # ---- commands -----------------------------------------------------------------------------

    def run(self, command: tuple) -> Any:
        op, *args = command
        return getattr(self, f"do_{op}")(*args)

    def do_step(
        self, prompts: list[list[int]], resumed: list[list[int]], last_tokens: list[int], padding: int
    ) -> torch.Tensor | None:
        size, live = self.cache.size, len(last_tokens)
        ids = torch.tensor(last_tokens, dtype=torch.int64).to(self.device)
        try:
            if self.model.kind == "t5":  # as self.t5, but the model's kind narrows its type below
                logits = self._t5_step(prompts, resumed, ids, padding)
            elif not prompts and self.microbatches > 1 and live > 1:
                logits = self._pipelined_decode(ids, padding)
            else:
                seqs = [p + r for p, r in zip(prompts, resumed)]
                batch = Batch.step(self.cache, ids, padding, seqs, self.device)
                x = self.model.embed(batch) if self.comm.first else self._recv(batch.input_ids.shape[0])
                x = self.model.run_layers(x, batch, self.dec)
                logits = self._finish(x, batch, self.model.head)
        except BaseException:
            self.cache.truncate(size)
            if self.cross is not None:
                self.cross.truncate(size)
            raise
        self.cache.advance(live)
        return None if logits is None else drop_padding(logits, live, padding)

    def _pipelined_decode(self, ids: torch.Tensor, padding: int) -> torch.Tensor | None:
        """A decode step as micro-batches of consecutive slots that follow each other through the
        stages: stage s works on micro-batch m while stage s+1 works on m-1, so with M micro-batches
        over P stages a stage idles (P-1)/(M+P-1) of the step instead of (P-1)/P. Sends do not wait
        for their receiver; padding rows go with the last micro-batch."""
        comm, model = self.comm, self.model
        assert model.kind != "t5"  # T5 runs whole steps (one micro-batch)
        runs = [r for r in (split(ids.shape[0], self.microbatches, i) for i in range(self.microbatches)) if len(r)]
        pending, kept, outs = [], [], []
        for i, run in enumerate(runs):
            pad = padding if i == len(runs) - 1 else 0
            batch = Batch.decode_run(self.cache, ids[run.start : run.stop], run.start, pad)
            x = model.embed(batch) if comm.first else self._recv(len(run) + pad)
            x = model.run_layers(x, batch, self.dec)
            if not comm.last:
                if comm.tp_rank == 0:
                    kept.append(x.contiguous())
                    pending += [dist.isend(kept[-1], r) for r in comm.shape.ranks(comm.stage + 1)]
            elif comm.tp_rank == 0:
                logits = model.head(x, batch)
                if comm.rank == 0:
                    outs.append(logits)
                else:
                    kept.append(logits.contiguous())
                    pending.append(dist.isend(kept[-1], 0))
        if comm.rank == 0 and not comm.last:
            for i, run in enumerate(runs):
                rows = len(run) + (padding if i == len(runs) - 1 else 0)
                outs.append(torch.empty(rows, self.vocab, dtype=torch.float32, device=self.device))
                dist.recv(outs[-1], comm.last_rank())
        for work in pending:
            assert work is not None  # None only from a rank outside the group, and every rank is in this one
            work.wait()
        return torch.cat(outs) if outs else None

    def _t5_step(self, prompts, resumed, ids, padding):
        comm, model = self.comm, self.model
        if prompts:
            pb = Batch.prefill(self.cross, prompts, self.device, causal=False)
            n = pb.input_ids.shape[0]
            x = model.shared(pb.input_ids) if comm.first else self._recv(n)
            x = model.encode_layers(x, pb, self.layers["encoder"])
            if comm.last:  # every rank needs the whole encoder's output for its cross K/V
                enc = model.encoder.final_layer_norm(x)
                if comm.tp_rank == 0:
                    for r in range(comm.last_rank()):
                        dist.send(enc.contiguous(), r)
            else:
                comm.send_next(x)
                enc = self._recv(n, src=comm.last_rank())
            model.write_cross(enc, pb, self.dec)
        cross = self.cross
        cross.reserve(max(cross.size, len(ids) + padding), max(cross.lengths, default=1))
        start = model.args.decoder_start_token_id
        batch = Batch.step(self.cache, ids, padding, [[start, *r] for r in resumed], self.device)
        x = model.shared(batch.input_ids) if comm.first else self._recv(batch.input_ids.shape[0])
        x = model.decode_layers(x, batch, cross, self.dec)
        return self._finish(x, batch, model.decode_head)

    def _recv(self, rows: int, src: int | None = None) -> torch.Tensor:
        x = torch.empty(rows, self.width, dtype=self.dtype, device=self.device)
        if src is None:
            return self.comm.recv_prev(x)
        dist.recv(x, src)
        return x

    def _finish(self, x: torch.Tensor, batch: Batch, head) -> torch.Tensor | None:
        """Pass x on, or (last stage) the logits to rank 0. Rank 0 returns the logits."""
        comm = self.comm
        if not comm.last:
            comm.send_next(x)
            logits = None
        elif comm.tp_rank == 0:
            logits = head(x, batch)
            if comm.rank != 0:
                dist.send(logits.contiguous(), 0)
        else:
            return None
        if comm.rank == 0 and logits is None:
            rows = batch.input_ids.shape[0] if batch.logit_rows is None else batch.logit_rows.shape[0]
            logits = torch.empty(rows, self.vocab, dtype=torch.float32, device=self.device)
            dist.recv(logits, comm.last_rank())
        return logits

    def do_rollback(self, size: int, live: int, chunks: list[tuple[int, int]]) -> None:
        undo_step(self.cache, size, live, chunks)
        if self.cross is not None:
            self.cross.truncate(size)

    def do_swap(self, pairs: list[tuple[int, int]]) -> None:
        self.cache.swap(pairs)
        if self.cross is not None:
            self.cross.swap(pairs)

    def do_remove(self, slot: int) -> None:
        self.cache.remove(slot)
        if self.cross is not None:
            self.cross.remove(slot)

    def local_kv(self, slot: int) -> torch.Tensor:
        """(L_stage, 2, Hkv_rank, T, D) of one slot (T5: self then cross positions)."""
        if self.cross is None:
            return self.cache.read(slot)
        return torch.cat([self.cache.read(slot), self.cross.read(slot)], dim=3)

    def do_export(self, slot: int) -> torch.Tensor | None:
        kv = self.local_kv(slot).contiguous()
        if self.comm.rank != 0:
            dist.send(kv, 0)
            return None
        return self._gather(kv)

    def _gather(self, own: torch.Tensor) -> torch.Tensor:
        shape, model = self.comm.shape, self.model
        heads = full_kv_heads(model)
        positions = own.shape[3]
        stages = []
        for s in range(shape.pp):
            layers = len(stage_layers(model, shape, s)["decoder" if self.t5 else "layers"])
            parts = []
            for r in shape.ranks(s):
                if r == 0:
                    parts.append(own)
                    continue
                piece = torch.empty(
                    layers,
                    2,
                    len(split(heads, shape.tp[s], r - shape.first_rank(s))),
                    positions,
                    own.shape[4],
                    dtype=own.dtype,
                    device=own.device,
                )
                dist.recv(piece, r)
                parts.append(piece)
            stages.append(torch.cat(parts, dim=2))
        return torch.cat(stages, dim=0)

    def do_import(self, kv: torch.Tensor, generated: int) -> None:
        comm = self.comm
        heads = split(full_kv_heads(self.model), comm.shape.tp[comm.stage], comm.tp_rank)
        mine = kv[self.dec.start : self.dec.stop, :, heads.start : heads.stop]
        if self.cross is None:
            self.cache.append(mine)
            return
        if mine.shape[3] <= generated:
            raise ValueError(f"T5 hand-off of {mine.shape[3]} positions cannot hold {generated} decoder positions")
        self.cache.append(mine[:, :, :, :generated])
        self.cross.append(mine[:, :, :, generated:])


class _Geometry:
    def __init__(self, bytes_per_position: int) -> None:
        self.bytes_per_position = bytes_per_position


class ParallelRunner:
    """The engine's runner on rank 0: every call is broadcast to the group and run by every rank."""

    def __init__(self, stage: Stage, *, max_context: int, processes: list[subprocess.Popen] | None = None) -> None:
        model = stage.model
        self.stage, self.comm, self.model = stage, stage.comm, model
        self.max_context = max_context
        self.prompt_in_context = model.kind != "t5"
        self.layout = "t5:self+cross:L,2,H,T+S,D" if model.kind == "t5" else f"{model.kind}:L,2,Hkv,T,D"
        layers, kv_heads, head_dim = model.cache_geometry()
        self.cache = _Geometry(layers * 2 * kv_heads * head_dim * stage.cache.kv.element_size())
        self.shape = stage.comm.shape
        self.processes = processes or []
        self._failed: BaseException | None = None

    def _call(self, *command: Any) -> Any:
        if self._failed is not None:
            raise GroupFailure(f"worker group ({self.shape.describe()}) failed earlier: {self._failed}")
        try:
            self.comm.broadcast(command)
            return self.stage.run(command)
        except (ValueError, KeyError):
            raise  # the same deterministic error on every rank; the group goes on
        except Exception as exc:  # noqa: BLE001 - a collective failed: a rank is gone or broken
            self._failed = exc
            log.error("worker group (%s) failed: %s", self.shape.describe(), exc)
            raise GroupFailure(f"worker group ({self.shape.describe()}) failed: {exc}") from exc

    def step(
        self,
        prompts: list[list[int]],
        resumed: list[list[int]],
        last_tokens: list[int],
        padding: int,
        chunks: Sequence[tuple[int, list[int]]] = (),
    ) -> torch.Tensor:
        if chunks:
            raise ValueError("a worker group cannot prefill in chunks")
        return self._call("step", prompts, resumed, last_tokens, padding)

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        return self.step(prompts, [[] for _ in prompts], [], 0)

    def decode(self, last_tokens: list[int]) -> torch.Tensor:
        return self.step([], [], last_tokens, 0)

    def rollback(self, size: int, live: int, chunks: Sequence[tuple[int, int]] = ()) -> None:
        self._call("rollback", size, live, list(chunks))

    def swap(self, pairs: list[tuple[int, int]]) -> None:
        self._call("swap", pairs)

    def remove(self, slot: int) -> None:
        self._call("remove", slot)

    def export(self, slot: int) -> torch.Tensor:
        return self._call("export", slot)

    def view(self, slot: int) -> torch.Tensor:  # gathered from the group's ranks: a copy
        return self.export(slot)

    def import_(self, kv: torch.Tensor, generated: int) -> None:
        self._call("import", kv.to(self.stage.device), generated)

    def positions(self, prompt: int, generated: int) -> int:
        return prompt + generated if self.model.kind == "t5" else prompt + generated - 1

    def close(self) -> None:
        """Stop the followers and leave the process group."""
        if self._failed is None:
            try:
                self.comm.broadcast(("stop",))
            except Exception:  # noqa: BLE001 - already broken
                pass
        for p in self.processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- starting a group -------------------------------------------------------------------------


def _device_for(device: str, rank: int) -> torch.device:
    if device.startswith("cuda"):
        return torch.device("cuda", rank % max(1, torch.cuda.device_count()))
    return torch.device(device)


def join(shape: GroupShape, rank: int, *, addr: str, port: int, device: str) -> Comm:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_device_for(device, rank))
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=shape.world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    return Comm(shape, rank)


def build_stage(
    model: str,
    comm: Comm,
    *,
    device: str,
    dtype: torch.dtype,
    max_context: int | None,
    models_dir=None,
    quant: str | None = None,
) -> tuple[Stage, Any, dict, int]:
    """This rank's stage of ``model``: (stage, tokenizer, config, context limit). ``quant`` applies to
    the rank's own (sharded) projections."""
    from engine import checkpoint_layers, precision_, read_checkpoint
    from engine.loading import build_model, load_state

    dev = _device_for(device, comm.rank)
    kept = {name: comm.shape.stage_layers(n)[comm.stage] for name, n in checkpoint_layers(model, models_dir).items()}
    staged = comm.shape.pp > 1  # a stage reads only its own layers' tensors, and builds only those
    model_type, config, state, tokenizer = read_checkpoint(model, models_dir, stage_filter(kept) if staged else None)
    module = build_model(model_type, config)
    if staged:
        keep_layers(module, kept, {k: v.to(device=dev, dtype=dtype) for k, v in state.items() if T5_BIAS in k})
    module = load_state(module, state, dtype, dev, prepare=partial(prepare, comm=comm), pack=quant is None)
    del state
    precision_(module, quant, dev.type, dtype)
    limit = module.max_positions()
    context = min(limit, max_context) if max_context else limit
    layers = stage_layers(module, comm.shape, comm.stage)
    return Stage(module, comm, device=dev, dtype=dtype, max_context=context, layers=layers), tokenizer, config, context


def spawn_followers(
    model: str,
    shape: GroupShape,
    *,
    addr: str,
    port: int,
    device: str,
    dtype: str | None,
    threads: int | None,
    max_context: int | None,
    models_dir=None,
    quant: str | None = None,
) -> list[subprocess.Popen]:
    """Ranks 1..W-1 as child processes of this one (they exit when it does)."""
    procs = []
    for rank in range(1, shape.world):
        argv = [
            sys.executable,
            "-m",
            "engine.parallel.follower",
            "--model",
            model,
            "--rank",
            str(rank),
            "--shape",
            _plain_json(shape),
            "--master-addr",
            addr,
            "--master-port",
            str(port),
            "--device",
            device,
            "--parent",
            str(os.getpid()),
        ]
        for flag, value in (
            ("--dtype", dtype),
            ("--threads", threads),
            ("--max-context", max_context),
            ("--models-dir", models_dir),
            ("--quant", quant),
        ):
            if value is not None:
                argv += [flag, str(value)]
        procs.append(subprocess.Popen(argv, cwd=repo_root(), env=child_env()))
    return procs


def _plain_json(shape: GroupShape) -> str:
    import json

    return json.dumps(shape.to_plain())


def load_group_engine(
    model: str,
    shape: GroupShape,
    *,
    device: str = "auto",
    dtype: str | None = None,
    num_threads: int | None = None,
    max_context: int | None = None,
    models_dir=None,
    master_addr: str | None = None,
    master_port: int | None = None,
    quant: str | None = None,
):
    """An engine whose model runs over a group of ``shape.world`` processes, this one rank 0.

    Without ``master_addr`` the other ranks are started here as child processes; with it they are
    started elsewhere (``exegpt worker --rank R --master-addr A --master-port P``) and this call
    waits for them to join."""
    from engine import _dtype, check_quant, resolve_device
    from engine.engine import LocalEngine

    if dist.is_initialized():
        raise ValueError("this process already drives a worker group (one per process)")
    dev = resolve_device(device)
    torch_dtype = _dtype(dtype, dev)
    quant = check_quant(quant, dev)
    threads = num_threads or default_threads(shape.world if master_addr is None else 1)
    torch.set_num_threads(threads)
    procs: list[subprocess.Popen] = []
    addr = master_addr or "127.0.0.1"
    port = master_port or free_port()
    if master_addr is None:
        procs = spawn_followers(
            model,
            shape,
            addr=addr,
            port=port,
            device=dev,
            dtype=dtype,
            threads=threads,
            max_context=max_context,
            models_dir=models_dir,
            quant=quant,
        )
    try:
        comm = join(shape, 0, addr=addr, port=port, device=dev)
        stage, tokenizer, config, context = build_stage(
            model, comm, device=dev, dtype=torch_dtype, max_context=max_context, models_dir=models_dir, quant=quant
        )
    except BaseException:
        for p in procs:
            p.kill()
        raise
    runner = ParallelRunner(stage, max_context=context, processes=procs)
    vocab = min(config["vocab_size"], tokenizer.vocab_size)
    return LocalEngine(runner, tokenizer, model_name=model, device=dev, vocab_size=vocab)


def default_threads(processes: int) -> int:
    """torch threads per process: this host's cores shared by the processes on it (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def follow(
    model: str,
    shape: GroupShape,
    rank: int,
    *,
    addr: str,
    port: int,
    device: str = "auto",
    dtype: str | None = None,
    num_threads: int | None = None,
    max_context: int | None = None,
    models_dir=None,
    quant: str | None = None,
) -> int:
    """Run rank ``rank`` (> 0) of a group until rank 0 stops it or goes away. Returns an exit status."""
    from engine import _dtype, resolve_device

    dev = resolve_device(device)
    torch.set_num_threads(num_threads or default_threads(shape.world))
    comm = join(shape, rank, addr=addr, port=port, device=dev)
    stage, *_ = build_stage(
        model, comm, device=dev, dtype=_dtype(dtype, dev), max_context=max_context, models_dir=models_dir, quant=quant
    )
    with torch.inference_mode():
        while True:
            try:
                command = comm.broadcast()
            except Exception as exc:  # noqa: BLE001 - rank 0 is gone
                log.info("rank %d: driver gone (%s); leaving", rank, exc)
                return 1
            if command[0] == "stop":
                break
            try:
                stage.run(command)
            except (ValueError, KeyError):
                continue  # rank 0 met the same error and carries on
            except Exception as exc:  # noqa: BLE001
                log.error("rank %d: %s failed: %s", rank, command[0], exc)
                return 1
    dist.destroy_process_group()
    return 0
