"""The HTTP API as Tornado handlers, served beside the dashboard.

``make_routes(context)`` gives the handlers of one orchestrator (``smartswitch serve`` passes them to
``pn.serve`` as ``extra_patterns``); ``ROUTES`` is the same table for ``panel serve --plugins
dashboard.api.routes``, bound to the process's orchestrator made from the environment on first use.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import httpx
from tornado.iostream import StreamClosedError
from tornado.web import RequestHandler

from dashboard.api.auth import KeyRing, load_keys
from dashboard.api.ratelimit import RateLimiter
from dashboard.errors import ModelNotRunning, SmartswitchError, UnknownModel
from dashboard.events import Event, to_dict, to_sse
from dashboard.orchestrator.core import OrchestratorPort
from dashboard.orchestrator.states import ModelStatus

log = logging.getLogger(__name__)
KEEPALIVE_S = 15.0
PROXY_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=5.0)


class BadRequest(SmartswitchError):
    code = "bad_request"
    http_status = 400


class RateLimited(SmartswitchError):
    code = "rate_limited"
    http_status = 429


class TooLarge(SmartswitchError):
    code = "body_too_large"
    http_status = 413


class NotFound(SmartswitchError):
    code = "not_found"
    http_status = 404


@dataclass
class ApiContext:
    """What every handler shares: the orchestrator, the keys, the switch rate limiter."""

    port: OrchestratorPort
    keys: KeyRing
    limiter: RateLimiter
    max_body_bytes: int
    keepalive_s: float = KEEPALIVE_S
    proxy: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=PROXY_TIMEOUT))


def make_api_context(port: OrchestratorPort) -> ApiContext:
    """The handlers' shared context for ``port``; makes (and logs the path of) the API key if none is set."""
    settings = port.config.server
    return ApiContext(port, KeyRing(load_keys(port.data_dir)), RateLimiter(settings.switches_per_minute),
                      settings.max_body_bytes)


ContextSource = Callable[[], ApiContext]


class ApiHandler(RequestHandler):
    """JSON in and out, bearer-key auth, body size limit, errors as ``{"error", "message"}``."""

    public = False

    def initialize(self, context: ContextSource) -> None:
        self._context = context

    def prepare(self) -> None:
        self.ctx = self._context()
        self.key_id = "anonymous"
        length = self.request.headers.get("Content-Length")
        if (length and length.isdigit() and int(length) > self.ctx.max_body_bytes) or \
                len(self.request.body or b"") > self.ctx.max_body_bytes:
            raise TooLarge(f"Request body over {self.ctx.max_body_bytes} bytes.",
                           max_body_bytes=self.ctx.max_body_bytes)
        if not self.public:
            self.key_id = self.ctx.keys.authenticate(self.request.headers.get("Authorization"))

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
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"Malformed JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("The JSON body must be an object.")
        return body

    def model_arg(self, value: Any, name: str = "target_model") -> str:
        if not isinstance(value, str) or not value:
            raise BadRequest(f"'{name}' is required: the id of a catalog model.",
                             available_models=self.ctx.port.model_ids)
        if value not in self.ctx.port.config.models:
            raise UnknownModel(value, self.ctx.port.model_ids)
        return value

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, SmartswitchError):  # those are answers, not server faults
            super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, SmartswitchError):
            if isinstance(error, RateLimited):
                self.set_header("Retry-After", str(error.details["retry_after_seconds"]))
            self.send_json(error.as_dict(), error.http_status)
            return
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(status_code, "internal_error")
        self.send_json({"error": code, "message": self._reason}, status_code)


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
        retry = self.ctx.limiter.check(self.key_id)
        if retry is not None:
            self.ctx.port.history.audit(self.actor, "switch", target, "rate_limited", {"retry_after": retry})
            raise RateLimited(f"Too many switches: at most {self.ctx.limiter.per_minute} per minute. "
                              f"Retry in {retry} s.", retry_after_seconds=retry)
        if body.get("wait", True) is False:
            switch_id = await self.ctx.port.aswitch(target, self.actor)
            self.send_json({"switch_id": switch_id, "target_model": target}, 202)
            return
        events = self.ctx.port.switch_events(target, self.actor)
        if body.get("stream", True) is False:
            last = None
            async for event in events:
                last = event
            assert last is not None
            self.send_json({"event": last.kind, **to_dict(last)})
            return
        self.start_sse()
        async for event in events:
            # Keep consuming after a disconnect: the switch goes on and others may watch it.
            await self.send_event(event)
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
    async def get(self) -> None:
        self.start_sse()
        stream = self.ctx.port.events()
        try:
            next_event = asyncio.ensure_future(anext(stream))
            while not self.closed:
                done, _ = await asyncio.wait({next_event}, timeout=self.ctx.keepalive_s)
                if not done:
                    if not await self.send_raw(": keep-alive\n\n"):
                        break
                    continue
                if not await self.send_event(next_event.result()):
                    break
                next_event = asyncio.ensure_future(anext(stream))
            next_event.cancel()
        finally:
            await stream.aclose()


