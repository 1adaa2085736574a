"""The gateway's OpenAPI document: the routes' schemas with the bounds the server enforces."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI

from common.config import MeshConfig
from services.front import openai_api as oa
from services.front.core import ServedModel


def openapi_document(app: FastAPI, served: ServedModel, config: MeshConfig) -> dict[str, Any]:
    """FastAPI's document, less the 422 it adds to every route with a body or parameters: the
    gateway answers invalid input with a 400 in the OpenAI error shape (declared per route).
    ``model`` names the one model served as its only valid value, ``max_tokens`` the largest it
    accepts (the limit, the context less one prompt token, the work one request may ask for), ``n``
    that work's cap, a prompt of token ids the vocabulary's range; a generation route's 200 is
    JSON, or an SSE stream with ``stream``."""
    max_tokens = max(1, min(config.max_tokens_limit, served.max_context - 1, config.max_request_tokens))
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        if "#/components/schemas/HTTPValidationError" not in json.dumps(schema.get("paths")):
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("CompletionBody", "ChatBody"):
            properties = components.get(name, {}).get("properties", {})
            if "model" in properties:
                properties["model"]["enum"] = [served.name]
            vocab = getattr(served.tokenizer, "vocab_size", None)
            for option in properties.get("prompt", {}).get("anyOf", []):
                if vocab and option.get("items", {}).get("type") == "integer":
                    option["items"].update(minimum=0, maximum=vocab - 1)
            for limited in ("max_tokens", "max_completion_tokens"):
                if limited in properties:
                    properties[limited]["anyOf"] = [
                        {"type": "integer", "minimum": 1, "maximum": max_tokens},
                        {"type": "null"},
                    ]
                    properties[limited]["description"] = (
                        f"at most {max_tokens}; prompt tokens + max_tokens within the context "
                        f"({served.max_context}, else 400 context_length_exceeded); n x max_tokens at most "
                        f"{config.max_request_tokens}"
                    )
            if "n" in properties:
                properties["n"]["description"] = (
                    f"choices to generate (each a request of its own); "
                    f"n x max_tokens at most {config.max_request_tokens}"
                )
                components[name].setdefault("allOf", []).extend(
                    request_tokens_schema(properties, max_tokens, config.max_request_tokens)
                )
        for path in ("/v1/completions", "/v1/chat/completions"):
            ok = schema.get("paths", {}).get(path, {}).get("post", {}).get("responses", {}).get("200")
            if ok is not None:
                ok.setdefault("content", {})["text/event-stream"] = {  # each event's data: a chunk object
                    "schema": {"description": "`data: {chunk}` events, then `data: [DONE]`"}
                }
        oa.neutral_schemas(components)
        _json_schema_bounds(components)
        app.openapi_schema = schema
    return app.openapi_schema


def request_tokens_schema(properties: dict[str, Any], max_tokens: int, cap: int) -> list[dict[str, Any]]:
    """``n`` x ``max_tokens`` <= ``cap`` in JSON Schema: for each ``n`` from which the cap bounds
    ``max_tokens`` below ``max_tokens``, an if/then lowering its maximum."""
    limited = [field for field in ("max_tokens", "max_completion_tokens") if field in properties]
    return [
        {
            "if": {"properties": {"n": {"type": "integer", "minimum": n}}, "required": ["n"]},
            "then": {
                "properties": {
                    field: {"anyOf": [{"type": "integer", "maximum": cap // n}, {"type": "null"}]} for field in limited
                }
            },
        }
        for n in range(2, oa.MAX_N + 1)
        if cap // n < max_tokens
    ]


_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _json_schema_bounds(node: Any) -> None:
    """Constraints pydantic leaves under its own names in a union branch (``ge``) under JSON
    Schema's (``minimum``)."""
    if isinstance(node, dict):
        for ours, theirs in _BOUNDS.items():
            if ours in node and isinstance(node[ours], (int, float)) and "type" in node:
                node[theirs] = node.pop(ours)
        for value in node.values():
            _json_schema_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _json_schema_bounds(value)
