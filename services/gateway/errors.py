"""The gateway's errors: ``ApiError`` and the handlers that answer every failure in the OpenAI error shape."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from services.front import openai_api as oa
from services.gateway.admission import Refused
from services.gateway.bodies import header


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def is_upload(app: FastAPI, scope: Scope) -> bool:
    """A multipart request to a route that declares a multipart body (it bounds the upload as
    it parses it). The routes are read from the API document (included routers are not listed
    flat in ``app.routes``), once."""
    if (header(scope, b"content-type") or b"").split(b";")[0].strip().lower() != b"multipart/form-data":
        return False
    uploads = getattr(app.state, "upload_paths", None)
    if uploads is None:
        from starlette.routing import compile_path

        uploads = app.state.upload_paths = tuple(
            compile_path(template)[0]
            for template, operations in app.openapi().get("paths", {}).items()
            if any(
                "multipart/form-data" in (op.get("requestBody") or {}).get("content", {})
                for op in operations.values()
                if isinstance(op, dict)
            )
        )
    path = scope.get("path", "")
    return any(regex.match(path) for regex in uploads)


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods the API document gives this request's path (several routes may share one path;
    the document is what clients and `Allow` must agree with)."""
    from starlette.routing import compile_path

    path = scope.get("path", "")
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|constrained-\S+|function-\S+|\w+\[.*\])$")


def param_of(loc: tuple[Any, ...]) -> str:
    """The field a validation error names, as ``messages.0.content``: the location without
    ``body`` and without the union branches pydantic adds (``prompt.constrained-str``)."""
    return ".".join(str(p) for p in loc[1:] if not (isinstance(p, str) and _UNION_TAG.match(p)))


def telling(errors: Sequence[dict[str, Any]], first: dict[str, Any]) -> dict[str, Any]:
    """Of the errors about ``first``'s field, one about the value rather than a union branch it
    is not of: for a list of stop strings with one too long, "String should have at most 256
    characters (stop.1)", not "Input should be a valid string (stop)"."""
    field = param_of(first.get("loc", ()))
    related = [e for e in errors if (p := param_of(e.get("loc", ()))) == field or p.startswith(f"{field}.")]
    return next((e for e in related if not str(e.get("type", "")).endswith("_type")), first)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        return JSONResponse(oa.error_body(str(exc), kind=kind, param=exc.param, code=exc.code), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return JSONResponse(oa.error_body(not_json_message(first, exc.body)), 400)
        unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
        if unknown:  # a field the gateway does not know is refused, never ignored
            param = param_of(unknown[0].get("loc", ()))
            return JSONResponse(
                oa.error_body(
                    f"Unsupported parameter: '{param}' is not supported by this server",
                    param=param,
                    code="unsupported_parameter",
                ),
                400,
            )
        first = telling(errors, first)
        named = param_of(first.get("loc", ())) or None
        return JSONResponse(oa.error_body(f"{first['msg']} ({named or 'body'})", param=named), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})  # its headers too
        if exc.status_code == 405:  # `Allow` names every method of the path, not one route's
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return JSONResponse(
            oa.error_body(str(exc.detail), code=str(exc.status_code)), exc.status_code, headers=headers or None
        )

    @app.exception_handler(Refused)
    async def _refused(_: Request, exc: Refused) -> JSONResponse:
        headers = None if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(oa.rate_limited(str(exc)), 429, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(oa.error_body(f"internal error: {type(exc).__name__}", kind="server_error"), 500)


def not_json_message(error: dict[str, Any], doc: Any) -> str:
    """The body did not parse: say so, where (line, column) and why, as ``json`` reports it."""
    pos = error.get("loc", ("body", 0))[-1]
    reason = error.get("ctx", {}).get("error", "invalid JSON")
    if isinstance(doc, (bytes, bytearray)):
        doc = doc.decode("utf-8", "replace")
    if isinstance(doc, str) and isinstance(pos, int):
        where = json.JSONDecodeError(reason, doc, pos)
        return f"The request body is not valid JSON: {reason} at line {where.lineno} column {where.colno} (char {pos})"
    return f"The request body is not valid JSON: {reason}"


def error_message(body: bytes) -> str:
    """The message of an OpenAI-shaped error body (else the body's start)."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


# --- request validation ---------------------------------------------------------------------
