"""One kind of worker, whose role the schedule gives it (``services.worker.worker``)."""

from services.worker.worker import Worker, new_worker_id

__all__ = ["Worker", "new_worker_id"]
