"""The batch queue's names, derived from the mesh namespace like every other name.

Extends ``common.names.Names`` rather than editing it; the AMQP names use ``{ns}.``, store keys
``{ns}:`` as there.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.names import Names

# --- TTLs (seconds) of store keys --------------------------------------------------------------
RESULT_TTL_S = 7 * 24 * 3600.0  # a job's result, its reply marker, a batch's records and files
BATCHES_MAX = 1000  # batch ids kept in the listing (newest first)


@dataclass(frozen=True)
class BatchNames(Names):
    # --- AMQP queues ------------------------------------------------------------------------
    @property
    def jobs_queue(self) -> str:
        """Durable; BatchJob from producers (CLI, Batch API), consumed by job consumers."""
        return f"{self.namespace}.jobs"

    def reply_queue(self, owner: str) -> str:
        """Durable; JobResult for one producer or batch (``reply_to`` names it). Deleted by its owner."""
        return f"{self.namespace}.jobs.replies.{owner}"

    # --- store keys -------------------------------------------------------------------------
    def job_result(self, job_id: str) -> str:
        """Encoded JobResult, set-if-absent (the first result wins). TTL RESULT_TTL_S."""
        return f"{self.namespace}:job:{job_id}"

    def job_replied(self, job_id: str) -> str:
        """Set after the result was published to reply_to (so redelivery does not resend). TTL RESULT_TTL_S."""
        return f"{self.namespace}:jobreplied:{job_id}"

    def job_batch(self, batch_id: str) -> str:
        """Hash: count, model, created_at, reply_to, cancelled ("1" once cancelled). TTL RESULT_TTL_S."""
        return f"{self.namespace}:jobbatch:{batch_id}"

    def file_content(self, file_id: str) -> str:
        """Bytes of an uploaded or generated Batch API file. TTL RESULT_TTL_S."""
        return f"{self.namespace}:file:{file_id}"

    def file_meta(self, file_id: str) -> str:
        """Hash: filename, purpose, bytes, created_at. TTL RESULT_TTL_S."""
        return f"{self.namespace}:filemeta:{file_id}"

    def openai_batch(self, batch_id: str) -> str:
        """Hash: the Batch API object's fixed fields (input file, endpoint, counts of lines). TTL RESULT_TTL_S."""
        return f"{self.namespace}:openaibatch:{batch_id}"

    @property
    def openai_batches(self) -> str:
        """List of Batch API batch ids, newest first, capped at BATCHES_MAX. No TTL."""
        return f"{self.namespace}:openaibatches"
