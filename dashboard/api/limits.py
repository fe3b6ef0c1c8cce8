"""HTTP limits applied to every connection before any handler runs: the Host it names, body size, header
size, slow clients, dashboard page views per client.

Tornado reads a whole request body (up to 100 MB by default) before a handler sees it, and keeps a
connection that never finishes its request header forever. ``smartswitch serve`` therefore gives
its ``HTTPServer`` timeouts and a body cap (``server_kwargs``) and puts ``RequestGuard`` in front of
the application: a request whose ``Content-Length`` is over the limit gets a 413 and one whose
header is over 64 KB a 431 (both as JSON, like every API error), straight after its header arrives,
without reading the body, whatever the route and before any key is checked. A request naming a Host
this server does not answer to gets a 403 (see ``hosts``), and a client opening dashboard pages faster
than ``page_views_per_minute`` a 429 before any session is made for it. The connection is then
closed the way nginx does it ("lingering close"): the answer, then FIN, then whatever the client
still sends is read and dropped for a few seconds, so the client sees the answer instead of a reset.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from tornado import gen
from tornado.httpserver import HTTPServer
from tornado.httputil import (
    HTTPConnection,
    HTTPHeaders,
    HTTPMessageDelegate,
    HTTPServerConnectionDelegate,
    RequestStartLine,
    ResponseStartLine,
)
from tornado.iostream import IOStream, StreamClosedError

from dashboard.api.hosts import HostPolicy
from dashboard.api.ratelimit import RateLimiter

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024  # over this: 431
# Tornado stops reading (and closes, with no answer) past this; between the two a 431 is answered.
HEADER_READ_LIMIT = 2 * MAX_HEADER_BYTES
CLIENT_TIMEOUT_S = 30.0  # request header, request body, idle keep-alive: each must come within this
PAGE_VIEWS_PER_MINUTE = 60
PAGE_PATHS = frozenset({"/", "/index.html"})
LINGER_S = 2.0  # after a refusal: how long what the client still sends is read and dropped
DISCARD_CHUNK = 64 * 1024


@dataclass(frozen=True)
class HttpLimits:
    """What one server accepts from a client."""

    max_body_bytes: int
    client_timeout_s: float = CLIENT_TIMEOUT_S
    max_header_bytes: int = MAX_HEADER_BYTES
    hosts: HostPolicy | None = None  # None: any Host (in-process servers of tests and notebooks)
    # Each dashboard page view makes a session: a client opening more than this many a minute gets a 429.
    page_views_per_minute: int = PAGE_VIEWS_PER_MINUTE

    def server_kwargs(self) -> dict[str, Any]:
        """Arguments for Tornado's ``HTTPServer`` (``pn.serve(http_server_kwargs=...)``)."""
        return {
            # Also the time allowed for a request's header to arrive (Tornado's header timeout).
            "idle_connection_timeout": self.client_timeout_s,
            "body_timeout": self.client_timeout_s,
            "max_header_size": max(HEADER_READ_LIMIT, 2 * self.max_header_bytes),
            # A body without Content-Length (chunked) is cut off here; one with it never gets this far.
            "max_body_size": self.max_body_bytes,
        }


def header_bytes(start_line: RequestStartLine, headers: HTTPHeaders) -> int:
    """The size of a request's header as sent (request line, each field and its line break)."""
    size = len(start_line.method) + len(start_line.path) + len(start_line.version) + 4
    return size + sum(len(name) + len(value) + 4 for name, value in headers.get_all()) + 2


def refusal(start_line: RequestStartLine, headers: HTTPHeaders, limits: HttpLimits) -> tuple[int, str, dict] | None:
    """(status, reason, JSON body) for a request refused on its header alone, else None."""
    host = headers.get("Host")
    if limits.hosts is not None and not limits.hosts.allows(host):
        return 403, "Forbidden", {
            "error": "host_not_allowed",
            "message": f"This server does not answer to the name {host!r}. If that name is really this machine, "
                       "start the server with --allow-host NAME."}
    if header_bytes(start_line, headers) > limits.max_header_bytes:
        return 431, "Request Header Fields Too Large", {
            "error": "headers_too_large",
            "message": f"Request header over {limits.max_header_bytes} bytes.",
            "max_header_bytes": limits.max_header_bytes}
    length = headers.get("Content-Length", "")
    if length.isascii() and length.isdigit() and (len(length) > 19 or int(length) > limits.max_body_bytes):
        return 413, "Content Too Large", {
            "error": "body_too_large", "message": f"Request body over {limits.max_body_bytes} bytes.",
            "max_body_bytes": limits.max_body_bytes}
    return None


