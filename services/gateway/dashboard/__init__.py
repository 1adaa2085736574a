"""The operator's page on the gateway (``/dashboard``): the mesh and its scheduler's reasoning,
live in a browser. Its files ship in ``static/``; docs/dashboard.md describes it."""

from services.gateway.dashboard.routes import Dashboard, dashboard_router

__all__ = ["Dashboard", "dashboard_router"]
