"""One model's engine, whatever runs it: output -> signals, readiness, exit and stall detection."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator

import httpx

from dashboard.config import ModelSpec
from dashboard.engines import signals as sig
from dashboard.engines.vllm_logs import meaningful_tail, milestone_key, parse_line, split_lines

READY_POLL_S = 0.1  # readiness must be seen within 0.2 s of the server coming up
UNHEALTHY_AFTER = 3  # consecutive failed health checks before a serving engine counts as dead


class Engine(ABC):
    """Starts, watches and stops one engine; every observation becomes a signal on ``queue``."""

    runtime = "abstract"

    def __init__(self, spec: ModelSpec, port: int, *, stall_timeout_s: float = 120.0,
                 health_interval_s: float = 2.0) -> None:
        self.spec = spec
        self.port = port
        self.stall_timeout_s = stall_timeout_s
        self.health_interval_s = health_interval_s
        self.queue: asyncio.Queue[sig.EngineSignal] = asyncio.Queue()
        self.tail: deque[str] = deque(maxlen=200)
        self.ready = False
        self.started_at = time.time()
        self.last_output_at = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def model_id(self) -> str:
        return self.spec.id

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # What each runtime provides ---------------------------------------------------------------
    @property
    @abstractmethod
    def ref(self) -> str:
        """A durable reference (pid, container id) saved for adoption after a restart."""

    @abstractmethod
    async def _spawn(self) -> None: ...

    @abstractmethod
    def _output(self, from_start: bool) -> AsyncIterator[str]:
        """Chunks of the engine's combined output as it arrives."""

    @abstractmethod
    async def _wait_exit(self) -> int | None: ...

    async def _output_caught_up(self) -> None:
        """Wait until the output written so far has been read (where the runtime can tell)."""
        return

    @abstractmethod
    async def _terminate(self, timeout: float) -> None: ...

    @abstractmethod
    def pids(self) -> tuple[int, ...]:
        """Host pids of the engine's processes (for NVML attribution)."""

    @abstractmethod
    def alive(self) -> bool: ...

    # Lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._spawn()
        self.last_output_at = time.monotonic()
        self._watch(from_start=True)

    async def adopt(self) -> bool:
        """Take over an engine started before a restart: True when it is alive and serving."""
        if not self.alive() or not await self.healthy():
            return False
        self.ready = True
        self._watch(from_start=False)
        return True

    async def detach(self) -> None:
        """Stop watching, leave the engine running (for the next orchestrator to adopt)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def stop(self, timeout: float) -> None:
        await self.detach()
        await self._terminate(timeout)

    def error_text(self) -> str:
        """The engine's own last meaningful lines, to tell the user why it failed."""
        return "\n".join(meaningful_tail(self.tail))

    async def healthy(self) -> bool:
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                response = await client.get(f"{self.base_url}/health")
                return response.status_code == 200
        except httpx.HTTPError:
            return False

    # Watchers ---------------------------------------------------------------------------------
    def _watch(self, from_start: bool) -> None:
        self._tasks = [
            asyncio.create_task(self._pump(from_start), name=f"{self.model_id}-output"),
            asyncio.create_task(self._poll_health(), name=f"{self.model_id}-health"),
            asyncio.create_task(self._watch_exit(), name=f"{self.model_id}-exit"),
        ]

    async def _pump(self, from_start: bool) -> None:
        buffer = ""
        seen: set[str] = set()
        async for chunk in self._output(from_start):
            self.last_output_at = time.monotonic()
            lines, buffer = split_lines(buffer + chunk)
            for line in lines:
                if line.strip():
                    self.tail.append(line)
                key = milestone_key(line)
                if key is not None and key not in seen:
                    seen.add(key)
                    self.queue.put_nowait(sig.Milestone(key))
                signal = parse_line(line)
                if signal is not None:
                    self.queue.put_nowait(signal)

    async def _poll_health(self) -> None:
        failures = 0
        stalled = False
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                try:
                    ok = (await client.get(f"{self.base_url}/health")).status_code == 200
                    if ok and not self.ready:
                        ok = (await client.get(f"{self.base_url}/v1/models")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not self.ready:
                    if ok:
                        await self._output_caught_up()  # signals printed before "ready" come first
                        self.ready = True
                        self.queue.put_nowait(sig.Ready())
                    elif not stalled and time.monotonic() - self.last_output_at > self.stall_timeout_s:
                        stalled = True
                        self.queue.put_nowait(sig.Stalled(self.stall_timeout_s))
                    await asyncio.sleep(READY_POLL_S)
                    continue
                failures = 0 if ok else failures + 1
                if failures == UNHEALTHY_AFTER:
                    self.queue.put_nowait(sig.EngineError(
                        f"health check failed {UNHEALTHY_AFTER} times in a row"))
                await asyncio.sleep(self.health_interval_s)

    async def _watch_exit(self) -> None:
        code = await self._wait_exit()
        await asyncio.sleep(0.2)  # let the output pump read the last lines first
        self.queue.put_nowait(sig.Exited(code, meaningful_tail(self.tail)))
