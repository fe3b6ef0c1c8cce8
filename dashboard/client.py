"""HTTP client (httpx, sync and async) with the in-process orchestrator's interface."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from dashboard.api.hosts import is_loopback
from dashboard.events import Event, SwitchEvent, from_sse, is_terminal
from dashboard.orchestrator.datadir import KEY_FILE, DataDirLock, pid_alive

DEFAULT_URL = "http://127.0.0.1:5006"
DEFAULT_DATA_DIR = "~/.local/share/smartswitch"
KEY_ENV = "SMARTSWITCH_API_KEY"
KEY_FILE_RULE = ("The local key file (DATA_DIR/api-key) is only sent to the server that uses it: a loopback URL "
                 "(127.0.0.1, ::1, localhost) on the port of the server that holds that data dir now "
                 "(DATA_DIR/server.json); any other URL needs --api-key or SMARTSWITCH_API_KEY.")


class ApiError(Exception):
    """An API error answer: ``code`` and ``message`` come from the server's JSON."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.code = str(body.get("error", "error"))
        self.message = str(body.get("message", body))
        super().__init__(f"{status} {self.code}: {self.message}")


def default_api_key(url: str = DEFAULT_URL, data_dir: str | None = None) -> str | None:
    """The key from SMARTSWITCH_API_KEY (or the first of SMARTSWITCH_API_KEYS), else ``local_key(url)``."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    keys = os.environ.get("SMARTSWITCH_API_KEYS", "").split(",")
    if keys[0].strip():
        return keys[0].strip()
    return local_key(url, data_dir)


def local_key(url: str, data_dir: str | None = None) -> str | None:
    """The key a local server generated in its data dir, for that server's own URL only (``KEY_FILE_RULE``).

    Whatever answers on another host or port (another user's server, or anything else) never sees it;
    nor does a port whose server is gone, since a stopped server removes its ``server.json``.
    """
    folder = Path(os.path.expanduser(data_dir or os.environ.get("SMARTSWITCH_DATA_DIR") or DEFAULT_DATA_DIR))
    path = folder / KEY_FILE
    if not path.is_file():
        return None
    holder = DataDirLock(folder).holder()
    if holder is None or not holder.url or not pid_alive(holder.pid) or not serves_at(holder.url, url):
        return None
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def serves_at(server_url: str, url: str) -> bool:
    """Does a server listening at ``server_url`` answer ``url``, on this machine's loopback?"""
    try:
        own, target = urlsplit(server_url), urlsplit(url)
        own_port, target_port = own.port or _default_port(own.scheme), target.port or _default_port(target.scheme)
    except ValueError:  # a malformed URL or port
        return False
    if not (target.hostname and is_loopback(target.hostname)) or own.scheme != target.scheme or own_port != target_port:
        return False
    # Bound to a wildcard or to loopback, the server takes loopback connections; bound elsewhere it does not.
    return own.hostname in ("0.0.0.0", "::", "") or bool(own.hostname and is_loopback(own.hostname))


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


class SseParser:
    """Incremental SSE parsing: feed lines, get (event, data) when a frame ends; keep-alives skipped."""

    def __init__(self) -> None:
        self.kind, self.data = "message", []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            frame = (self.kind, "\n".join(self.data)) if self.data else None
            self.kind, self.data = "message", []
            return frame
        if line.startswith("event:"):
            self.kind = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].lstrip())
        return None


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    parser = SseParser()
    for line in lines:
        frame = parser.feed(line)
        if frame is not None:
            yield frame


async def aparse_sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    parser = SseParser()
    async for line in lines:
        frame = parser.feed(line)
        if frame is not None:
            yield frame


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        response.read()
        try:
            body = response.json()
        except json.JSONDecodeError:
            body = {"error": "http_error", "message": response.text}
        raise ApiError(response.status_code, body)
    return response


