"""The HTTP API as Tornado handlers, served beside the dashboard.

``make_routes(context)`` gives the handlers of one orchestrator (``smartswitch serve`` passes them to
``pn.serve`` as ``extra_patterns``); ``ROUTES`` is the same table for ``panel serve --plugins
dashboard.api.routes``, bound to the process's orchestrator made from the environment on first use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import httpx
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, RequestHandler, stream_request_body

from dashboard.api.auth import KeyRing, Unauthorized, make_keyring
from dashboard.api.ratelimit import RateLimiter
from dashboard.errors import EngineFailed, SmartswitchError, UnknownModel
from dashboard.events import DroppedEvent, Event, is_terminal, to_dict, to_sse
from dashboard.orchestrator.core import OrchestratorPort, Subscription
from dashboard.orchestrator.traffic import Lease, RequestCut

log = logging.getLogger(__name__)
KEEPALIVE_S = 15.0
NOTICE_S = 4.0  # a chat waiting for its model, or a quiet switch stream, hears from us at least this often
FIRST_NOTICE_S = 1.0  # a streaming chat that has waited this long for its model gets its 200 and a first note
PROXY_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=5.0)
NON_STREAM_READ_S = 600.0  # a whole reply comes in one piece: the engine's health, not a read gap, bounds it
EVENT_BUFFER = 256  # events a /v1/events subscriber may fall behind before it is dropped
DROP_GRACE_S = 5.0  # a dropped subscriber gets this long to take its last notice


class BadRequest(SmartswitchError):
    code = "bad_request"
    http_status = 400


class TooLarge(SmartswitchError):
    code = "body_too_large"
    http_status = 413


class NotFound(SmartswitchError):
    code = "not_found"
    http_status = 404


DIGITS = re.compile(r"[0-9]{1,19}")  # a Content-Length Python can read without a 4300-digit int()


@dataclass
class ApiContext:
    """What every handler shares: the orchestrator, the keys, the switch rate limiter."""

    port: OrchestratorPort
    keys: KeyRing
    limiter: RateLimiter
    max_body_bytes: int
    keepalive_s: float = KEEPALIVE_S
    notice_s: float = NOTICE_S
    proxy: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=PROXY_TIMEOUT))


def make_api_context(port: OrchestratorPort) -> ApiContext:
    """The handlers' shared context for ``port``; makes (and logs the path of) the API key if none is set."""
    settings = port.config.server
    # The orchestrator's limiter: switches, loads and queue-started switches count against the same actor.
    return ApiContext(port, make_keyring(port.data_dir), port.core.limiter, settings.max_body_bytes)


ContextSource = Callable[[], ApiContext]


