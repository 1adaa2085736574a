"""Every queue, exchange, routing key and store key of the mesh, derived from one namespace.

AMQP names use ``{ns}.``, store keys use ``{ns}:``. Work queues are durable and their messages
persistent; per-process queues (events, control) are exclusive and vanish with their process.
Unroutable or undecodable work goes to the dead-letter exchange, which feeds the dead queue.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import MeshConfig

# --- TTLs (seconds) of store keys -------------------------------------------------------------
KV_TTL_S = 600.0  # default; the config's kv_ttl_s overrides it for hand-off payload and metadata
KV_AGENT_TTL_S = 3600.0  # a NIXL agent's metadata; its process republishes it before half of this passes
DONE_TTL_S = 3600.0  # a finished request's marker: long enough to dedupe any redelivery
ARRIVALS_TTL_S = 180.0  # per-second arrival counters: the forecast reads the last 30 s
OUTPUT_LENGTHS_MAX = 10_000  # finished requests' (input, output) lengths kept for the scheduler
CREDITS_TTL_S = 24 * 3600.0  # a schedule version's decode credits; refreshed on every change
RESULT_TTL_S = 7 * 24 * 3600.0  # a batch's index entry; its folder (records, files, results) is kept as long
BATCHES_MAX = 1000  # Batch API batch ids kept in the listing (newest first)


@dataclass(frozen=True)
class Names:
    namespace: str

    # --- AMQP queues ----------------------------------------------------------------------
    @property
    def encode_queue(self) -> str:
        """Durable; EncodeWork from gateways and batch producers, consumed by workers that encode."""
        return f"{self.namespace}.encode"

    @property
    def handoff_queue(self) -> str:
        """Durable; KvReady from encoders, consumed by decoders (credits bound what is in it)."""
        return f"{self.namespace}.handoff"

    @property
    def scheduler_queue(self) -> str:
        """Durable; requests to the scheduler (PinSchedule)."""
        return f"{self.namespace}.scheduler"

    @property
    def dead_queue(self) -> str:
        """Durable; messages that could not be decoded or were rejected without requeue."""
        return f"{self.namespace}.dead"

    def events_queue(self, process_id: str) -> str:
        """Exclusive; EventBatch for the requests one gateway (or batch runner) submitted."""
        return f"{self.namespace}.events.{process_id}"

    def abort_queue(self, process_id: str) -> str:
        """Exclusive, bound to the abort exchange: one worker's Abort messages."""
        return f"{self.namespace}.aborts.{process_id}"

    def control_queue(self, process_id: str) -> str:
        """Exclusive, bound to the control exchange: one per worker."""
        return f"{self.namespace}.control.{process_id}"

    def status_queue(self, process_id: str) -> str:
        """Exclusive, bound to the status exchange: one per listener (scheduler, tests)."""
        return f"{self.namespace}.status.{process_id}"

    def probe_queue(self, side: str) -> str:
        """Exclusive; the benchmark's ping-pong between two processes, which times a bare hop."""
        return f"{self.namespace}.probe.{side}"

    # --- AMQP exchanges (fanout; routing key unused) --------------------------------------
    @property
    def control_exchange(self) -> str:
        """Scheduler -> every worker: ScheduleUpdate (only the scheduler's broker user may publish)."""
        return f"{self.namespace}.control"

    @property
    def abort_exchange(self) -> str:
        """Gateways -> every worker: Abort, when a client went away (kept apart from the control
        exchange so that a gateway's broker user cannot publish schedules)."""
        return f"{self.namespace}.aborts"

    @property
    def status_exchange(self) -> str:
        """Every worker -> scheduler and observers: WorkerStatus (heartbeats)."""
        return f"{self.namespace}.status"

    @property
    def dead_exchange(self) -> str:
        """Dead-letter exchange of the work queues; bound to the dead queue."""
        return f"{self.namespace}.dead-letter"

    # --- store keys -----------------------------------------------------------------------
    @property
    def kv_meta_prefix(self) -> str:
        """Every hand-off's metadata key starts with this: one per KV cache in the store."""
        return f"{self.namespace}:kvmeta:"

    def kv_payload(self, request_id: str) -> str:
        """Bytes of one hand-off (KVHandoff.to_bytes). TTL kv_ttl_s; deleted when the request ends."""
        return f"{self.namespace}:kv:{request_id}"

    def kv_meta(self, request_id: str) -> str:
        """Redis transport: hash (request_id, producer, decoder, dtype, shape, length, expires_at).
        NIXL transport: the KvBlocks descriptor (msgpack), deleted once the decoder read the blocks.
        TTL kv_ttl_s (the lease)."""
        return f"{self.namespace}:kvmeta:{request_id}"

    def kv_agent(self, agent: str) -> str:
        """A worker process's NIXL agent metadata (bytes). TTL KV_AGENT_TTL_S; a new process, a new agent."""
        return f"{self.namespace}:kvagent:{agent}"

    @property
    def attempts_prefix(self) -> str:
        """``{prefix}{message_id}``: how many more times a redelivered message was handed out
        (RabbitMQ; ``common.transport.rabbit.Attempts``). Deleted when it is settled; TTL a week."""
        return f"{self.namespace}:attempts:"

    def done(self, request_id: str) -> str:
        """Set once when a request finishes (set-if-absent); TTL DONE_TTL_S. Dedupes redelivery."""
        return f"{self.namespace}:done:{request_id}"

    @property
    def schedule(self) -> str:
        """The current ScheduleUpdate (encoded), for workers that join late. No TTL."""
        return f"{self.namespace}:schedule"

    @property
    def pinned_schedule(self) -> str:
        """The schedule pinned at the scheduler (encoded PinSchedule), for a restarted scheduler. No TTL."""
        return f"{self.namespace}:schedule:pinned"

    @property
    def scheduler_state(self) -> str:
        """The active scheduler's SchedulerState (encoded): its decision and what it was based on. No TTL."""
        return f"{self.namespace}:scheduler:state"

    @property
    def scheduler_lease(self) -> str:
        """The active scheduler's lease: ``process-id/nonce`` (two processes given one id still differ),
        set-if-absent with TTL lease_ttl_s, renewed by its holder only. A standby scheduler takes it
        once it lapses."""
        return f"{self.namespace}:scheduler:lease"

    @property
    def leader_token(self) -> str:
        """Integer: the fencing token, incremented by each scheduler that takes the lease. No TTL."""
        return f"{self.namespace}:scheduler:token"

    @property
    def schedule_version(self) -> str:
        """Integer: the last schedule version published, incremented atomically per publish. No TTL."""
        return f"{self.namespace}:schedule:version"

    @property
    def store_epoch(self) -> str:
        """Integer: unix milliseconds when this store first held the mesh's keys (set-if-absent). A
        store that lost its data gets a later epoch, so versions published into it order after the
        ones workers hold. No TTL."""
        return f"{self.namespace}:epoch"

    def credits(self, version: int) -> str:
        """Integer: decode slots free for hand-offs under schedule ``version`` (WAA). Decoders add
        their free slots, encoders take them before encoding. TTL CREDITS_TTL_S."""
        return f"{self.namespace}:credits:{version}"

    def arrivals(self, second: int) -> str:
        """Integer: requests the gateways accepted in unix second ``second`` (the scheduler's
        arrival forecast reads the last minute of them). TTL ARRIVALS_TTL_S."""
        return f"{self.namespace}:arrivals:{second}"

    @property
    def calibration(self) -> str:
        """msgpack of ``optimizer.calibration.Calibration.to_plain()``: the active scheduler's
        fitted step-time corrections, so a new leader starts calibrated. No TTL."""
        return f"{self.namespace}:scheduler:calibration"

    @property
    def output_lengths(self) -> str:
        """List of encoded LengthSample, newest first, capped at OUTPUT_LENGTHS_MAX. No TTL."""
        return f"{self.namespace}:stats:lengths"

    # --- batch jobs: AMQP queues ------------------------------------------------------------------------
    @property
    def jobs_queue(self) -> str:
        """Durable; BatchJob from producers (CLI, Batch API), consumed by job consumers."""
        return f"{self.namespace}.jobs"

    def reply_queue(self, owner: str) -> str:
        """Durable; JobResult for one producer or batch (``reply_to`` names it). Deleted by its owner."""
        return f"{self.namespace}.jobs.replies.{owner}"

    # --- batch jobs: store keys (an index; files, records and results live in the batch folder) ------
    def openai_batch(self, batch_id: str) -> str:
        """Hash: owner; the Batch API batch's index entry (a batch indexed but missing from the batch
        folder answers 410, not 404). TTL RESULT_TTL_S."""
        return f"{self.namespace}:openaibatch:{batch_id}"

    @property
    def openai_batches(self) -> str:
        """List of Batch API batch ids, newest first, capped at BATCHES_MAX. No TTL; rebuilt from
        the batch folder when ``openai_batches_built`` is absent."""
        return f"{self.namespace}:openaibatches"

    @property
    def openai_batches_built(self) -> str:
        """String: when the listings were last rebuilt from the batch folder; absent in a store that
        lost its data, which makes the next listing rebuild them. No TTL."""
        return f"{self.namespace}:openaibatches:built"

    # --- batch jobs: keys of versions that kept batch data in the store, read once to move it ---------
    def legacy_job_result(self, job_id: str) -> str:
        """Encoded JobResult (earlier versions; now ``batches/{batch}/results/{job}`` in the folder)."""
        return f"{self.namespace}:job:{job_id}"

    @property
    def legacy_job_batch_prefix(self) -> str:
        """Hashes ``{prefix}{batch_id}``: count, model, created_at, reply_to, cancelled (earlier versions)."""
        return f"{self.namespace}:jobbatch:"

    @property
    def legacy_file_meta_prefix(self) -> str:
        """Hashes ``{prefix}{file_id}``: a Batch API file's record (earlier versions)."""
        return f"{self.namespace}:filemeta:"

    def legacy_file_content(self, file_id: str) -> str:
        """Bytes of an uploaded Batch API file (earlier versions)."""
        return f"{self.namespace}:file:{file_id}"

    @property
    def key_prefix(self) -> str:
        """Every store key of this namespace starts with this (for cleanup)."""
        return f"{self.namespace}:"

    @property
    def queue_prefix(self) -> str:
        """Every queue and exchange of this namespace starts with this (for cleanup)."""
        return f"{self.namespace}."


def new_worker_id(config: MeshConfig, role: str) -> str:
    """The id a process of ``role`` (worker, gateway, scheduler) goes by on the bus and in the store:
    the configured ``worker_id``, else one new in every process (host, pid and a random suffix)."""
    if config.worker_id:
        return config.worker_id
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
