"""The gateway: OpenAI-compatible REST in front of the mesh."""

from services.front.core import Gateway, Pending, RequestFailed, ServedModel
from services.gateway.app import ApiError, create_app, load_served_model

__all__ = ["ApiError", "Gateway", "Pending", "RequestFailed", "ServedModel", "create_app", "load_served_model"]
