"""The orchestrator's thread-safe port: its own loop in one thread; snapshots, actions, event streams.

Panel's loop, a Jupyter kernel's loop and test code all talk to it the same way: actions go through
``run_coroutine_threadsafe``, events come back on the subscriber's own loop via ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dashboard.config import Config, ConfigError, ModelSpec
from dashboard.engines.base import Engine
from dashboard.engines.process import ProcessEngine, free_port
from dashboard.events import Event, StatusEvent, SwitchEvent, is_terminal
from dashboard.gpu.base import GpuMonitor
from dashboard.gpu.nvml import NvmlGpu, find_nvml_gpu
from dashboard.gpu.virtual import LEDGER_ENV, VirtualGpu
from dashboard.orchestrator.datadir import DataDirLock, prepare_data_dir
from dashboard.orchestrator.history import History
from dashboard.orchestrator.machine import EngineFactory, Orchestrator
from dashboard.orchestrator.traffic import Lease

T = TypeVar("T")


def make_gpu(config: Config, data_dir: Path) -> GpuMonitor:
    """The GPU source the config asks for; ``auto`` prefers NVML when a GPU is there."""
    if config.gpu.source == "virtual":
        return virtual_gpu(config, data_dir)
    if config.gpu.source == "nvml":
        return NvmlGpu()
    nvml = find_nvml_gpu()
    if nvml is not None:
        return nvml
    if config.gpu.total_gb is None:
        raise ConfigError(f"{config.source}: [gpu] source = \"auto\" found no NVIDIA GPU; "
                          "set source = \"virtual\" and total_gb (or devices_gb) to run without one")
    return virtual_gpu(config, data_dir)


def virtual_gpu(config: Config, data_dir: Path) -> VirtualGpu:
    return VirtualGpu(config.gpu.total_gb or 0.0, ledger_dir=data_dir / "virtual-gpu",
                      devices_gb=config.gpu.devices_gb or None)


def check_devices(config: Config, device_totals: dict[int, float]) -> None:
    """Every model must have a place on the devices found (NVML's count is known only now)."""
    for spec in config.models.values():
        missing = sorted(set(spec.gpus or ()) - set(device_totals))
        if missing or spec.tensor_parallel_size > len(device_totals):
            wanted = f"GPUs {list(spec.gpus)}" if spec.gpus else f"{spec.tensor_parallel_size} GPUs"
            raise ConfigError(f"{config.source}, [models.{spec.id}]: needs {wanted}, but this machine has "
                              f"{len(device_totals)} (indices {sorted(device_totals)})")


def make_engine_factory(config: Config, data_dir: Path, gpu: GpuMonitor) -> EngineFactory:
    reading = gpu.read([])
    device_totals = {d.index: d.total_gb for d in reading.by_device()}
    check_devices(config, device_totals)
    real = gpu.source == "nvml"  # only real GPUs get --gpu-memory-utilization and Docker device requests
    ledger = getattr(gpu, "ledger_dir", None)
    env = {LEDGER_ENV: str(ledger)} if ledger is not None else {}

    def factory(spec: ModelSpec, port: int | None, ref: str | None,
                devices: tuple[int, ...] | None = None) -> Engine:
        options = {"stall_timeout_s": config.switching.stall_timeout_s,
                   "health_interval_s": config.switching.health_interval_s}
        # vLLM takes one share of each of its devices: that of its footprint on the smallest of them.
        spans = devices or tuple(range(spec.tensor_parallel_size))
        gpu_total_gb = len(spans) * min(device_totals.get(d, 0.0) for d in spans) if real else None
        if spec.runtime == "docker":
            from dashboard.engines.docker import DockerEngine

            return DockerEngine(spec, port or free_port(), container_id=ref, gpu_total_gb=gpu_total_gb or None,
                                devices=devices, instance=str(data_dir), **options)
        return ProcessEngine(spec, port or free_port(), data_dir / "logs", gpu_total_gb=gpu_total_gb or None,
                             ref=ref, instance=str(data_dir), env=env, devices=devices, **options)
    return factory


def make_sweep(config: Config, data_dir: Path) -> Callable[[set[str]], list[str]]:
    """Stops engines marked with this data dir that no record knows (processes, and containers if used)."""
    from dashboard.engines.process import sweep as sweep_processes

    instance = str(data_dir)
    docker = any(m.runtime == "docker" for m in config.models.values())

    def sweep(adopted: set[str]) -> list[str]:
        found = sweep_processes(instance, adopted)
        if docker:
            from dashboard.engines.docker import sweep as sweep_containers

            found += sweep_containers(instance, adopted)
        return found
    return sweep


class OrchestratorPort:
    """Thread-safe access to the one orchestrator of this process."""

    def __init__(self, config: Config, *, data_dir: Path | None = None, gpu: GpuMonitor | None = None,
                 engine_factory: EngineFactory | None = None, url: str | None = None) -> None:
        self.config = config
        self.url = url
        self.data_dir = prepare_data_dir(Path(data_dir) if data_dir is not None else config.data_dir)
        self.lock = DataDirLock(self.data_dir)
        gpu = gpu or make_gpu(config, self.data_dir)
        self.history = History(self.data_dir / "smartswitch.sqlite")
        factory = engine_factory or make_engine_factory(config, self.data_dir, gpu)
        self.loop = asyncio.new_event_loop()
        self.core = Orchestrator(config, gpu, self.history, factory, make_sweep(config, self.data_dir))
        self._thread = threading.Thread(target=self.loop.run_forever, name="smartswitch-orchestrator",
                                        daemon=True)
        self._closed = False

    # Lifecycle --------------------------------------------------------------------------------
    def start(self) -> OrchestratorPort:
        """Take the data dir (one server per data dir), then adopt, reconcile and serve."""
        self.lock.acquire(self.url)
        self._thread.start()
        try:
            self._run(self.core.start(), timeout=120)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.lock.release()
            raise
        atexit.register(self.close)
        return self

    def close(self, stop_engines: bool = True) -> None:
        """Stop every engine this orchestrator runs, then its loop; nothing is left behind.

        ``stop_engines=False`` leaves serving engines up for the next start to adopt (a restart).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self.core.shutdown(stop_engines), timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.history.close()
            self.lock.release()

    def __enter__(self) -> OrchestratorPort:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Plumbing ---------------------------------------------------------------------------------
    def _submit(self, coro: Awaitable[T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def _run(self, coro: Awaitable[T], timeout: float | None = 60) -> T:
        return self._submit(coro).result(timeout)

    async def _arun(self, coro: Awaitable[T]) -> T:
        return await asyncio.wrap_future(self._submit(coro))

    def _on_loop(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()
        return self._run(call())

    # Reads ------------------------------------------------------------------------------------
    @property
    def model_ids(self) -> list[str]:
        return list(self.config.models)

    def status(self) -> dict[str, Any]:
        """The latest snapshot (the ``GET /v1/models/status`` shape); cheap, never blocks the loop."""
        return self.core.snapshot()

    def plan(self, target: str) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            the_plan = self.core.plan(target)
            data = the_plan.as_dict()
            data["estimated_load_time_seconds"] = round(sum(self.core.expected(target).values()), 1)
            data["unload_names"] = [self.config.models[m].name for m in the_plan.unload]
            data["device_count"] = len(self.core.reading.by_device())  # GPUs are named only when several
            return data
        return self._on_loop(make)

    def audit_log(self, limit: int = 200) -> list[dict[str, Any]]:
        return self.history.audit_log(limit)

    def load_history(self, limit: int = 200) -> list[dict[str, Any]]:
        return self.history.loads(limit)

    def last_used(self, user: str) -> str | None:
        return self.history.get(f"last_used:{user}")

    # Actions (sync) ---------------------------------------------------------------------------
    # A switch or load asked through the port counts against its actor's switches per minute.
    def switch(self, target: str, actor: str = "api") -> str:
        return self._run(self.core.charged_switch(target, actor))

    def cancel(self, actor: str = "api") -> bool:
        return self._run(self.core.cancel(actor), timeout=None)

    def load(self, model_id: str, actor: str = "api") -> None:
        self._run(self.core.charged_load(model_id, actor), timeout=None)

    def unload(self, model_id: str, actor: str = "api") -> None:
        self._run(self.core.unload(model_id, actor), timeout=None)

    def sleep(self, model_id: str, actor: str = "api") -> None:
        self._run(self.core.sleep(model_id, actor), timeout=None)

    def wake(self, model_id: str, actor: str = "api") -> None:
        self._run(self.core.wake(model_id, actor), timeout=None)

    def set_pinned(self, model_id: str, pinned: bool, actor: str = "api") -> None:
        self._run(self.core.set_pinned(model_id, pinned, actor))

    # Actions (async, for callers on another loop: Tornado handlers, notebooks) ----------------
    async def aswitch(self, target: str, actor: str = "api") -> str:
        return await self._arun(self.core.charged_switch(target, actor))

    async def acancel(self, actor: str = "api") -> bool:
        return await self._arun(self.core.cancel(actor))

    async def acall(self, action: str, model_id: str, actor: str = "api") -> None:
        """Run a model-manager action (load, unload, sleep, wake) without blocking the caller's loop."""
        method = {"load": self.core.charged_load, "unload": self.core.unload, "sleep": self.core.sleep,
                  "wake": self.core.wake}[action]
        await self._arun(method(model_id, actor))

    # Chat requests: every one holds a lease on its model while its reply is relayed ----------------
    def new_lease(self, model_id: str, actor: str, holder: asyncio.AbstractEventLoop | None) -> Lease:
        return Lease(model_id, actor, holder, self._post_release)

    def _post_release(self, lease: Lease) -> None:
        if not self._closed and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.core.lease_released, lease)

    async def acquire(self, model_id: str, actor: str = "api", *, queue: bool = False) -> Lease:
        """Admit one chat request on ``model_id`` (it runs and is counted, in one step), else a 409 saying
        what runs; ``queue``: wait in the visible queue instead (a switch to it is scheduled).
        Cancelled (the client went away), nothing stays counted or queued."""
        lease = self.new_lease(model_id, actor, asyncio.get_running_loop())
        try:
            await self._arun(self.core.admit(lease, queue=queue))
        except BaseException:
            lease.release()
            raise
        return lease

    @asynccontextmanager
    async def lease(self, model_id: str, actor: str = "api", *, queue: bool = False) -> AsyncIterator[Lease]:
        """``acquire`` for the length of a ``with`` block."""
        lease = await self.acquire(model_id, actor, queue=queue)
        try:
            yield lease
        finally:
            lease.release()

    @contextmanager
    def request(self, model_id: str, actor: str = "api") -> Iterator[Lease]:
        """``lease`` for synchronous code: a stop or sleep of ``model_id`` waits for the block to end."""
        lease = self.new_lease(model_id, actor, None)
        try:
            self._run(self.core.admit(lease, queue=False))
        except BaseException:
            lease.release()
            raise
        try:
            yield lease
        finally:
            lease.release()

    # Events -----------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[Event], None],
                  loop: asyncio.AbstractEventLoop | None = None) -> Callable[[], None]:
        """Call ``callback`` with every event, on ``loop`` when given (else on the orchestrator thread)."""
        if loop is None:
            unsubscribe = self._on_loop(lambda: self.core.subscribe(callback))
        else:
            unsubscribe = self._run(self._subscribe_async(callback, loop))

        def remove() -> None:
            if not self._closed:
                self.loop.call_soon_threadsafe(unsubscribe)
        return remove

    async def subscription(self, limit: int = 256) -> Subscription:
        """Every event from now on for the caller's loop, at most ``limit`` waiting to be read (past that
        the subscriber is dropped); starts with the current status. Close it when done."""
        sub = Subscription(self, asyncio.get_running_loop(), limit)
        sub.unsubscribe = await self._arun(self._subscribe_direct(sub.offer))
        sub.offer(StatusEvent(self.status()), first=True)  # read after subscribing: nothing is missed
        return sub

    async def _subscribe_direct(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        return self.core.subscribe(callback)

    async def events(self) -> AsyncIterator[Event]:
        """Every event from now on, on the caller's loop; starts with the current status."""
        sub = await self.subscription()
        try:
            while True:
                event = await sub.get()
                if event is None:
                    return
                yield event
        finally:
            sub.close()

    async def _subscribe_async(self, callback: Callable[[Event], None],
                               loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        def deliver(event: Event) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(callback, event)
        return self.core.subscribe(deliver)

    async def switch_events(self, target: str, actor: str = "api") -> AsyncIterator[SwitchEvent]:
        """Start a switch and yield its events until (and including) the terminal one."""
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def start() -> tuple[Callable[[], None], str]:
            # Subscribe and start in one step on the orchestrator loop so no event is missed.
            unsubscribe = await self._subscribe_async(inbox.put_nowait, loop)
            try:
                return unsubscribe, await self.core.charged_switch(target, actor)
            except BaseException:
                unsubscribe()
                raise

        unsubscribe, switch_id = await self._arun(start())
        try:
            while True:
                event = await inbox.get()
                if isinstance(event, StatusEvent) or event.switch_id != switch_id:
                    continue
                yield event
                if is_terminal(event):
                    return
        finally:
            self.loop.call_soon_threadsafe(unsubscribe)

    def switch_and_wait(self, target: str, actor: str = "api",
                        on_event: Callable[[SwitchEvent], None] | None = None,
                        timeout: float | None = None) -> SwitchEvent:
        """Switch and block until it ends; returns the terminal event (complete, error or cancelled)."""
        inbox: queue.Queue[Event] = queue.Queue()

        async def start() -> tuple[Callable[[], None], str]:
            unsubscribe = self.core.subscribe(inbox.put)
            try:
                return unsubscribe, await self.core.charged_switch(target, actor)
            except BaseException:
                unsubscribe()
                raise

        unsubscribe, switch_id = self._run(start())
        try:
            while True:
                event = inbox.get(timeout=timeout)
                if isinstance(event, StatusEvent) or event.switch_id != switch_id:
                    continue
                if on_event is not None:
                    on_event(event)
                if is_terminal(event):
                    return event
        finally:
            self.loop.call_soon_threadsafe(unsubscribe)


class Subscription:
    """One subscriber's events, handed to its own loop through a bounded buffer.

    The buffer is filled on the orchestrator's thread and read on the subscriber's loop; a subscriber that
    falls ``limit`` events behind is dropped (``dropped`` is set, the buffer emptied) instead of making the
    server hold every event for it.
    """

    def __init__(self, port: OrchestratorPort, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.port = port
        self.loop = loop
        self.limit = limit
        self.dropped = False
        self.closed = False
        self.unsubscribe: Callable[[], None] | None = None
        self._items: deque[Event] = deque()  # appends and pops are atomic: no lock between the two threads
        self._waiter: asyncio.Future[None] | None = None
        self._dropped_waiter: asyncio.Future[None] | None = None

    def offer(self, event: Event, first: bool = False) -> None:
        """On the orchestrator's thread: keep ``event`` unless this subscriber is too far behind."""
        if self.closed or self.dropped:
            return
        if len(self._items) >= self.limit:
            self.dropped = True
            self._items.clear()
        elif first:
            self._items.appendleft(event)
        else:
            self._items.append(event)
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        for waiter in (self._waiter, self._dropped_waiter if self.dropped else None):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event; None when dropped, closed, or nothing came within ``timeout``."""
        while not self._items and not self.dropped and not self.closed:
            self._waiter = self.loop.create_future()
            done, _ = await asyncio.wait({self._waiter}, timeout=timeout)
            self._waiter = None
            if not done:
                return None
        if self.dropped or self.closed or not self._items:
            return None
        return self._items.popleft()

    def when_dropped(self) -> asyncio.Future[None]:
        """Resolves when this subscriber is dropped (to stop waiting on a client that does not read)."""
        if self._dropped_waiter is None:
            self._dropped_waiter = self.loop.create_future()
            if self.dropped:
                self._dropped_waiter.set_result(None)
        return self._dropped_waiter

    def close(self) -> None:
        """Stop receiving; the orchestrator forgets this subscriber."""
        if self.closed:
            return
        self.closed = True
        self._items.clear()
        self._wake()
        if self.unsubscribe is not None and not self.port._closed and not self.port.loop.is_closed():
            self.port.loop.call_soon_threadsafe(self.unsubscribe)
