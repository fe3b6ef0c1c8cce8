"""Chat traffic: the gate every chat request passes, the drain before a stop or sleep, the request queue.

Every chat request (the OpenAI proxy and the dashboard's chat alike) holds a ``Lease`` on its model.
Admitting one checks that the model runs and is not draining and counts it, in one step on the
orchestrator's loop. A model about to be stopped or put to sleep is drained: it takes no new requests,
and those in flight may finish for up to ``drain_timeout_s``; past that they are cut, and whoever holds
them ends the reply with an explicit error (never a silent cut).

With ``switch_on_request``, a request for a model that is not serving waits in a visible queue. The
scheduler admits what the running models can serve, then switches to the model whose request has waited
longest; its requests share that one load. A queue-started switch never supersedes anything: it waits for
the slot. A person's switch may supersede it, but never fails a queued request: that one ends only when
served, at ``queue_timeout_s`` (503), when its model cannot be loaded, or at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from dashboard.api.ratelimit import LIMITED_ACTORS, RateLimited
from dashboard.errors import InsufficientMemory, ModelNotRunning, SmartswitchError
from dashboard.events import CancelledEvent, ErrorEvent, Event, StatusEvent, is_terminal
from dashboard.orchestrator.operations import OpKind
from dashboard.orchestrator.states import ModelState, ModelStatus

if TYPE_CHECKING:
    from dashboard.orchestrator.machine import Orchestrator

log = logging.getLogger("smartswitch.orchestrator")
T = TypeVar("T")
S = ModelStatus
DRAIN_TICK_S = 1.0  # the switch's "waiting for N requests" line is refreshed this often
CUT_GRACE_S = 2.0  # after a cut: how long holders get to end their replies before the stop goes ahead


class QueueTimeout(SmartswitchError):
    code = "queue_timeout"
    http_status = 503


class ModelUnavailable(SmartswitchError):
    """A queued request's model could not be loaded, or the server is going away."""

    code = "model_unavailable"
    http_status = 503


class RequestCut(SmartswitchError):
    """A request still in flight when its model's drain ran out of time (or its engine failed)."""

    code = "request_cut"
    http_status = 503


