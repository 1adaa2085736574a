"""Connections bounded before a request exists: uvicorn's HTTP protocol with the gateway's limits.

uvicorn closes a connection idle between requests (keep-alive) but not one that never finishes
its headers: a client sending them a byte at a time holds a descriptor for as long as it likes.
``bounded_protocol`` is uvicorn's httptools protocol with:

- **a header timeout**: a connection whose request line and headers are not complete within
  ``header_timeout_s`` of its opening (or of the first byte of its next request) gets a 408 and is
  closed, at a moment drawn from up to ``HEAD_SPREAD`` later: connections opened together (a
  slowloris starts its thousand at once) then time out spread over seconds, not in one burst of
  closes and reconnects that stalls the event loop;
- **a header size cap**: request line and headers past ``max_header_bytes`` are a 431, and the
  connection closes (nothing of them is kept past the cap's size; what the client still sends is
  read and dropped for ``LINGER_S``, so that it can read the answer);
- **connection caps**: a connection beyond ``max_connections`` open at once is answered 503, one
  beyond ``max_connections_per_client`` from one address 429, each with ``Retry-After`` and closed
  at once.

The body's own bounds (size, time) are ``services.gateway.bodies``'.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from common.config import MeshConfig
from services.front import openai_api as oa

REASONS = {
    408: b"Request Timeout",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}
RETRY_AFTER_S = 1
HEAD_SPREAD = 0.2  # a header timeout falls between header_timeout_s and (1 + HEAD_SPREAD) x it
LINGER_S = 2.0  # a refused client still sending: how long its bytes are read and dropped before closing


class HeadTooLarge(Exception):
    """Raised from the parser's callback to stop it after a 431."""


@dataclass
class ConnectionLimits:
    """The limits and what is open now (shared by every connection of one server)."""

    header_timeout_s: float
    max_header_bytes: int
    max_connections: int  # 0: no cap
    max_per_client: int  # 0: no cap
    open: Counter[str] = field(default_factory=Counter)  # per client address

    @property
    def total(self) -> int:
        return sum(self.open.values())

    def refusal(self, address: str) -> int | None:
        """The status a new connection from ``address`` is refused with, or None: it may open."""
        if self.max_connections and self.total >= self.max_connections:
            return 503
        if self.max_per_client and self.open[address] >= self.max_per_client:
            return 429
        return None


def connection_limits(config: MeshConfig) -> ConnectionLimits:
    return ConnectionLimits(
        config.header_timeout_s, config.max_header_bytes, config.max_connections, config.max_connections_per_client
    )


def raw_response(status: int, message: str, *, retry: bool = False) -> bytes:
    """An HTTP/1.1 answer written straight to the socket (no request reached the app)."""
    body = json.dumps(oa.error_body(message, code=str(status))).encode()
    headers = [
        b"HTTP/1.1 %d %s" % (status, REASONS[status]),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    if retry:
        headers.append(b"retry-after: %d" % RETRY_AFTER_S)
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


def bounded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's ``HttpToolsProtocol`` under ``limits`` (pass it as ``uvicorn.Config(http=...)``)."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        address = ""
        counted = False
        refused = False
        head: int | None = 0  # bytes read since the request began (None once its headers are complete)
        parsed = 0  # bytes of its request line and headers, as parsed
        timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.address = self.client[0] if self.client else ""
            if (status := limits.refusal(self.address)) is not None:
                self._refuse(
                    status,
                    "Too many connections: "
                    + (
                        f"{limits.max_connections} are open"
                        if status == 503
                        else f"{limits.max_per_client} are open from this address"
                    )
                    + "; retry later",
                    retry=True,
                )
                return
            limits.open[self.address] += 1
            self.counted = True
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            if self.counted:
                self.counted = False
                limits.open[self.address] -= 1
                if not limits.open[self.address]:
                    del limits.open[self.address]
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.refused or self.transport.is_closing():
                return  # refused: what comes is discarded
            if self.head is not None:
                self.head += len(data)
            super().data_received(data)
            if self.head is not None and self.head > limits.max_header_bytes and not self.transport.is_closing():
                self._refuse(431, self._head_too_large(), linger=True)

        def send_400_response(self, msg: str) -> None:
            if not (self.refused or self.transport.is_closing()):  # else it was refused, and said so
                super().send_400_response(msg)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.parsed = 0
            if self.head is None:  # the next request on a kept-alive connection
                self.head = 0
                self._await_head()

        def on_url(self, url: bytes) -> None:
            self.parsed += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.parsed += len(name) + len(value) + 4  # ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self.head = None
            self._stop_timer()
            if self.parsed > limits.max_header_bytes:  # they came in one read
                self._refuse(431, self._head_too_large(), linger=True)
                raise HeadTooLarge  # the parser stops here: no request is started
            super().on_headers_complete()

        @staticmethod
        def _head_too_large() -> str:
            return f"The request line and headers exceed {limits.max_header_bytes} bytes (max_header_bytes)"

        def _await_head(self) -> None:
            self._stop_timer()
            delay = limits.header_timeout_s * (1 + HEAD_SPREAD * random.random())
            self.timer = self.loop.call_later(delay, self._head_timed_out)

        def _stop_timer(self) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def _head_timed_out(self) -> None:
            self.timer = None
            if self.head is not None and not self.transport.is_closing():
                self._refuse(
                    408,
                    f"The request line and headers did not arrive within "
                    f"{limits.header_timeout_s:g} s (header_timeout_s)",
                )

        def _refuse(self, status: int, message: str, *, retry: bool = False, linger: bool = False) -> None:
            """Answer ``status`` and close. ``linger``: the client is still sending (a head too
            large): stop writing and discard what comes for ``LINGER_S`` first, so that closing
            with its bytes unread does not reset the connection before it read the answer."""
            self._stop_timer()
            self.refused = True
            self.transport.write(raw_response(status, message, retry=retry))
            if linger and self.transport.can_write_eof():
                self.transport.write_eof()
                self.timer = self.loop.call_later(LINGER_S, self.transport.close)
            else:
                self.transport.close()

    return BoundedHttpToolsProtocol