class AuditHandler(ApiHandler):
    def get(self) -> None:
        raw = self.get_query_argument("limit", "200")
        if not raw.isdigit() or not 1 <= int(raw) <= 5000:
            raise BadRequest(f"'limit' must be a whole number from 1 to 5000, got {raw!r}.")
        self.send_json({"entries": self.ctx.port.audit_log(int(raw))})


class UnknownRouteHandler(ApiHandler):
    """Any other /v1 path: a JSON 404 (after auth, so the API's shape is not probed for free)."""

    def prepare(self) -> None:
        super().prepare()
        raise NotFound(f"No route {self.request.method} {self.request.path}; see /v1/openapi.json.")


class OpenAIModelsHandler(ApiHandler):
    def get(self) -> None:
        status = self.ctx.port.status()["models"]
        self.send_json({"object": "list", "data": [
            {"id": mid, "object": "model", "owned_by": "smartswitch", "name": m["name"], "status": m["status"]}
            for mid, m in status.items()]})


class ChatHandler(ApiHandler):
    """OpenAI chat completions, forwarded to the engine that serves the named model."""

    async def post(self) -> None:
        raw = self.request.body
        body = self.json_body()
        model_id = self.model_arg(body.get("model"), "model")
        port = self.ctx.port
        if port.status()["models"][model_id]["status"] != ModelStatus.RUNNING:
            if port.config.server.switch_on_request:
                await port.aensure_running(model_id, self.actor)
            else:
                active = port.status()["active_model"]
                raise ModelNotRunning(
                    f"{model_id} is not running (running: {active or 'none'}). Switch first: "
                    f"POST /v1/models/switch {{\"target_model\": \"{model_id}\"}}.",
                    requested_model=model_id, running_model=active)
        with port.request(model_id):
            await self._forward(model_id, raw, bool(body.get("stream")))

    async def _forward(self, model_id: str, raw: bytes, stream: bool) -> None:
        endpoint = self.ctx.port.status()["models"][model_id].get("endpoint")
        request = self.ctx.proxy.build_request("POST", f"{endpoint}/v1/chat/completions", content=raw,
                                               headers={"Content-Type": "application/json"})
        try:
            response = await self.ctx.proxy.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise ModelNotRunning(f"The engine of {model_id} did not answer: {exc}",
                                  requested_model=model_id) from exc
        try:
            self.set_status(response.status_code)
            self.set_header("Content-Type", response.headers.get("content-type", "application/json"))
            if stream:
                self.set_header("Cache-Control", "no-cache")
                self.set_header("X-Accel-Buffering", "no")
            async for chunk in response.aiter_raw():
                self.write(chunk)
                await self.flush()  # stream through, chunk by chunk, without buffering
        except StreamClosedError:
            return
        finally:
            await response.aclose()
        self.finish()


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
