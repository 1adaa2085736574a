"""The gateway: OpenAI-compatible REST in front of the mesh."""

from services.front.core import Gateway, Pending, RequestFailed, ServedModel
from services.gateway.app import create_app, load_served_model
from services.gateway.errors import ApiError

__all__ = ["ApiError", "Gateway", "Pending", "RequestFailed", "ServedModel", "create_app", "load_served_model"]
