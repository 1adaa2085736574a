"""The state a worker's parts share, declared and set in one place.

The worker is one loop (``worker``) and the parts it is made of, each in its own module: the
intake, the role in the schedule, the step, how a request leaves and the trace spans. Each part
inherits ``WorkerBase``, so everything a part reads of the worker is declared here with its type,
and so are the few methods one part calls on another (defined where they belong, named below).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.config import MeshConfig
from common.names import Names, new_worker_id
from common.tracing import tracing_for
from common.transport.connect import Transports
from common.transport.port import Subscription
from optimizer.driver import Driver
from optimizer.policies import IdlePolicy, Role
from services.hosting.engines import EngineRunner, group_shape
from services.worker.costs import StepSampler
from services.worker.credits import Credits
from services.worker.follower import ScheduleFollower
from services.worker.mailbox import Inbox, Outbox
from services.worker.metrics import WorkerMetrics, WorkerState
from services.worker.records import UnwrittenRecords
from services.worker.requests import Held
from services.worker.trace import StepTrace

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from common.transport.port import Delivery
    from engine.api import KVHandoff
    from optimizer.policies import StepPlan
    from services.worker.executor import StepResult

CREDIT_POLL_S = (0.002, 0.05)  # an encoder without credits looks again after this, doubling


@dataclass
class Drain:
    """Leaving a decoding role: decode until ``deadline`` (time.monotonic), then give back."""

    role: Role
    deadline: float


class WorkerBase:
    def __init__(
        self, config: MeshConfig, transports: Transports, runner: EngineRunner, *, trace: bool = False
    ) -> None:
        self.config = config
        self.names = Names(config.namespace)
        self.transports = transports
        self.bus, self.store, self.kv = transports.bus, transports.store, transports.kv
        self.worker_id = new_worker_id(config, "worker")
        self.group = group_shape(config).tp  # announced in heartbeats
        self.runner = runner
        self.follower = ScheduleFollower(self.worker_id, config.max_encode_batch, config.max_decode_batch)
        self.role: Role = "idle"
        self.driver = Driver(
            IdlePolicy(self.follower.schedule), kv_tokens=getattr(runner.engine, "kv_budget_tokens", None)
        )
        self.held: dict[str, Held] = {}
        self.inbox = Inbox()
        self.credits = Credits(self.store, self.names)
        self.records = UnwrittenRecords(self.store, self.names)
        self.trace = StepTrace() if trace else None
        self.tracing = tracing_for(config)  # spans across services (not the step record above)
        self.aborted: dict[str, None] = {}
        self.gone: dict[str, None] = {}  # events queues found missing past the grace: their gateways are gone
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.changed = asyncio.Event()  # set whenever a schedule version or a role takes effect
        self.steps = 0
        self.engine_s = 0.0
        self.max_batch_seen = 0
        self.moved = {"handed_off": 0, "requeued": 0}  # running requests given back on a role change
        self._abort_pending: list[str] = []
        self._next_stamps = Outbox()  # stamps that go out with the next step's tokens
        self._intake: dict[str, Subscription] = {}  # queue -> subscription
        self._encode_prefetch = 0  # what the encode queue's consumer was last set to
        self._drain: Drain | None = None
        self._stop_deadline: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._credit_wait = CREDIT_POLL_S[0]
        self._arrived: list[tuple[str, int]] = []  # queued since the last boundary (for the trace)
        self.metrics = WorkerMetrics(self.metrics_state)
        self.step_costs = StepSampler(self.worker_id)  # for the scheduler's calibration, with each heartbeat
        self._busy_since: float | None = None  # the last step's end, while the loop went straight on to the next

    # ---- what one part calls on another, each defined in the module named --------------------
    def metrics_state(self) -> WorkerState:  # worker
        raise NotImplementedError

    async def report(self, state: str) -> bool:  # worker
        raise NotImplementedError

    async def _begin_stop(self) -> None:  # worker
        raise NotImplementedError

    async def _pump(self, queue: str, subscription: Subscription) -> None:  # intake
        raise NotImplementedError

    async def _on_dead(self, delivery: Delivery, reason: str) -> None:  # intake
        raise NotImplementedError

    async def _return_credits(self, plan: StepPlan) -> None:  # roles
        raise NotImplementedError

    async def send(self, outbox: Outbox) -> None:  # exits
        raise NotImplementedError

    def send_soon(self, outbox: Outbox) -> list[asyncio.Task[None]]:  # exits
        raise NotImplementedError

    async def _settle(self, held: Held, reason: str, published: list[asyncio.Task[None]]) -> None:  # exits
        raise NotImplementedError

    async def _refuse(self, held: Held, published: list[asyncio.Task[None]], dead: str | None) -> None:  # exits
        raise NotImplementedError

    async def _hand_off(self, held: Held, handoff: KVHandoff, published: list[asyncio.Task[None]]) -> None:  # exits
        raise NotImplementedError

    async def _give_back(self, held: Held) -> None:  # exits
        raise NotImplementedError

    def _keep(self, work: Coroutine[Any, Any, None], held: Held | None = None) -> None:  # exits
        raise NotImplementedError

    async def _gone(self, reply_to: str) -> bool:  # exits
        raise NotImplementedError

    def _trace_step(self, plan: StepPlan, result: StepResult) -> None:  # spans
        raise NotImplementedError

    def _span_attributes(self, held: Held) -> dict[str, str | int] | None:  # spans
        raise NotImplementedError

    def _end_decode_span(self, held: Held, outcome: str, at: float | None = None, *, error: str | None = None) -> None:
        raise NotImplementedError  # spans
