"""A scripted engine behind the real ``Engine`` seam, and an orchestrator wired to it: no processes.

Tests drive the engine's signals by hand (``become_ready()``, ``exit()``, ``stall()``), so every
interleaving of the state machine runs in milliseconds on one event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from dashboard.config import Config, ModelSpec, parse_config
from dashboard.engines import signals as sig
from dashboard.engines.base import Engine
from dashboard.errors import EngineFailed
from dashboard.events import Event, StatusEvent
from dashboard.gpu.virtual import VirtualGpu
from dashboard.orchestrator.history import History
from dashboard.orchestrator.machine import Orchestrator
from dashboard.orchestrator.traffic import Lease


class FakeEngine(Engine):
    """An engine whose life the test scripts; it never touches a process or a socket."""

    runtime = "fake"

    def __init__(self, spec: ModelSpec, port: int, factory: FakeFactory, ref: str | None = None,
                 devices: tuple[int, ...] | None = None) -> None:
        super().__init__(spec, port)
        self.factory = factory
        self.devices = devices
        self._ref = ref or f"fake-{spec.id}-{len(factory.started)}"
        self.running = False
        self.asleep = False
        self.stopped = False
        self.killed = False
        self.stop_gate = asyncio.Event()
        self.stop_gate.set()
        self.sleep_gate = asyncio.Event()  # clear it to hold the answer to a sleep (the engine sleeps at once)
        self.sleep_gate.set()

    @property
    def ref(self) -> str:
        return self._ref

    # The seam ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.spec.id in self.factory.fail_start:
            raise OSError("no such file")
        self.running = True
        self.factory.started.append(self)
        if self.spec.id in self.factory.auto_ready:
            self.become_ready()

    async def adopt(self) -> bool:
        return self.ref in self.factory.serving

    async def detach(self) -> None:
        return

    async def stop(self, timeout: float) -> None:
        await self.stop_gate.wait()
        self.running, self.stopped = False, True

    async def kill(self) -> None:
        self.running, self.killed = False, True

    def alive(self) -> bool:
        return self.running

    def pids(self) -> tuple[int, ...]:
        return ()

    async def sleep(self, level: int = 1) -> None:
        self.asleep = True
        await self.sleep_gate.wait()

    async def wake(self) -> None:
        if self.spec.id in self.factory.fail_wake:
            raise EngineFailed(f"{self.spec.name} did not come back from sleep")
        self.asleep = False

    async def is_sleeping(self) -> bool | None:
        return self.asleep

    async def _spawn(self) -> None:  # pragma: no cover - start() is replaced
        raise NotImplementedError

    async def _output(self, from_start: bool) -> AsyncIterator[str]:  # pragma: no cover
        raise NotImplementedError
        yield ""

    async def _wait_exit(self) -> int | None:  # pragma: no cover
        raise NotImplementedError

    async def _terminate(self, timeout: float) -> None:  # pragma: no cover
        raise NotImplementedError

    async def _kill(self) -> None:  # pragma: no cover - kill() is replaced
        raise NotImplementedError

    # What the test scripts --------------------------------------------------------------------
    def become_ready(self) -> None:
        self.queue.put_nowait(sig.Ready())

    def exit(self, code: int = -9, lines: tuple[str, ...] = ("Killed",)) -> None:
        self.running = False
        self.queue.put_nowait(sig.Exited(code, lines))

    def stall(self) -> None:
        self.queue.put_nowait(sig.Stalled(3.0))


class FakeFactory:
    """Makes FakeEngines and remembers them; which models start ready, fail, or never answer."""

    def __init__(self) -> None:
        self.started: list[FakeEngine] = []
        self.made: list[FakeEngine] = []
        self.auto_ready: set[str] = set()
        self.fail_start: set[str] = set()
        self.fail_wake: set[str] = set()
        self.serving: set[str] = set()  # refs that adopt() finds alive and serving

    def __call__(self, spec: ModelSpec, port: int | None, ref: str | None,
                 devices: tuple[int, ...] | None = None) -> FakeEngine:
        engine = FakeEngine(spec, port or 1, self, ref, devices)
        self.made.append(engine)
        return engine

    def latest(self, model_id: str) -> FakeEngine:
        return next(e for e in reversed(self.started) if e.spec.id == model_id)


# Six models on a 100 GB virtual GPU: three that fit together, a big one that needs them all gone.
CATALOG = """
[gpu]
source = "virtual"
total_gb = 100

