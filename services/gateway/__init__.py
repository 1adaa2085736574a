"""The gateway: OpenAI-compatible REST in front of the mesh."""

from services.gateway.app import ApiError, ServedModel, create_app, load_served_model
from services.gateway.core import Gateway, Pending, RequestFailed

__all__ = ["ApiError", "Gateway", "Pending", "RequestFailed", "ServedModel", "create_app",
           "load_served_model"]