@stream_request_body  # prepare() sees the headers before any of the body is read: a large one is never read
class ApiHandler(RequestHandler):
    """JSON in and out, bearer-key auth, body size limit, errors as ``{"error", "message"}``."""

    public = False

    def initialize(self, context: ContextSource) -> None:
        self._context = context

    def prepare(self) -> None:
        self.ctx = self._context()
        self.key_id = "anonymous"
        # First, before the key: a body too large is refused on its declared length, unread.
        length = self.request.headers.get("Content-Length", "")
        if length and not DIGITS.fullmatch(length):
            raise BadRequest(f"Content-Length must be a whole number of bytes, got {length[:40]!r}.")
        if length and int(length) > self.ctx.max_body_bytes:
            raise self._too_large()
        if not self.public:
            self.key_id = self.ctx.keys.authenticate(self.request.headers.get("Authorization"))

    def data_received(self, chunk: bytes) -> None:
        """Collect the body into ``request.body``; one without a length (chunked) is cut off at the limit."""
        if self._finished:
            return
        if len(self.request.body) + len(chunk) > self.ctx.max_body_bytes:
            error = self._too_large()
            self.send_error(error.http_status, exc_info=(type(error), error, None))
            return
        self.request.body += chunk

    def _too_large(self) -> TooLarge:
        return TooLarge(f"Request body over {self.ctx.max_body_bytes} bytes.", max_body_bytes=self.ctx.max_body_bytes)

    @property
    def actor(self) -> str:
        return f"api:{self.key_id}"

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except RecursionError:  # e.g. 100 000 '[': deeper than the parser goes
            raise BadRequest("Malformed JSON body: nested too deeply.") from None
        except ValueError as exc:  # bad JSON, bad UTF-8, an integer of thousands of digits
            raise BadRequest(f"Malformed JSON body: {str(exc)[:200]}") from None
        if not isinstance(body, dict):
            raise BadRequest("The JSON body must be an object.")
        return body

    def model_arg(self, value: Any, name: str = "target_model") -> str:
        if value is None or value == "":
            raise BadRequest(f"'{name}' is required: the id of a catalog model.",
                             available_models=self.ctx.port.model_ids)
        if not isinstance(value, str):
            # Named by type only: the value may be anything (a number of thousands of digits, a list).
            raise BadRequest(f"'{name}' must be a string (the id of a catalog model), got {_json_type(value)}.",
                             available_models=self.ctx.port.model_ids)
        if value not in self.ctx.port.config.models:
            raise UnknownModel(value, self.ctx.port.model_ids)
        return value

    def bool_arg(self, body: dict[str, Any], name: str, default: bool) -> bool:
        value = body.get(name, default)
        if not isinstance(value, bool):
            raise BadRequest(f"'{name}' must be true or false, got {_json_type(value)}.")
        return value

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, SmartswitchError):  # those are answers, not server faults
            super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, SmartswitchError):
            if "retry_after_seconds" in error.details:  # 429 rate limited, 503 queue timeout
                self.set_header("Retry-After", str(error.details["retry_after_seconds"]))
            if isinstance(error, Unauthorized):  # RFC 9110: a 401 names the scheme that would work
                self.set_header("WWW-Authenticate", 'Bearer realm="smartswitch"')
            self.send_json(self.error_body(error.http_status, error.code, error.message, error.details),
                           error.http_status)
            return
        message = self._reason
        if status_code == 405:  # RFC 9110: a 405 lists the methods the resource does support
            allowed = self.allowed_methods()
            self.set_header("Allow", ", ".join(allowed))
            message = f"{self.request.method} is not supported here; use {' or '.join(allowed)}."
        elif isinstance(error, HTTPError) and error.log_message and status_code < 500:
            message = error.log_message % error.args if error.args else error.log_message
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(status_code, "internal_error")
        self.send_json(self.error_body(status_code, code, message, {}), status_code)

    def error_body(self, status: int, code: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
        """This API's error shape (the OpenAI-compatible routes answer in OpenAI's)."""
        return {"error": code, "message": message, **details}

    @classmethod
    def allowed_methods(cls) -> list[str]:
        """The methods this handler implements (what ``Allow`` says)."""
        return [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
                if getattr(cls, m.lower()) is not getattr(RequestHandler, m.lower())]


class SseHandler(ApiHandler):
    """Server-Sent Events; a client that goes away stops the stream, never the work behind it."""

    def start_sse(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self.closed = False

    def on_connection_close(self) -> None:
        self.closed = True

    async def send_event(self, event: Event) -> bool:
        return await self.send_raw(to_sse(event))

    async def send_raw(self, text: str) -> bool:
        if self.closed:
            return False
        try:
            self.write(text)
            await self.flush()
            return True
        except StreamClosedError:
            self.closed = True
            return False


class HealthHandler(ApiHandler):
    public = True

    def get(self) -> None:
        self.send_json({"status": "ok"})


class OpenApiHandler(ApiHandler):
    def get(self) -> None:
        self.send_json(openapi_document())


class StatusHandler(ApiHandler):
    def get(self) -> None:
        self.send_json(self.ctx.port.status())


class PlanHandler(ApiHandler):
    async def get(self) -> None:
        target = self.model_arg(self.get_query_argument("target_model", None))
        self.send_json(await asyncio.to_thread(self.ctx.port.plan, target))


class SwitchHandler(SseHandler):
    async def post(self) -> None:
        body = self.json_body()
        target = self.model_arg(body.get("target_model"))
        wait, stream = self.bool_arg(body, "wait", True), self.bool_arg(body, "stream", True)
        if not wait:
            switch_id = await self.ctx.port.aswitch(target, self.actor)
            self.send_json({"switch_id": switch_id, "target_model": target}, 202)
            return
        events = self.ctx.port.switch_events(target, self.actor)
        # The first event means the switch started: a refusal (409, 429) is answered before any byte is sent.
        event = await anext(events)
        if not stream:
            while not is_terminal(event):
                event = await anext(events)
            await events.aclose()
            self.send_json({"event": event.kind, **to_dict(event)})
            return
        self.start_sse()
        await self.send_event(event)
        pending: asyncio.Future[Any] | None = None
        try:
            while not is_terminal(event):
                pending = pending or asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({pending}, timeout=self.ctx.notice_s)
                if not done:  # a quiet stretch (an engine stopping, a silent load phase): keep proxies from timing out
                    await self.send_raw(": keep-alive\n\n")
                    continue
                event, pending = pending.result(), None
                # Keep consuming after a disconnect: the switch goes on and others may watch it.
                await self.send_event(event)
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            await events.aclose()
        if not self.closed:
            self.finish()


class CancelHandler(ApiHandler):
    async def post(self) -> None:
        cancelled = await self.ctx.port.acancel(self.actor)
        self.send_json({"cancelled": cancelled})


class ModelActionHandler(ApiHandler):
    async def post(self, model_id: str, action: str) -> None:
        model_id = self.model_arg(model_id, "model")
        if action in ("pin", "unpin"):
            await asyncio.to_thread(self.ctx.port.set_pinned, model_id, action == "pin", self.actor)
        else:
            await self.ctx.port.acall(action, model_id, self.actor)
        self.send_json({"model": model_id, "action": action,
                        "status": self.ctx.port.status()["models"][model_id]["status"]})


class EventsHandler(SseHandler):
    """Every state change as SSE. A client that falls ``EVENT_BUFFER`` events behind is dropped with a last
    ``dropped`` event; one that goes away takes its subscription with it at once."""

    sub: Subscription | None = None

    def on_connection_close(self) -> None:
        super().on_connection_close()
        if self.sub is not None:
            self.sub.close()  # wakes the loop below now, not at the next keep-alive

    async def get(self) -> None:
        self.start_sse()
        self.sub = sub = await self.ctx.port.subscription(EVENT_BUFFER)
        try:
            while not self.closed:
                event = await sub.get(self.ctx.keepalive_s)
                if sub.dropped:
                    await self._drop()
                    break
                if sub.closed or not await self._send(": keep-alive\n\n" if event is None else to_sse(event)):
                    break
        finally:
            sub.close()

    async def _send(self, text: str) -> bool:
        """Write and wait until the client has taken it, or until this subscriber is dropped meanwhile."""
        assert self.sub is not None
        try:
            self.write(text)
            flushed = self.flush()
        except StreamClosedError:
            self.closed = True
            return False
        dropped = self.sub.when_dropped()
        await asyncio.wait({flushed, dropped}, return_when=asyncio.FIRST_COMPLETED)
        if not flushed.done():
            flushed.add_done_callback(_quiet)
            await self._drop()
            return False
        if flushed.exception() is not None:
            self.closed = True
            return False
        return True

    async def _drop(self) -> None:
        """A last ``dropped`` event; a client that does not take it within ``DROP_GRACE_S`` is disconnected."""
        log.info("events: subscriber %s dropped: more than %d events behind", self.request.remote_ip, EVENT_BUFFER)
        notice = DroppedEvent(f"This subscriber fell more than {EVENT_BUFFER} events behind and was dropped; "
                              "reconnect to resume (the first event is the full status).")
        try:
            self.write(to_sse(notice))
            flushed = self.flush()
        except StreamClosedError:
            self.closed = True
            return
        flushed.add_done_callback(_quiet)
        await asyncio.wait({flushed}, timeout=DROP_GRACE_S)
        if not flushed.done():
            self.request.connection.close()  # type: ignore[union-attr]
        self.closed = True


class AuditHandler(ApiHandler):
    def get(self) -> None:
        raw = self.get_query_argument("limit", "200")
        # ASCII digits only, and few: str.isdigit() takes "²" and int() refuses 5000 digits, both 500s once.
        if not re.fullmatch(r"[0-9]{1,4}", raw) or not 1 <= int(raw) <= 5000:
            raise BadRequest(f"'limit' must be a whole number from 1 to 5000, got {raw[:40]!r}.")
        self.send_json({"entries": self.ctx.port.audit_log(int(raw))})


class UnknownRouteHandler(ApiHandler):
    """Any other /v1 path: a JSON 404 (after auth, so the API's shape is not probed for free)."""

    def prepare(self) -> None:
        super().prepare()
        raise NotFound(f"No route {self.request.method} {self.request.path}; see /v1/openapi.json.")


class OpenAIHandler(ApiHandler):
    """The OpenAI-compatible routes: errors in OpenAI's shape, so its clients show the message."""

    def error_body(self, status: int, code: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
        return openai_error(status, code, message, details)


class OpenAIModelsHandler(OpenAIHandler):
    def get(self) -> None:
        status = self.ctx.port.status()["models"]
        self.send_json({"object": "list", "data": [
            {"id": mid, "object": "model", "owned_by": "smartswitch", "name": m["name"], "status": m["status"]}
            for mid, m in status.items()]})


class ChatHandler(OpenAIHandler):
    """OpenAI chat completions through the gate: counted on its model (queued with ``switch_on_request``),
    relayed from its engine, and ended with an explicit error whenever something cuts it short."""

    def prepare(self) -> None:
        self.gone = asyncio.Event()
        self.closed = False
        self.streaming = False  # the 200 and SSE headers are out: errors from here on are error chunks
        self.tail = b""  # the last bytes sent: was [DONE] sent, does an error chunk need a blank line first
        super().prepare()

    def on_connection_close(self) -> None:
        self.closed = True
        if hasattr(self, "gone"):  # none yet when refused before prepare() (405 for an unknown method)
            self.gone.set()

    async def post(self) -> None:
        raw = self.request.body
        body = self.json_body()
        model_id = self.model_arg(body.get("model"), "model")
        stream = body.get("stream") is True
        lease = await self._admitted(model_id, stream)
        if lease is None:
            return  # the client went away while waiting, or the wait ended with an error chunk
        try:
            await self._relay(lease, raw, stream)
        finally:
            lease.release()

    async def _admitted(self, model_id: str, stream: bool) -> Lease | None:
        """The lease, once the model serves; a waiting stream gets its 200 and a note every few seconds."""
        port = self.ctx.port
        queue = port.config.server.switch_on_request
        admitting = asyncio.ensure_future(port.acquire(model_id, self.actor, queue=queue))
        gone = asyncio.ensure_future(self.gone.wait())
        started, timeout = time.monotonic(), FIRST_NOTICE_S
        lease: Lease | None = None
        try:
            while True:
                await asyncio.wait({admitting, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if admitting.done():
                    lease = admitting.result()
                    return lease
                if gone.done():
                    return None
                if stream:
                    self.begin_stream()
                    note = waiting_note(port.status(), model_id, time.monotonic() - started)
                    if not await self.send_chunk(f": {note}\n\n".encode()):
                        return None
                timeout = self.ctx.notice_s
        except SmartswitchError as exc:
            await self.fail(exc)
            return None
        finally:
            gone.cancel()
            if lease is None:  # nobody will relay it: nothing may stay counted or queued
                if not admitting.done():
                    admitting.cancel()
                    await asyncio.gather(admitting, return_exceptions=True)
                elif not admitting.cancelled() and admitting.exception() is None:
                    admitting.result().release()

    async def _relay(self, lease: Lease, raw: bytes, stream: bool) -> None:
        name, stall = lease.model, self.ctx.port.config.switching.stall_timeout_s
        # Streaming, a gap of stall_timeout_s between chunks is a stalled engine.
        timeout = httpx.Timeout(connect=5.0, read=stall if stream else NON_STREAM_READ_S, write=60.0, pool=5.0)
        request = self.ctx.proxy.build_request("POST", f"{lease.endpoint}/v1/chat/completions", content=raw,
                                               headers={"Content-Type": "application/json", **lease.headers},
                                               timeout=timeout)
        try:
            response = await lease.guard(self.ctx.proxy.send(request, stream=True))
        except (httpx.HTTPError, RequestCut) as exc:
            await self.fail(engine_trouble(exc, name, stall, started=False))
            return
        try:
            if not stream or response.status_code != 200:
                data = await lease.guard(response.aread())
                if self.streaming:  # our 200 went out while it waited: the engine's answer becomes the error
                    await self.fail(EngineFailed(f"{name} refused the request: {engine_message(data)}",
                                                 engine_status=response.status_code))
                    return
                self.set_status(response.status_code)
                self.set_header("Content-Type", response.headers.get("content-type", "application/json"))
                self.finish(data)
                return
            self.begin_stream()
            chunks = response.aiter_raw()
            while True:
                try:
                    chunk = await lease.guard(anext(chunks))
                except StopAsyncIteration:
                    break
                if not await self.send_chunk(chunk):
                    return  # the client went away; closing the response below tells the engine
            if b"data: [DONE]" not in self.tail:
                await self.fail(EngineFailed(f"The engine of {name} ended the reply before it was finished."))
                return
            self.finish()
        except (httpx.HTTPError, RequestCut) as exc:
            await self.fail(engine_trouble(exc, name, stall, started=True))
        finally:
            await response.aclose()

    def begin_stream(self) -> None:
        if self.streaming:
            return
        self.streaming = True
        self.set_status(200)
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")

    async def send_chunk(self, data: bytes) -> bool:
        if self.closed:
            return False
        try:
            self.write(data)
            await self.flush()  # through, chunk by chunk, without buffering
        except StreamClosedError:
            self.closed = True
            return False
        self.tail = (self.tail + data)[-64:]
        return True

    async def fail(self, error: SmartswitchError) -> None:
        """An error body before the 200 went out; after it, an error chunk and [DONE]: never a silent cut."""
        if not self.streaming:
            raise error
        log.info("chat: reply ended with an error for %s: %s", self.actor, error.message)
        separator = b"" if not self.tail or self.tail.endswith(b"\n\n") else b"\n\n"
        chunk = json.dumps(openai_error(error.http_status, error.code, error.message, error.details))
        if await self.send_chunk(separator + f"data: {chunk}\n\ndata: [DONE]\n\n".encode()):
            self.finish()


OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                      429: "rate_limit_error", 503: "service_unavailable_error"}


def openai_error(status: int, code: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's error shape; the details a smartswitch error has travel along in the same object."""
    extra = {k: v for k, v in details.items() if k not in ("message", "type", "code", "param")}
    param = "model" if code == "unknown_model" else None
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "server_error"), "code": code,
                      "param": param, **extra}}


def engine_trouble(exc: Exception, model: str, stall_s: float, *, started: bool) -> SmartswitchError:
    """What the client is told when the engine fails it: stalled, died, or the request was cut."""
    if isinstance(exc, SmartswitchError):
        return exc
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return EngineFailed(f"The engine of {model} stalled: no output for {stall_s:g} s"
                            + (" in the middle of the reply." if started else "."), reason="stalled")
    where = "stopped in the middle of the reply" if started else "did not answer"
    return EngineFailed(f"The engine of {model} {where}: {str(exc) or type(exc).__name__}.", reason="engine_error")


def engine_message(data: bytes) -> str:
    try:
        body = json.loads(data)
    except ValueError:
        return data.decode(errors="replace")[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
    return data.decode(errors="replace")[:500]


def waiting_note(status: dict[str, Any], model_id: str, waited_s: float) -> str:
    """The SSE comment a chat waiting for its model gets: ``loading gpt-oss-120b 45 % ~30 s``."""
    switch = status.get("switch") or {}
    if switch.get("target_model") == model_id and switch.get("kind") == "switch":
        eta = switch.get("eta_seconds")
        note = f"loading {model_id} {switch.get('progress', 0)} %" + (f" ~{eta:.0f} s" if eta is not None else "")
        if switch.get("message"):
            note += f" ({switch['message']})"
    else:
        op = status.get("operation")
        busy = f"; first: {op['kind']} {op.get('target_model') or ''}".rstrip() if op else ""
        note = f"queued for {model_id}, waited {waited_s:.0f} s{busy}"
    return " ".join(note.split())  # one line: an SSE comment ends at the first newline


def _quiet(future: asyncio.Future[Any]) -> None:
    """Retrieve a dropped write's outcome, so no 'exception was never retrieved' reaches the log."""
    if not future.cancelled():
        future.exception()


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def openapi_document() -> dict[str, Any]:
    text = resources.files("dashboard.api").joinpath("openapi.json").read_text()
    return json.loads(text)


Route = tuple[str, type[RequestHandler], dict[str, Any]]

HANDLERS: list[tuple[str, type[ApiHandler]]] = [
    (r"/healthz", HealthHandler),
    (r"/v1/openapi\.json", OpenApiHandler),
    (r"/v1/models/status", StatusHandler),
    (r"/v1/models/plan", PlanHandler),
    (r"/v1/models/switch", SwitchHandler),
    (r"/v1/models/switch/cancel", CancelHandler),
    (r"/v1/models/([A-Za-z0-9][A-Za-z0-9._-]*)/(load|unload|sleep|wake|pin|unpin)", ModelActionHandler),
    (r"/v1/events", EventsHandler),
    (r"/v1/audit", AuditHandler),
    (r"/v1/models", OpenAIModelsHandler),
    (r"/v1/chat/completions", ChatHandler),
    (r"/v1/.*", UnknownRouteHandler),  # last: only what nothing above matched
]


def make_routes(context: ApiContext | ContextSource) -> list[Route]:
    """The API's Tornado routes (``extra_patterns``) over ``context``, or a function that gives it."""
    source: ContextSource = (lambda: context) if isinstance(context, ApiContext) else context
    return [(pattern, handler, {"context": source}) for pattern, handler in HANDLERS]


def _context_from_environment() -> ApiContext:
    from dashboard.server import from_environment

    return from_environment().api


# For ``panel serve ... --plugins dashboard.api.routes``: nothing starts until the first request.
ROUTES: list[Route] = make_routes(_context_from_environment)