class _Guarded(HTTPMessageDelegate):
    """One request: passed on to the application, or refused after its header."""

    def __init__(self, inner: HTTPMessageDelegate, connection: HTTPConnection, limits: HttpLimits,
                 page_views: RateLimiter) -> None:
        self.inner = inner
        self.connection = connection
        self.limits = limits
        self.page_views = page_views
        self.refused = False

    def _page_view_refusal(self, start_line: RequestStartLine) -> tuple[int, str, dict] | None:
        if start_line.method != "GET" or start_line.path.split("?", 1)[0] not in PAGE_PATHS:
            return None
        client = getattr(getattr(self.connection, "context", None), "remote_ip", None) or "unknown"
        wait = self.page_views.check(client)
        if wait is None:
            return None
        return 429, "Too Many Requests", {
            "error": "too_many_page_views",
            "message": f"More than {self.limits.page_views_per_minute} dashboard page views a minute from "
                       f"{client}. Retry in {wait} s.", "retry_after_seconds": wait}

    def headers_received(self, start_line: RequestStartLine | ResponseStartLine,
                         headers: HTTPHeaders) -> Awaitable[None] | None:
        assert isinstance(start_line, RequestStartLine)
        refused = refusal(start_line, headers, self.limits) or self._page_view_refusal(start_line)
        detach = getattr(self.connection, "detach", None)
        if refused is None or detach is None:
            return self.inner.headers_received(start_line, headers)
        self.refused = True
        status, reason, body = refused
        log.info("refused %s %s: %s", start_line.method, start_line.path[:80], body["message"])
        # Detached, the connection stops all HTTP processing: the body is never read into a request.
        return _answer_and_close(detach(), status, reason, body)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return None if self.refused else self.inner.data_received(chunk)

    def finish(self) -> None:
        if not self.refused:
            self.inner.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.inner.on_connection_close()


async def _answer_and_close(stream: IOStream, status: int, reason: str, body: dict) -> None:
    data = json.dumps(body).encode()
    retry = f"Retry-After: {body['retry_after_seconds']}\r\n" if "retry_after_seconds" in body else ""
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{retry}"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    try:
        await stream.write(head + data)
        if stream.socket is not None:
            stream.socket.shutdown(socket.SHUT_WR)  # the answer is complete: FIN now, close later
        deadline = stream.io_loop.time() + LINGER_S
        while True:  # read and drop: memory stays flat whatever the client declared
            await gen.with_timeout(deadline, stream.read_bytes(DISCARD_CHUNK, partial=True))
    except (StreamClosedError, TimeoutError, OSError):
        pass
    finally:
        stream.close()


class RequestGuard(HTTPServerConnectionDelegate):
    """Wraps an application (a Tornado ``HTTPServer``'s request callback) with ``HttpLimits``."""

    def __init__(self, inner: HTTPServerConnectionDelegate, limits: HttpLimits) -> None:
        self.inner = inner
        self.limits = limits
        self.page_views = RateLimiter(limits.page_views_per_minute)

    def start_request(self, server_conn: object, request_conn: HTTPConnection) -> HTTPMessageDelegate:
        return _Guarded(self.inner.start_request(server_conn, request_conn), request_conn, self.limits,
                        self.page_views)


def guard_server(server: Any, limits: HttpLimits) -> None:
    """Put ``RequestGuard`` in front of a Bokeh/Panel server's application (before it starts serving)."""
    http = getattr(server, "_http", None)  # Bokeh's Server keeps its Tornado HTTPServer here
    if not isinstance(http, HTTPServer) or not isinstance(http.request_callback, HTTPServerConnectionDelegate):
        raise RuntimeError("cannot apply HTTP limits: the server has no Tornado HTTPServer in front of an "
                           "application (Bokeh's Server changed?)")
    http.request_callback = RequestGuard(http.request_callback, limits)
