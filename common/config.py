"""Typed configuration of the mesh, read from flags and ``EXEGPT_*`` environment variables.

Built once at an entry point (the CLI, a test fixture) and passed down; nothing below the entry
points reads the environment.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Role = Literal["gateway", "worker", "scheduler"]


def default_batch_dir() -> str:
    """``$XDG_DATA_HOME/exegpt/batches`` (``~/.local/share/exegpt/batches`` without it)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "exegpt", "batches")


class MeshConfig(BaseSettings):
    """Everything a mesh process needs to join the others."""

    model_config = SettingsConfigDict(env_prefix="EXEGPT_", frozen=True, extra="forbid")

    namespace: str = Field(
        "exegpt",
        description="Prefix of every queue, exchange and Redis key; meshes sharing one broker "
        "(and parallel test runs) use different namespaces.",
    )
    amqp_url: str | None = Field(
        None, description="RabbitMQ URL (amqp://user:pass@host:5672/); None: in-memory bus, one process."
    )
    amqp_heartbeat_s: int = Field(
        10,
        ge=0,
        description="AMQP heartbeat asked of the broker (unless the URL names one): a peer silent for two "
        "is dropped and its unacknowledged messages go to others (0: the broker's choice).",
    )
    redis_url: str | None = Field(
        None, description="Redis URL (redis://host:6379/0); None: in-memory store, one process."
    )
    batch_dir: str = Field(
        default_factory=default_batch_dir,
        description="Folder that keeps Batch API files, batch records and job results (one folder per "
        "namespace under it); every gateway and batch worker must see the same one. The store keeps "
        "only an index over it.",
    )
    model: str = Field("smollm2", description="Model name or folder given to engine.load_engine.")
    device: str = Field("auto", description="Engine device: auto, cpu or cuda.")
    threads: int | None = Field(None, ge=1, description="Torch intra-op threads per engine; None: torch default.")
    dtype: str | None = Field(
        None, description="Engine dtype: float32 (CPU default), bfloat16 (CUDA default), float16."
    )
    quant: str | None = Field(
        None,
        description="Weight-only quantization of the projections on CPU: fp16, int8, int4, "
        "none; None: a GGUF stored as Q4_0/Q4_1 runs as int4 on its own codes (one process "
        "per worker), anything else as none.",
    )
    tp: str = Field(
        "1",
        pattern=r"^[1-9][0-9]*(,[1-9][0-9]*)*$",
        description="Tensor-parallel degree of the worker's process group: one number for every "
        "pipeline stage, or one per stage (`2,1`: partial TP).",
    )
    pp: int = Field(1, ge=1, description="Pipeline stages of the worker's process group.")
    stage_layers: str | None = Field(
        None,
        pattern=r"^[0-9]+(,[0-9]+)*$",
        description="Layers of each pipeline stage (`20,10`); None: in proportion to each stage's TP degree.",
    )
    pp_microbatches: int = Field(
        1,
        ge=1,
        description="Decode micro-batches per step through the worker group's pipeline stages.",
    )
    master_addr: str | None = Field(
        None,
        description="Address of rank 0 of a worker group spanning hosts (as torchrun's); None: "
        "the group's processes are started on this host.",
    )
    master_port: int | None = Field(None, ge=1, le=65535, description="Port of rank 0 of a multi-host worker group.")
    rank: int = Field(0, ge=0, description="This process's rank in a multi-host worker group (0 drives it).")
    kv_cache_gb: float | None = Field(
        None,
        gt=0,
        description="KV-cache budget of one worker, GiB; None: half of the memory available at start "
        "(CPU; `exegpt up` shares it among its workers) or 90 % of the GPU memory free after loading.",
    )
    max_encode_batch: int = Field(
        64, ge=1, description="Upper bound on B_E, whatever the schedule says (memory guard)."
    )
    max_decode_batch: int = Field(256, ge=1, description="Upper bound on B_D, the requests one worker runs at once.")
    schedule: str | None = Field(
        None,
        description="The scheduler pins this schedule (JSON object of optimizer.schedule.Schedule "
        "fields, or a path to such a file); None: a continuous-batching schedule one worker can "
        "run, until a schedule is pinned.",
    )
    profile: str | None = Field(
        None,
        description="Layer profile(s) the scheduler plans on (`exegpt profile --out`; several "
        "comma-separated files merge); None: no re-planning, the schedule stays the pinned one.",
    )
    cluster: str | None = Field(
        None,
        description="Cluster description for planning: a preset name or `exegpt profile --cluster-out` "
        "file; None: the file beside the first profile (NAME-cluster.json), else h200-nvlink-ib.",
    )
    latency_bound_s: float = Field(
        float("inf"),
        gt=0,
        description="Latency bound the scheduler plans for: seconds to generate a 99th-percentile-"
        "length output (inf: none). The admin API changes it at run time.",
    )
    slo_ttft_s: float = Field(
        float("inf"),
        gt=0,
        description="TTFT bound the scheduler plans for: seconds from arrival to the first token, "
        "at slo_ttft_percentile (inf: none). `exegpt schedule set-slo` changes it at run time.",
    )
    slo_ttft_percentile: float = Field(0.99, ge=0.5, lt=1, description="Share of requests the TTFT bound is for.")
    slo_tpot_s: float = Field(
        float("inf"),
        gt=0,
        description="TPOT bound the scheduler plans for: seconds per output token after the first, at "
        "slo_tpot_percentile (inf: none). A request meets the SLO when every bound in force holds.",
    )
    slo_tpot_percentile: float = Field(0.99, ge=0.5, lt=1, description="Share of requests the TPOT bound is for.")
    plan_for: Literal["arrivals", "saturated"] = Field(
        "arrivals",
        description="What the scheduler optimises: `arrivals`, SLO attainment at the forecast arrival "
        "rate and burstiness (saturated throughput until arrivals are counted); `saturated`, the most "
        "throughput under the end-to-end bound for a saturated closed loop (batch or closed-loop traffic).",
    )
    calibrate: bool = Field(
        True,
        description="Correct the profile's step times with what the workers' steps take (the calibrated "
        "cost model); false: plan on the profile as measured.",
    )
    calibration_half_life_s: float = Field(
        60.0,
        gt=0,
        description="Half-life of the workers' step records in the scheduler's calibrated cost model.",
    )
    rate_change: float = Field(
        0.25,
        gt=0,
        description="A forecast arrival rate this fraction away from the one the plan in force was made "
        "for triggers a search (as drift does, at most every replan_interval_s).",
    )
    prior: str | None = Field(
        None,
        description="What the scheduler plans on before requests finish: a paper task (S, T, G, C1, "
        "C2, lengths times prior_scale) or a CSV of input,output / timestamp,input,output lengths.",
    )
    prior_scale: float = Field(1.0, gt=0, description="A task prior's lengths times this.")
    policies: str = Field(
        "any",
        description="Policies the scheduler may choose: rra, waa, all (ExeGPT's), any (those, "
        "static and continuous: the plan is never one the model rates below the baselines).",
    )
    max_plan_batch: int | None = Field(
        None, ge=1, description="Largest B_E / B_D a plan may use (e.g. what the profile measured)."
    )
    replan_margin: float = Field(
        0.05,
        ge=0,
        description="A new plan is published only if its predicted throughput beats the schedule in "
        "force, on the same statistics, by this fraction (or the one in force misses the bound).",
    )
    replan_interval_s: float = Field(
        5.0, ge=0, description="Least time between two searches triggered by drift (hysteresis)."
    )
    search_nice: int = Field(
        5,
        ge=0,
        le=19,
        description="Niceness of the scheduler's search thread (Linux): a search is background work that "
        "must not take the CPU serving needs where the scheduler shares cores with workers; 0: the "
        "scheduler's own priority.",
    )
    drift_alpha: float = Field(
        1e-4, gt=0, lt=1, description="Significance of the two-sample drift test (per check, both lengths)."
    )
    drift_min_samples: int = Field(
        20, ge=5, description="Finished requests the drift test needs in its window before it may fire."
    )
    stats_half_life_s: float = Field(60.0, gt=0, description="Half-life of the decaying length and arrival statistics.")
    lease_ttl_s: float = Field(
        5.0,
        gt=0,
        description="The active scheduler's lease; a standby takes over this long after it stops renewing.",
    )
    gather_s: float = Field(
        0.005,
        ge=0,
        description="An idle worker that receives a request waits while more follow within this "
        "gap (five gaps at most) and starts its batch with all of them; 0 starts at once.",
    )
    heartbeat_s: float = Field(2.0, gt=0, description="A worker's status report interval.")
    heartbeat_timeout_s: float = Field(
        6.0, gt=0, description="A worker silent this long is gone: its roles are given to others."
    )
    liveness_file: str | None = Field(
        None,
        description=(
            "A worker or scheduler touches this file while its event loop runs; the supervisor "
            "(`exegpt up` sets one per child) restarts a child whose file stops advancing."
        ),
    )
    liveness_timeout_s: float = Field(
        3.0,
        gt=0,
        description="`exegpt up` kills (then restarts) a child whose liveness file is this much older "
        "than now: a hung process (SIGSTOP, a wedged loop), whose work the broker then hands to others.",
    )
    topology_check_s: float = Field(
        1.0,
        gt=0,
        description="A gateway checks this often that the queues a request needs exist on the broker "
        "(declaring them again and re-publishing its pending requests when one was lost).",
    )
    switch_drain_s: float = Field(
        5.0,
        ge=0,
        description="A worker whose new role stops it decoding keeps decoding its running requests "
        "this long, then hands the rest to decoders or re-queues them.",
    )
    kv_ttl_s: float = Field(
        600.0,
        gt=0,
        description="Lifetime of a hand-off's KV payload and metadata in the store; with NIXL, "
        "the lease after which an encoder frees a staged KV cache nobody read.",
    )
    kv_transport: Literal["nixl", "redis"] = Field(
        "nixl",
        description="How KV caches move from encoders to decoders across processes: 'nixl' (decoders read "
        "the encoder's memory; the store holds descriptors only) or 'redis' (the payload goes through "
        "the store). A worker refuses to start with 'nixl' where NIXL cannot load. Embedded: in process.",
    )
    kv_staging_mb: int = Field(
        512, ge=1, description="NIXL: registered memory per worker for KV caches waiting to be read (MiB)."
    )
    kv_read_timeout_s: float = Field(
        30.0, gt=0, description="NIXL: a decoder gives up reading one KV cache after this long."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="Gateway gives up on a request (HTTP 504) after this long."
    )
    max_tokens_limit: int = Field(
        4096, ge=1, description="Largest max_tokens the gateway accepts (also bounded by the context)."
    )
    max_request_tokens: int = Field(
        16384,
        ge=1,
        description="Most tokens one HTTP request may ask to generate, all its choices together "
        "(n x max_tokens); past it a 400 (integer_above_max_value).",
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest request body the gateway reads (JSON routes; file uploads have their "
        "own limit); a larger one is a 413 before any of it is parsed.",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request body (JSON routes) not received whole this long after its headers is a 408."
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest request line and headers "
        "together the gateway reads; past it a 431 and the connection closes.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection whose request line and headers "
        "are not complete this long after it opened (or after its next "
        "request began) gets a 408 and is closed (at a moment drawn from "
        "up to 20 % later, so that connections opened together are not "
        "all closed together).",
    )
    max_connections: int = Field(
        2048,
        ge=0,
        description="Connections the gateway keeps open at once; one more is answered 503 and closed (0: no cap).",
    )
    max_connections_per_client: int = Field(
        256,
        ge=0,
        description=(
            "Connections one client address may keep open at once; one more is answered 429 and closed "
            "(0: no cap; behind a proxy every client shares its address)."
        ),
    )
    max_prompt_chars: int = Field(
        1_000_000,
        ge=1,
        description="Longest prompt in characters (chat: every "
        "message's text together); a longer one is a 400 before it is tokenized.",
    )
    drain_timeout_s: float = Field(30.0, gt=0, description="On SIGTERM, how long a worker may finish running requests.")
    host: str = Field("127.0.0.1", description="Gateway bind address.")
    port: int = Field(8000, ge=0, le=65535, description="Gateway port (0: pick a free one).")
    ops_host: str = Field(
        "127.0.0.1", description="Bind address of a worker's or scheduler's operations port (/metrics, /health/*)."
    )
    ops_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="A worker's or scheduler's operations port (0: a free one, logged at start). "
        "The gateway serves the same routes on its own port.",
    )
    worker_id: str | None = Field(None, description="Name of this process in events and metadata; None: role-host-pid.")
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated API keys with the user scope: every /v1/* request then needs "
        "`Authorization: Bearer <key>`. None (and no admin_keys or api_keys_file): the gateway runs "
        "open, on loopback only.",
    )
    admin_keys: SecretStr | None = Field(
        None,
        description="Comma-separated API keys with the admin scope: /admin/* (and /v1/*) accept them.",
    )
    api_keys_file: str | None = Field(
        None,
        description="File of keys, one per line: `<sha256 hex of the key> <owner> <user|admin>` "
        "(# starts a comment); `exegpt keys hash` prints a key's hash.",
    )
    insecure: bool = Field(
        False,
        description="Let a gateway without API keys listen on a non-loopback address (anyone who "
        "reaches it may generate, and change the schedule).",
    )
    tracing: bool = Field(
        False,
        description="Trace requests across services with OpenTelemetry (needs `pip install "
        "'exegpt[tracing]'`): W3C trace context rides in message headers; spans go to "
        "otlp_endpoint, else to stderr as JSON lines.",
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector that receives the spans (http://host:4318; needs "
        "opentelemetry-exporter-otlp-proto-http); None: spans are written to stderr.",
    )
    max_in_flight: int = Field(
        256,
        ge=0,
        description="Requests (each choice of `n` counts) one gateway runs at once; past it a new "
        "one is a 429 with Retry-After (0: no limit).",
    )
    max_queue_depth: int = Field(
        1024,
        ge=0,
        description="Encode-queue depth past which a gateway refuses new requests (429 with "
        "Retry-After); the depth is read from the broker at most twice a second (0: no limit).",
    )
    key_max_in_flight: int = Field(
        0,
        ge=0,
        description="With API keys: requests one key's owner may have in flight at one gateway "
        "(each choice counts; 429 past it; 0: no limit).",
    )
    key_tokens_per_minute: int = Field(
        0,
        ge=0,
        description="With API keys: tokens (prompt + max_tokens of each choice, counted at "
        "admission) one key's owner may submit to one gateway per minute (429 past it; 0: no limit).",
    )

    @field_validator("namespace")
    @classmethod
    def _namespace_is_a_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
            raise ValueError(f"namespace must be 1-64 of [A-Za-z0-9_.-], got {value!r}")
        return value

    @property
    def distributed(self) -> bool:
        """True when services talk through a real broker and store (one process per service)."""
        return self.amqp_url is not None and self.redis_url is not None

    queue_type: Literal["classic", "quorum"] = Field(
        "classic",
        description="RabbitMQ type of the durable queues (work, batch jobs, replies, dead letters): "
        "classic, or quorum (replicated across the broker's nodes, so they survive a node's loss; "
        "with the broker's own delivery limit, 4 x delivery_limit, behind the counted one). A "
        "queue cannot change type: drain and delete the old ones (`exegpt down`) before switching.",
    )
    delivery_limit: int = Field(
        3,
        ge=1,
        description="A work message is handed to consumers at most this many times (a consumer that "
        "fails with it, or dies holding it, uses one); then it goes to the dead queue and its request fails.",
    )
    dead_queue_max: int = Field(
        10_000,
        ge=1,
        description="Dead messages kept in `{namespace}.dead`; beyond, the oldest are dropped.",
    )