[switching]
strategy = "largest_first"
host_ram_gb = 0

[models.qwen]
name = "Qwen"
size_gb = 30
gpu_memory_gb = 30

[models.gpt20]
name = "GPT-OSS-20B"
size_gb = 30
gpu_memory_gb = 30

[models.llama]
name = "Llama"
size_gb = 30
gpu_memory_gb = 30

[models.big]
name = "GPT-OSS-120B"
size_gb = 90
gpu_memory_gb = 90

[models.small]
name = "Small"
size_gb = 5
gpu_memory_gb = 5
sleep = true
"""


class Harness:
    """One orchestrator on a fake engine factory, its events recorded."""

    def __init__(self, data_dir: Path, catalog: str = CATALOG, factory: FakeFactory | None = None) -> None:
        self.data_dir = data_dir
        self.config: Config = parse_config(catalog, "test.toml")
        self.factory = factory or FakeFactory()
        self.history = History(data_dir / "smartswitch.sqlite")
        self.orch = Orchestrator(self.config, VirtualGpu(100.0), self.history, self.factory)
        self.events: list[Event] = []
        self.orch.subscribe(self.events.append)

    async def start(self) -> Harness:
        await self.orch.start()
        return self

    async def until(self, condition: Callable[[], Any], what: str = "condition", timeout: float = 5.0) -> Any:
        """Let the loop run until ``condition`` holds (no fixed sleeps: a deadline only)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            await asyncio.sleep(0.001)
        raise AssertionError(f"timed out waiting for {what}")

    def status(self, model_id: str) -> str:
        return self.orch.models[model_id].status.value

    def switch_events(self, switch_id: str) -> list[Event]:
        return [e for e in self.events if not isinstance(e, StatusEvent) and e.switch_id == switch_id]

    def terminal(self, switch_id: str) -> Event | None:
        from dashboard.events import is_terminal

        return next((e for e in self.switch_events(switch_id) if is_terminal(e)), None)

    async def bring_up(self, *model_ids: str) -> None:
        """Load models one by one through the manager, each becoming ready at once."""
        for model_id in model_ids:
            self.factory.auto_ready.add(model_id)
            await self.orch.load(model_id, "test")
            self.factory.auto_ready.discard(model_id)

    async def switch_ready(self, model_id: str) -> str:
        self.factory.auto_ready.add(model_id)
        switch_id = await self.orch.switch(model_id, "test")
        await self.until(lambda: self.terminal(switch_id), f"the switch to {model_id} to end")
        self.factory.auto_ready.discard(model_id)
        return switch_id

    def lease(self, model_id: str, actor: str = "api:key-test") -> Lease:
        """A chat request's lease as the port makes one (its release reaches the loop a step later)."""
        loop = asyncio.get_running_loop()
        return Lease(model_id, actor, loop, lambda lease: loop.call_soon(self.orch.lease_released, lease))

    async def admitted(self, model_id: str, actor: str = "api:key-test", *, queue: bool = False) -> Lease:
        lease = self.lease(model_id, actor)
        await self.orch.admit(lease, queue=queue)
        return lease

    def queued(self, model_id: str, actor: str = "api:key-test") -> tuple[Lease, asyncio.Task[None]]:
        """A request that waits in the queue for ``model_id`` (``switch_on_request``)."""
        lease = self.lease(model_id, actor)
        return lease, asyncio.ensure_future(self.orch.admit(lease, queue=True))

    def in_flight(self, model_id: str) -> int:
        return len(self.orch.traffic.leases.get(model_id, ()))

    async def close(self) -> None:
        await self.orch.shutdown()
        self.history.close()
