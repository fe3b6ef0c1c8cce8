"""One model's engine, whatever runs it: output -> signals, readiness, exit and stall detection, sleep/wake.

Each engine gets a random secret at its start (vLLM's ``--api-key``, passed as ``VLLM_API_KEY`` so that
``ps`` does not show it) and the orchestrator's own requests carry it (``auth_headers``): on this
machine's loopback, nobody else can use its OpenAI routes. vLLM leaves ``/health`` and the sleep
routes (``/sleep``, ``/wake_up``, ``/is_sleeping``, only served with ``VLLM_SERVER_DEV_MODE=1``) open
whatever the key, so a local user can still put a sleep-capable engine to sleep: the health poller
asks ``/is_sleeping`` too and reports a sleep or wake nobody here asked for (``SleepState``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator

import httpx

from dashboard.config import ModelSpec
from dashboard.engines import signals as sig
from dashboard.engines.vllm_logs import meaningful_tail, milestone_key, parse_line, split_lines
from dashboard.errors import EngineFailed

READY_POLL_S = 0.1  # readiness must be seen within 0.2 s of the server coming up
UNHEALTHY_AFTER = 3  # consecutive failed health checks before a serving engine counts as dead
API_KEY_ENV = "VLLM_API_KEY"  # vLLM's --api-key from the environment (the sim reads it too)
OUTPUT_CATCH_UP_S = 0.25  # after an exit, how long the output pump may take to read the last lines
SLEEP_TIMEOUT_S = 120.0  # moving weights to host RAM and back takes seconds to minutes on big models


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
        # The catalog may name the key itself (``args = ["--api-key", ...]``): vLLM then takes that one.
        self.secret: str | None = configured_api_key(spec.args) or secrets.token_urlsafe(32)
        self.asleep: bool | None = None  # what /is_sleeping said last, or our own sleep/wake left
        self._sleep_moving = False  # our own sleep or wake is under way
        self._sleep_moves = 0

    @property
    def model_id(self) -> str:
        return self.spec.id

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        """What a request to the engine's OpenAI routes must carry: its secret (empty: an engine without one)."""
        return {"Authorization": f"Bearer {self.secret}"} if self.secret else {}

    def _running_secret(self) -> str | None:
        """The secret of the engine found running (after a restart); the runtime reads it from the engine."""
        return self.secret

    # What each runtime provides ---------------------------------------------------------------
    @property
    @abstractmethod
    def ref(self) -> str:
        """A durable reference (``pid@create_time``, container id) saved for adoption after a restart."""

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
    async def _terminate(self, timeout: float) -> None:
        """TERM, then KILL after ``timeout``; only what is confirmed to be this engine."""

    @abstractmethod
    async def _kill(self) -> None:
        """KILL at once; only what is confirmed to be this engine."""

    async def _kill_rest(self) -> None:
        """After the main process exited on its own: end what is left of the engine at once."""
        return

    @abstractmethod
    def pids(self) -> tuple[int, ...]:
        """Host pids of the engine's processes (for NVML attribution)."""

    @abstractmethod
    def alive(self) -> bool:
        """The engine's main process runs and is confirmed to be this engine (not a reused pid)."""

    # Lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._spawn()
        self.last_output_at = time.monotonic()
        self._watch(from_start=True)

    async def adopt(self) -> bool:
        """Take over an engine started before a restart: True when it is alive and serving."""
        if not self.alive() or not await self.healthy():
            return False
        self.secret = self._running_secret()  # ours from before the restart, or none if it was started without
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

    async def kill(self) -> None:
        """End a dead, hung or abandoned engine at once: no grace period, nothing in it is worth saving."""
        await self.detach()
        await self._kill()

    def error_text(self) -> str:
        """The engine's own last meaningful lines, to tell the user why it failed."""
        return "\n".join(meaningful_tail(self.tail))

    async def healthy(self) -> bool:
        try:
            async with httpx.AsyncClient(timeout=2.0, headers=self.auth_headers) as client:
                response = await client.get(f"{self.base_url}/health")
                return response.status_code == 200
        except httpx.HTTPError:
            return False

    # vLLM's sleep protocol (needs --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1) ---------------
    @contextlib.asynccontextmanager
    async def _own_sleep_move(self) -> AsyncIterator[None]:
        """While our own sleep or wake runs, what /is_sleeping says is not news (see ``_check_sleep_state``)."""
        self._sleep_moving, self.asleep = True, None
        try:
            yield
        finally:
            self._sleep_moving = False
            self._sleep_moves += 1

    async def sleep(self, level: int = 1) -> None:
        """Level 1 moves the weights to host RAM and drops the KV cache; the caller drains requests first."""
        async with self._own_sleep_move():
            try:
                async with httpx.AsyncClient(timeout=SLEEP_TIMEOUT_S, headers=self.auth_headers) as client:
                    (await client.post(f"{self.base_url}/sleep", params={"level": level})).raise_for_status()
            except httpx.HTTPError as exc:
                raise EngineFailed(f"{self.spec.name} could not be put to sleep: {_reason(exc)}",
                                   model=self.model_id) from exc
            self.asleep = True

    async def wake(self) -> None:
        """Wake, then prove readiness: /health stays 200 while asleep, so ask /is_sleeping and send one token."""
        async with self._own_sleep_move():
            await self._wake()
            self.asleep = False

    async def _wake(self) -> None:
        try:
            async with httpx.AsyncClient(timeout=SLEEP_TIMEOUT_S, headers=self.auth_headers) as client:
                (await client.post(f"{self.base_url}/wake_up")).raise_for_status()
                response = await client.get(f"{self.base_url}/is_sleeping")
                response.raise_for_status()
                if _sleeping_flag(response) is not False:
                    raise EngineFailed(f"{self.spec.name} did not wake up: /is_sleeping answered "
                                       f"{response.text[:200]!r}.", model=self.model_id)
                probe = await client.post(f"{self.base_url}/v1/chat/completions", json={
                    "model": self.model_id, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]})
                probe.raise_for_status()
        except httpx.HTTPError as exc:
            raise EngineFailed(f"{self.spec.name} did not come back from sleep: {_reason(exc)}",
                               model=self.model_id) from exc

    async def is_sleeping(self) -> bool | None:
        """What the engine says about itself; None when it does not answer (or has no sleep mode)."""
        try:
            async with httpx.AsyncClient(timeout=5.0, headers=self.auth_headers) as client:
                response = await client.get(f"{self.base_url}/is_sleeping")
        except httpx.HTTPError:
            return None
        return _sleeping_flag(response) if response.status_code == 200 else None

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
        early: sig.EngineSignal | None = None  # a tqdm bar read before its line ended
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
                if signal is not None and signal != early:
                    self.queue.put_nowait(signal)
                early = None
            # tqdm ends each bar with the \r that starts the next one: a bar drawn whole (up to its closing
            # "]") is read now, not one shard late (the ETA follows the read rate as it is).
            if buffer.endswith("]") and isinstance(bar := parse_line(buffer), sig.ShardProgress) and bar != early:
                self.queue.put_nowait(bar)
                early = bar

    async def _poll_health(self) -> None:
        failures = 0
        stalled = False
        async with httpx.AsyncClient(timeout=2.0, headers=self.auth_headers) as client:
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
                if ok and self.spec.sleep:
                    await self._check_sleep_state(client)
                await asyncio.sleep(self.health_interval_s)

    async def _check_sleep_state(self, client: httpx.AsyncClient) -> None:
        """Report what /is_sleeping says when it changed without our asking (``SleepState``)."""
        moves = self._sleep_moves
        try:
            response = await client.get(f"{self.base_url}/is_sleeping")
        except httpx.HTTPError:
            return
        observed = _sleeping_flag(response) if response.status_code == 200 else None
        if observed is None or self._sleep_moving or moves != self._sleep_moves:
            return  # no answer, or our own sleep or wake ran meanwhile: its outcome is known already
        if observed != self.asleep:
            self.asleep = observed
            self.queue.put_nowait(sig.SleepState(observed))

    async def _watch_exit(self) -> None:
        code = await self._wait_exit()
        # The main process is gone, so the engine is dead: its workers would otherwise take 10+ s to
        # notice and keep the GPU memory meanwhile. Exited means "all of it is gone".
        await self._kill_rest()
        with contextlib.suppress(TimeoutError):  # its last lines say why it died: read them, briefly
            await asyncio.wait_for(self._output_caught_up(), OUTPUT_CATCH_UP_S)
        self.queue.put_nowait(sig.Exited(code, meaningful_tail(self.tail)))


def configured_api_key(args: tuple[str, ...] | list[str]) -> str | None:
    """The value of ``--api-key`` among an engine's configured arguments, if there is one."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--api-key" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--api-key="):
            return arg.partition("=")[2]
    return None


def _sleeping_flag(response: httpx.Response) -> bool | None:
    """``{"is_sleeping": bool}`` from /is_sleeping; None for anything else."""
    try:
        flag = response.json().get("is_sleeping")
    except (ValueError, AttributeError):
        return None
    return flag if isinstance(flag, bool) else None


def _reason(exc: httpx.HTTPError) -> str:
    """A short, readable reason: the engine's status and words, or the connection failure."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} {exc.response.text[:200].strip()}".strip()
    return str(exc) or type(exc).__name__