# The holder's side ---------------------------------------------------------------------------------
class Lease:
    """One chat request on one model, counted from admission until released.

    Thread-safe: the caller makes and releases it on its own loop; the orchestrator admits and cuts it on
    its loop. Releasing before admission (a client that went away) makes the admission a no-op.
    """

    def __init__(self, model: str, actor: str, holder: asyncio.AbstractEventLoop | None,
                 on_release: Callable[[Lease], None]) -> None:
        self.model = model
        self.actor = actor
        self.holder = holder  # the loop that relays the reply (None: a synchronous caller)
        self.endpoint = ""  # the engine's URL and what a request to it must carry, fixed when admitted
        self.headers: dict[str, str] = {}
        self._on_release = on_release
        self._lock = threading.Lock()
        self._counted = False
        self._released = False
        self._cut: str | None = None
        self._cut_waiter: asyncio.Future[str] | None = None

    @property
    def cut_reason(self) -> str | None:
        """Why the orchestrator cut this request short (None while it may go on)."""
        return self._cut

    def release(self) -> None:
        """The reply has ended (or the client went away): count it no more. Idempotent."""
        with self._lock:
            if self._released:
                return
            self._released = True
            counted = self._counted
        if counted:
            self._on_release(self)

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` on the holder's loop unless the request is cut first (``RequestCut``)."""
        task = asyncio.ensure_future(awaitable)
        cut = self._cut_future()
        try:
            await asyncio.wait({task, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():  # cancelled, and awaited: nothing is left running behind the caller
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled():
            return task.result()
        raise RequestCut(self._cut or "The request was cut short.", model=self.model)

    def _cut_future(self) -> asyncio.Future[str]:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._cut_waiter is None or self._cut_waiter.get_loop() is not loop:
                self._cut_waiter = loop.create_future()
                if self._cut is not None:
                    self._cut_waiter.set_result(self._cut)
            return self._cut_waiter

    # The orchestrator's side --------------------------------------------------------------------
    def admit(self, endpoint: str, headers: dict[str, str]) -> bool:
        """Counted from now on; False when the holder has already let go (then nothing is counted)."""
        with self._lock:
            if self._released:
                return False
            self._counted, self.endpoint, self.headers = True, endpoint, dict(headers)
            return True

    def cut(self, reason: str) -> None:
        """Ask the holder to end the reply now with ``reason`` as its error."""
        with self._lock:
            if self._cut is not None or self._released:
                return
            self._cut = reason
            waiter = self._cut_waiter
        if waiter is not None and not waiter.get_loop().is_closed():
            waiter.get_loop().call_soon_threadsafe(_settle, waiter, reason)

    def holder_gone(self) -> bool:
        """Its relay's loop has stopped: the reply can never finish (a server stopping its HTTP side first)."""
        return self.holder is not None and (self.holder.is_closed() or not self.holder.is_running())


def _settle(future: asyncio.Future[str], value: str) -> None:
    if not future.done():
        future.set_result(value)


# The orchestrator's bookkeeping (one loop, no locks) ---------------------------------------------------
@dataclass(eq=False)
class Waiter:
    """A queued request: admitted by the scheduler (result None) or failed with the reason."""

    lease: Lease
    future: asyncio.Future[None]
    since: float = field(default_factory=time.monotonic)
    since_wall: float = field(default_factory=time.time)


@dataclass
class Traffic:
    """Leases in flight per model, draining models, the queue in arrival order."""

    leases: dict[str, set[Lease]] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    queue: list[Waiter] = field(default_factory=list)
    starting: str | None = None  # a queue-started switch on its way to the slot
    switches: set[str] = field(default_factory=set)  # ids of switches the queue started (or joined)
    kick_pending: bool = False
    _watchers: dict[str, list[asyncio.Future[None]]] = field(default_factory=dict)

    def count(self, lease: Lease) -> None:
        self.leases.setdefault(lease.model, set()).add(lease)

    def uncount(self, lease: Lease) -> None:
        held = self.leases.get(lease.model)
        if held is not None:
            held.discard(lease)
        for watcher in self._watchers.pop(lease.model, []):
            if not watcher.done():
                watcher.set_result(None)

    def live(self, model: str) -> list[Lease]:
        """Requests in flight on ``model`` that can still finish."""
        return [lease for lease in self.leases.get(model, ()) if not lease.holder_gone()]

    def forget(self, model: str) -> None:
        """Count nothing on ``model`` any more (after a drain: what is left can never be released)."""
        self.leases.pop(model, None)

    async def released(self, model: str, timeout: float) -> None:
        """Return at the next release on ``model``, or after ``timeout``."""
        watcher = asyncio.get_running_loop().create_future()
        self._watchers.setdefault(model, []).append(watcher)
        try:
            await asyncio.wait({watcher}, timeout=timeout)
        finally:
            watchers = self._watchers.get(model, [])
            if watcher in watchers:
                watchers.remove(watcher)

    def pending(self) -> list[Waiter]:
        return [w for w in self.queue if not w.future.done()]

    def next_model(self) -> str | None:
        """The model whose request has waited longest."""
        pending = self.pending()
        return pending[0].lease.model if pending else None

    def by_model(self) -> dict[str, dict[str, Any]]:
        """Per model with requests waiting: how many, how long the oldest has waited, since when (epoch s)."""
        view: dict[str, dict[str, Any]] = {}
        now = time.monotonic()
        for waiter in self.pending():  # oldest first
            entry = view.setdefault(waiter.lease.model, {
                "waiting": 0, "oldest_wait_s": round(now - waiter.since, 1), "oldest_since": waiter.since_wall})
            entry["waiting"] += 1
        return view


# The orchestrator's side, mixed into ``Orchestrator`` ------------------------------------------------
class TrafficControl:
    """Admission, queue scheduling, drain and the per-actor limit on engine starts."""

    # Admission ----------------------------------------------------------------------------------
    async def admit(self: Orchestrator, lease: Lease, *, queue: bool) -> None:
        """Admit ``lease`` now (its model runs and is not draining), else queue it when ``queue`` is set,
        else refuse with a 409 that says what runs and how to switch."""
        state = self.check_model(lease.model)
        if self._admit_now(lease, state):
            return
        if not queue or self.closing:
            raise self._refusal(state)
        waiter = Waiter(lease, asyncio.get_running_loop().create_future())
        self.traffic.queue.append(waiter)
        log.info("%s: request from %s queued (%d waiting)", lease.model, lease.actor,
                 self.traffic.by_model()[lease.model]["waiting"])
        self.changed()
        self.kick_queue()
        limit = self.config.server.queue_timeout_s
        try:
            async with asyncio.timeout(limit):
                await waiter.future
        except TimeoutError:
            why = self._queue_reason(state)
            log.info("%s: request from %s left the queue after %.0f s (%s)", lease.model, lease.actor, limit, why)
            raise QueueTimeout(f"{state.spec.name} did not become available within queue_timeout_s = {limit:g} s: "
                               f"{why}.", model=lease.model, retry_after_seconds=self._retry_after()) from None
        finally:
            if waiter in self.traffic.queue:
                self.traffic.queue.remove(waiter)
                self.changed()

    def _admit_now(self: Orchestrator, lease: Lease, state: ModelState) -> bool:
        """The gate: "is it serving" and "count it" in one step."""
        if (state.status is not S.RUNNING or state.engine is None or state.id in self.traffic.draining
                or self.closing):
            return False
        if lease.admit(state.engine.base_url, state.engine.auth_headers):
            self.traffic.count(lease)
            state.last_used = time.time()  # a model in use is a recently used one (LRU strategy)
        return True

    def lease_released(self: Orchestrator, lease: Lease) -> None:
        self.traffic.uncount(lease)

    def _refusal(self: Orchestrator, state: ModelState) -> SmartswitchError:
        if self.closing:
            return ModelUnavailable("The server is shutting down.", model=state.id)
        running = [mid for mid, s in self.models.items() if s.status is S.RUNNING and mid not in self.traffic.draining]
        names = ", ".join(running) or "none"
        how = (f"Switch to it first: POST /v1/models/switch {{\"target_model\": \"{state.id}\"}}, or pick it in "
               "the dashboard.")
        if state.status is S.RUNNING:
            what = f"{state.id} is about to be unloaded or put to sleep and takes no new requests"
        elif state.status is S.LOADING:
            what = f"{state.id} is loading"
        else:
            what = f"{state.id} is not running"
        return ModelNotRunning(f"{what} (running: {names}). {how}", requested_model=state.id,
                               running_model=self.active, running_models=running)

    def _queue_reason(self: Orchestrator, state: ModelState) -> str:
        op = self.op
        if op is not None and op.running:
            names = {mid: s.spec.name for mid, s in self.models.items()}
            return f"{op.describe(names)} was still in progress"
        if state.status is S.FAILED:
            return f"it failed: {state.error}"
        return f"it is {state.status}"

    def _retry_after(self: Orchestrator) -> int:
        op = self.op
        eta = op.last.eta_seconds if op is not None and op.last is not None else None
        return max(5, int(eta or 30))

    # The scheduler ------------------------------------------------------------------------------
    def kick_queue(self: Orchestrator) -> None:
        """Look at the queue once the current step is done (many kicks in one step cost one pass)."""
        if self.traffic.kick_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.traffic.kick_pending = True
        loop.call_soon(self._serve_queue)

    def _serve_queue(self: Orchestrator) -> None:
        t = self.traffic
        t.kick_pending = False
        if not t.queue:
            return
        if self.closing:
            self._fail_waiters(None, lambda _: ModelUnavailable("The server is shutting down."))
            return
        served = 0
        for waiter in t.pending():  # first what the serving models can take, oldest first
            if self._admit_now(waiter.lease, self.models[waiter.lease.model]):
                waiter.future.set_result(None)
                served += 1
        if served:
            t.queue = t.pending()
            self.changed()
        target = t.next_model()
        if target is None or t.starting is not None or (self.op is not None and self.op.running):
            return  # nothing to load, or the slot is busy: its end kicks the queue again
        actor = self._charge_queue_switch(target)
        if actor is None:
            self.kick_queue()  # its waiters were refused (rate limit): the next model may go
            return
        t.starting = target
        self.spawn(self._queue_switch(target, actor), f"queue-switch-{target}")

    def _charge_queue_switch(self: Orchestrator, target: str) -> str | None:
        """The actor a queue-started switch is charged to: the longest-waiting one still within its limit.
        When every waiting actor is over its limit, their requests get the 429."""
        refused: dict[str, RateLimited] = {}
        for waiter in self.traffic.pending():
            actor = waiter.lease.actor
            if waiter.lease.model != target or actor in refused:
                continue
            try:
                self.charge(actor, "switch", target)
                return actor
            except RateLimited as exc:
                refused[actor] = exc
        self._fail_waiters(target, lambda waiter: refused[waiter.lease.actor])
        return None

    async def _queue_switch(self: Orchestrator, target: str, actor: str) -> None:
        try:
            # never supersedes: when something took the slot meanwhile, the queue waits for its end
            switch_id = await self.switch(target, actor, only_if_free=True)
            op = self.op
            if op is not None and op.id == switch_id and op.target == target and op.kind is OpKind.SWITCH:
                self.traffic.switches.add(switch_id)
                log.info("queue: switch to %s for the request of %s waiting longest (%s)", target, actor, switch_id)
        except SmartswitchError as exc:  # refused (shutting down): the shutdown fails the queue
            log.info("queue: switch to %s not started: %s", target, exc.message)
        finally:
            self.traffic.starting = None
            self.kick_queue()

    def _fail_waiters(self: Orchestrator, model: str | None,
                      error: Callable[[Waiter], SmartswitchError]) -> None:
        t = self.traffic
        for waiter in t.pending():
            if model is None or waiter.lease.model == model:
                waiter.future.set_exception(error(waiter))
        t.queue = t.pending()
        self.changed()

    def on_traffic_event(self: Orchestrator, event: Event) -> None:
        """Status changes move the queue on; a queue-started switch that fails ends its requests."""
        if isinstance(event, StatusEvent):
            if self.traffic.queue:
                self.kick_queue()
            self._cut_failed()
            return
        if not is_terminal(event) or event.switch_id not in self.traffic.switches:
            return
        self.traffic.switches.discard(event.switch_id)
        model = event.target_model
        name = self.models[model].spec.name if model in self.models else model
        if isinstance(event, ErrorEvent):
            kind = InsufficientMemory if event.error == "insufficient_memory" else ModelUnavailable
            self._fail_waiters(model, lambda _: kind(f"{name} could not be loaded: {event.message}", model=model))
        elif isinstance(event, CancelledEvent) and event.superseded_by is None and not self.closing:
            self._fail_waiters(model, lambda _: ModelUnavailable(f"The load of {name} was cancelled.", model=model))
        self.kick_queue()

    def _cut_failed(self: Orchestrator) -> None:
        """Requests on a model that failed while serving end now, with its error (not at a read timeout)."""
        for model, leases in self.traffic.leases.items():
            state = self.models[model]
            if leases and state.status is S.FAILED:
                for lease in list(leases):
                    lease.cut(state.error or f"{state.spec.name} stopped answering.")

    # Drain ----------------------------------------------------------------------------------------
    def begin_drain(self: Orchestrator, models: list[str]) -> None:
        """These models take no new requests from now on (their in-flight ones go on)."""
        fresh = [m for m in models if m not in self.traffic.draining and self.models[m].status is S.RUNNING]
        self.traffic.draining.update(fresh)
        if fresh:
            self.changed()

    def end_drain(self: Orchestrator, models: list[str]) -> None:
        """Stopped, asleep, or the stop was called off: the models' gate follows their status again."""
        if any(m in self.traffic.draining for m in models):
            self.traffic.draining.difference_update(models)
            self.kick_queue()

    async def drain(self: Orchestrator, state: ModelState, cause: str, *, to_sleep: bool = False) -> None:
        """Take no new requests for ``state``, then wait for those in flight, for up to ``drain_timeout_s``;
        past it they are cut (each holder ends its reply with the explicit error) and the stop goes ahead."""
        t = self.traffic
        self.begin_drain([state.id])
        limit = self.config.switching.drain_timeout_s
        deadline = time.monotonic() + limit
        shown = -1
        while (live := t.live(state.id)) and state.status is S.RUNNING:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if len(live) != shown:
                log.info("%s: waiting for %d request(s) to finish before the %s", state.id, len(live), cause)
                shown = len(live)
            self._show_drain(state, len(live), left)
            await t.released(state.id, min(left, DRAIN_TICK_S))
        live = t.live(state.id)
        if live and state.status is S.RUNNING:
            verb = "put to sleep" if to_sleep else "unloaded"
            reason = (f"{state.spec.name} is being {verb} ({cause}): this reply was cut after waiting "
                      f"drain_timeout_s = {limit:g} s for it to finish.")
            log.warning("%s: %d request(s) still in flight after %g s: cut", state.id, len(live), limit)
            for lease in live:
                lease.cut(reason)
            grace = time.monotonic() + CUT_GRACE_S
            while t.live(state.id) and time.monotonic() < grace:
                await t.released(state.id, grace - time.monotonic())
        t.forget(state.id)  # what is left can never finish: it must not hold up the model's next drain

    def _show_drain(self: Orchestrator, state: ModelState, count: int, left: float) -> None:
        op = self.op
        if op is not None and op.running and op.kind is OpKind.SWITCH and op.progress is not None:
            plural = "request" if count == 1 else "requests"
            self.tick(op, f"Waiting for {count} {plural} to finish on {state.spec.name} (at most {left:.0f} s)")

    # The one limit on engine starts -------------------------------------------------------------
    def charge(self: Orchestrator, actor: str, action: str, target: str | None) -> None:
        """Count one engine start against ``actor`` (an API key or a dashboard user); 429 past the limit."""
        if not actor.startswith(LIMITED_ACTORS):
            return
        retry = self.limiter.check(actor)
        if retry is None:
            return
        self.audit(actor, action, target, "rate_limited", {"retry_after": retry})
        log.info("%s %s by %s: rate limited (retry in %d s)", action, target or "", actor, retry)
        raise self.limiter.refusal(retry)

    async def charged_switch(self: Orchestrator, target: str, actor: str) -> str:
        """A switch asked by a person or a script: charged to its actor, then started (or joined)."""
        self.check_model(target)
        self.charge(actor, "switch", target)
        return await self.switch(target, actor)

    async def charged_load(self: Orchestrator, model_id: str, actor: str) -> None:
        """A model-manager load: charged when it would start an engine."""
        state = self.check_model(model_id)
        if state.status not in (S.RUNNING, S.LOADING, S.SLEEPING):
            self.charge(actor, "load", model_id)
        await self.load(model_id, actor)
