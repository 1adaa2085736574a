"""One kind of worker, whose role the schedule gives it (``services.worker.worker``)."""

from services.worker.worker import Worker

__all__ = ["Worker"]