class SmartswitchClient:
    """Blocking client: status, plan, switch (iterating events), cancel, events, model actions."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30.0) -> None:
        key = api_key or default_api_key(url)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SmartswitchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> dict[str, Any]:
        return _check(self.http.get("/v1/models/status")).json()

    def plan(self, target: str) -> dict[str, Any]:
        return _check(self.http.get("/v1/models/plan", params={"target_model": target})).json()

    def switch(self, target: str, actor: str | None = None) -> str:
        """Start a switch and return its id at once (follow it with ``events()`` or ``status()``)."""
        response = self.http.post("/v1/models/switch", json={"target_model": target, "wait": False})
        return str(_check(response).json()["switch_id"])

    def switch_events(self, target: str) -> Iterator[SwitchEvent]:
        """Start a switch and yield its events; the last one is complete, error or cancelled."""
        with self.http.stream("POST", "/v1/models/switch", json={"target_model": target},
                              timeout=httpx.Timeout(30.0, read=None)) as response:
            _check(response)
            for kind, data in parse_sse(response.iter_lines()):
                event = from_sse(kind, data)
                yield event  # type: ignore[misc]
                if is_terminal(event):
                    return

    def switch_and_wait(self, target: str, on_event: Callable[[SwitchEvent], None] | None = None) -> SwitchEvent:
        last = None
        for event in self.switch_events(target):
            if on_event is not None:
                on_event(event)
            last = event
        if last is None:
            raise ApiError(502, {"error": "stream_ended", "message": "The switch stream ended with no event."})
        return last

    def cancel(self, actor: str | None = None) -> bool:
        return bool(_check(self.http.post("/v1/models/switch/cancel")).json()["cancelled"])

    def action(self, model_id: str, action: str) -> dict[str, Any]:
        return _check(self.http.post(f"/v1/models/{model_id}/{action}", timeout=None)).json()

    def audit_log(self, limit: int = 200) -> list[dict[str, Any]]:
        return _check(self.http.get("/v1/audit", params={"limit": limit})).json()["entries"]

    def events(self) -> Iterator[Event]:
        """Every state change, starting with the current status; runs until the caller stops."""
        with self.http.stream("GET", "/v1/events", timeout=httpx.Timeout(30.0, read=None)) as response:
            _check(response)
            for kind, data in parse_sse(response.iter_lines()):
                yield from_sse(kind, data)


class AsyncSmartswitchClient:
    """The same interface for asyncio code (notebooks, the dashboard pointed at a shared server)."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30.0) -> None:
        key = api_key or default_api_key(url)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def status(self) -> dict[str, Any]:
        return _check(await self.http.get("/v1/models/status")).json()

    async def plan(self, target: str) -> dict[str, Any]:
        return _check(await self.http.get("/v1/models/plan", params={"target_model": target})).json()

    async def switch(self, target: str, actor: str | None = None) -> str:
        response = await self.http.post("/v1/models/switch", json={"target_model": target, "wait": False})
        return str(_check(response).json()["switch_id"])

    async def switch_events(self, target: str) -> AsyncIterator[SwitchEvent]:
        async with self.http.stream("POST", "/v1/models/switch", json={"target_model": target},
                                    timeout=httpx.Timeout(30.0, read=None)) as response:
            await _acheck(response)
            async for kind, data in aparse_sse(response.aiter_lines()):
                event = from_sse(kind, data)
                yield event  # type: ignore[misc]
                if is_terminal(event):
                    return

    async def cancel(self, actor: str | None = None) -> bool:
        return bool(_check(await self.http.post("/v1/models/switch/cancel")).json()["cancelled"])

    async def events(self) -> AsyncIterator[Event]:
        async with self.http.stream("GET", "/v1/events", timeout=httpx.Timeout(30.0, read=None)) as response:
            await _acheck(response)
            async for kind, data in aparse_sse(response.aiter_lines()):
                yield from_sse(kind, data)


async def _acheck(response: httpx.Response) -> None:
    if response.status_code >= 400:
        await response.aread()
        _check(response)
