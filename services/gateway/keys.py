"""API keys and their scopes: who may call ``/v1/*`` (scope "user") and ``/admin/*`` ("admin").

Keys come from the config: ``api_keys`` (comma-separated, scope user), ``admin_keys``
(comma-separated, scope admin) and ``api_keys_file`` (one key a line, as
``<sha256 hex of the key> <owner> <user|admin>``; ``#`` starts a comment). Only hashes are kept;
a presented key is hashed and compared with every known hash in constant time. An admin key also
reaches ``/v1/*``. ``/health``, ``/metrics`` and every other path stay open.

With no key configured the gateway runs open, and then only on a loopback address
(``check_exposure``) unless the config says ``insecure``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from common.config import MeshConfig
from services.front import openai_api as oa

Scope = Literal["user", "admin"]
SCOPES: tuple[Scope, ...] = ("user", "admin")
PROTECTED: tuple[tuple[str, Scope], ...] = (("/v1", "user"), ("/admin", "admin"))


def hash_key(key: str) -> str:
    """What a keys file holds for ``key``: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    digest: bytes  # SHA-256 of the key
    owner: str
    scope: Scope


@dataclass(frozen=True)
class KeyRing:
    entries: tuple[KeyEntry, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.entries)

    def find(self, key: str) -> KeyEntry | None:
        """The entry of ``key``; every entry is compared (constant time, no early exit)."""
        digest, found = hashlib.sha256(key.encode()).digest(), None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found


def parse_keys_file(text: str, source: str = "keys file") -> list[KeyEntry]:
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"{source}:{number}: expected `<sha256 hex> <owner> <scope>`, got {len(fields)} fields")
        digest, owner, scope = fields
        try:
            raw_digest = bytes.fromhex(digest)
        except ValueError:
            raw_digest = b""
        if len(raw_digest) != 32:
            raise ValueError(f"{source}:{number}: {digest[:12]!r}... is not a SHA-256 hex digest")
        if scope not in SCOPES:
            raise ValueError(f"{source}:{number}: scope must be one of {SCOPES}, got {scope!r}")
        entries.append(KeyEntry(raw_digest, owner, scope))
    return entries


def load_keys(config: MeshConfig) -> KeyRing:
    """The keys ``config`` names (reads ``api_keys_file``); an empty ring: the gateway runs open."""
    entries: list[KeyEntry] = []
    for secret, scope in ((config.api_keys, "user"), (config.admin_keys, "admin")):
        keys = [k.strip() for k in secret.get_secret_value().split(",")] if secret else []
        entries += [
            KeyEntry(hashlib.sha256(k.encode()).digest(), f"{scope}-key-{i}", scope)  # type: ignore[arg-type]
            for i, k in enumerate(filter(None, keys), 1)
        ]
    if config.api_keys_file:
        path = Path(config.api_keys_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"api_keys_file: cannot read {path}: {exc.strerror or exc}") from None
        entries += parse_keys_file(text, str(path))
    return KeyRing(tuple(entries))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config: MeshConfig, keys: KeyRing) -> None:
    """Refuse (ValueError) to serve without keys on a non-loopback address, unless ``insecure``."""
    if not keys and not config.insecure and not is_loopback(config.host):
        raise ValueError(
            f"refusing to listen on {config.host} without API keys: set EXEGPT_API_KEYS, "
            "EXEGPT_ADMIN_KEYS or EXEGPT_API_KEYS_FILE, or pass --insecure"
        )


def required_scope(path: str) -> Scope | None:
    for prefix, scope in PROTECTED:
        if path == prefix or path.startswith(prefix + "/"):
            return scope
    return None


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if kind.lower() == "bearer" and token.strip() else None
    return None


class RequireKeys:
    """ASGI middleware: a protected path needs a key of its scope (401 without a known key, 403
    with a user key on ``/admin``). The key's owner and scope go to ``request.state.api_key``."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        needed = required_scope(scope["path"]) if scope["type"] == "http" else None
        if needed is None or not self.keys:
            return await self.app(scope, receive, send)
        token = bearer(scope.get("headers", []))
        entry = self.keys.find(token) if token is not None else None
        if entry is None:
            message = (
                "Missing API key: send `Authorization: Bearer <key>`" if token is None else "Incorrect API key provided"
            )
            return await denied(401, message, "invalid_api_key")(scope, receive, send)
        if needed == "admin" and entry.scope != "admin":
            return await denied(
                403, f"the key of {entry.owner} has the user scope; /admin needs an admin key", "insufficient_scope"
            )(scope, receive, send)
        scope.setdefault("state", {})["api_key"] = entry
        await self.app(scope, receive, send)


def denied(status: int, message: str, code: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(oa.error_body(message, code=code), status, headers=headers)
