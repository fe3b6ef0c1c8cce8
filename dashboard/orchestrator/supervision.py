"""Engine supervision: start an engine and wait for ready, stop it, fold its signals into model states.

A failure is reported at once: an engine whose process exits while loading is ``failed`` on the
signal itself (its process group is already killed by the engine layer), not after a graceful stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from dashboard.engines import signals as sig
from dashboard.engines.base import Engine
from dashboard.errors import EngineFailed
from dashboard.orchestrator.history import EngineRecord
from dashboard.orchestrator.operations import Operation
from dashboard.orchestrator.states import ModelState, ModelStatus

if TYPE_CHECKING:
    from dashboard.orchestrator.machine import Orchestrator

log = logging.getLogger("smartswitch.orchestrator")
TICK_S = 0.5
GIB_TO_GB = 1.073741824
S = ModelStatus


class Supervision:
    """Mixed into ``Orchestrator``: the engine side of the state machine."""

    async def start_engine(self: Orchestrator, state: ModelState, op: Operation | None, cause: str,
                           devices: tuple[int, ...] | None = None) -> None:
        """Start the model's engine on ``devices`` (the plan's set; else placed where it fits now) and wait
        until it is ready; raises EngineFailed (the model is then failed)."""
        devices = devices or self.placement_for(state)
        log.info("%s: starting on GPU(s) %s (%s)", state.id, ", ".join(map(str, devices)), cause)
        engine = self.engine_factory(state.spec, None, None, devices)
        self.remember_placement(state, devices)
        self.transition(state, S.LOADING, cause)
        state.engine, state.fatal_lines, state.signal_gb = engine, [], {}
        state.ready = asyncio.get_running_loop().create_future()
        # The intent first: if the server dies between spawn and record, the engine's marker still
        # names this data dir and the next start sweeps it.
        self.history.save_engine(EngineRecord(state.id, engine.runtime, "pending", engine.port,
                                              state.required_gb, time.time()))
        try:
            await engine.start()
        except Exception as exc:
            state.engine = None
            self.history.forget_engine(state.id)
            message = f"{state.spec.name} could not start: {exc}"
            self.transition(state, S.FAILED, "engine could not start", error=message)
            raise EngineFailed(message) from exc
        self.history.save_engine(EngineRecord(state.id, engine.runtime, engine.ref, engine.port,
                                              state.required_gb, time.time()))
        state.supervisor = self.spawn(self._supervise(state, engine), f"supervise-{state.id}")
        self.changed()
        ready = state.ready
        while True:
            done, _ = await asyncio.wait({ready}, timeout=TICK_S)
            if done:
                break
            if op is not None:
                self.tick(op)
        ready.result()

    async def stop_engine(self: Orchestrator, state: ModelState, cause: str) -> None:
        """Drain the model (no new requests; those in flight finish, for up to ``drain_timeout_s``), then stop
        its engine gracefully (TERM, then KILL after ``stop_timeout_s``); it ends stopped."""
        if state.status is S.RUNNING and state.engine is not None and not state.stopping:
            try:  # still running while it drains: called off (superseded), it simply goes on serving
                await self.drain(state, cause)
            except BaseException:
                self.end_drain([state.id])
                raise
        engine = state.engine
        if engine is None or state.stopping:
            while state.stopping:  # someone else is stopping it: wait for that
                await asyncio.sleep(0.05)
            self.end_drain([state.id])
            return
        state.stopping = True
        try:
            if state.status is not S.UNLOADING:
                self.transition(state, S.UNLOADING, cause)
            # Shielded: an operation cancelled mid-stop must not leave a half-stopped engine behind.
            await asyncio.shield(engine.stop(self.config.switching.stop_timeout_s))
        finally:
            self._forget(state)
            state.stopping = False
            self.end_drain([state.id])
        if state.status is S.UNLOADING:
            self.transition(state, S.STOPPED, "engine stopped")
        await self.refresh_gpu()
        self.changed()

    async def discard_engine(self: Orchestrator, state: ModelState) -> None:
        """Kill a failed or abandoned engine at once (nothing in it is worth a graceful stop)."""
        engine = state.engine
        if engine is None:
            return
        state.stopping = True
        try:
            await asyncio.shield(engine.kill())
        finally:
            self._forget(state)
            state.stopping = False
        await self.refresh_gpu()
        self.changed()

    async def let_go(self: Orchestrator, state: ModelState) -> None:
        """Stop watching an engine and leave it serving, for the next start to adopt."""
        if state.engine is not None:
            if state.supervisor is not None:
                state.supervisor.cancel()
            await state.engine.detach()

    def _forget(self: Orchestrator, state: ModelState) -> None:
        if state.supervisor is not None:
            state.supervisor.cancel()
        if state.ready is not None and not state.ready.done():
            state.ready.cancel()
        state.engine, state.supervisor = None, None
        self.history.forget_engine(state.id)

    async def _supervise(self: Orchestrator, state: ModelState, engine: Engine) -> None:
        while True:
            signal = await engine.queue.get()
            try:
                self.on_signal(state, engine, signal)
            except Exception:  # one bad signal must not end supervision of a live engine
                log.exception("%s: signal %r could not be handled", state.id, signal)
            if isinstance(signal, sig.Exited):
                return

    def on_signal(self: Orchestrator, state: ModelState, engine: Engine, signal: sig.EngineSignal) -> None:
        if state.engine is not engine or state.stopping:
            return  # an engine we are stopping: its exit is expected
        op = self.op
        if op is not None and op.loading == state.id and op.progress is not None and op.running:
            phase = op.progress.phase
            op.progress.on_signal(signal, time.monotonic())
            if isinstance(signal, sig.ShardProgress | sig.CheckpointSize) or op.progress.phase != phase:
                self.tick(op)  # real signals show at once, not on the next half-second tick
        match signal:
            case sig.ModelMemory(gib=gib):
                state.signal_gb["weights"] = gib * GIB_TO_GB
            case sig.KVCache(gib=float() as gib):
                state.signal_gb["kv_cache"] = gib * GIB_TO_GB
            case sig.GraphCapture(finished=True, gib=float() as gib):
                state.signal_gb["graphs"] = gib * GIB_TO_GB
            case sig.EngineError(message=message):
                if state.status is S.LOADING:
                    if message not in state.fatal_lines:
                        state.fatal_lines.append(message)
                elif state.status is S.RUNNING:
                    self.transition(state, S.FAILED, "health checks failed",
                                    error=f"{state.spec.name} is not answering: {message}")
            case sig.Ready():
                if state.status is S.LOADING:
                    self._became_ready(state)
            case sig.SleepState(asleep=asleep):
                self._sleep_state_seen(state, engine, asleep)
            case sig.Stalled(seconds=seconds):
                self._fail_load(state, EngineFailed(f"{state.spec.name} stalled: no output for {seconds:g} s.",
                                                    error="engine_stalled"))
            case sig.Exited(returncode=code):
                self._exited(state, engine, code, signal.last_lines)

    def _exited(self: Orchestrator, state: ModelState, engine: Engine, code: int | None,
                last_lines: tuple[str, ...]) -> None:
        # The engine's own words: its first fatal lines, else its last meaningful ones.
        why = "; ".join(state.fatal_lines[:3]) or " | ".join(last_lines[-3:]) or "no output"
        was = state.status
        state.engine, state.supervisor = None, None
        self.history.forget_engine(state.id)
        # Its main process is gone: stop its watchers and remove what is left (a container, stray workers).
        self.spawn(engine.kill(), f"remove-{state.id}")
        self.spawn(self.refresh_and_publish(), "gpu-refresh-after-exit")
        if was is S.LOADING:
            message = f"{state.spec.name} exited with code {code} while loading: {why}"
            self.transition(state, S.FAILED, "engine exited while loading", error=message)
            self._fail_load(state, EngineFailed(message, error="engine_failed"))
            return
        message = f"{state.spec.name} exited unexpectedly (code {code}): {why}"
        if was is S.FAILED:
            state.error = message  # the exit explains more than the failed health checks before it
        else:
            self.transition(state, S.FAILED, f"engine exited while {was}", error=message)
        self.changed()
        self.audit("orchestrator", "engine_exit", state.id, "failed", {"returncode": code, "message": why})

    def _sleep_state_seen(self: Orchestrator, state: ModelState, engine: Engine, asleep: bool) -> None:
        """The engine slept or woke without our asking (vLLM's sleep routes take no key): show what is true."""
        if asleep and state.status is S.RUNNING:
            log.warning("%s: its engine is asleep, though nobody here put it to sleep", state.id)
            self.transition(state, S.SLEEPING, "engine: found asleep (put to sleep outside smartswitch)")
        elif not asleep and state.status is S.SLEEPING:
            if self.op is not None and self.op.running:
                # An operation may be about to wake it itself: ask again once the slot is free.
                engine.asleep = None
                return
            log.warning("%s: its engine is awake, though nobody here woke it", state.id)
            state.last_used = time.time()
            self.transition(state, S.RUNNING, "engine: found awake (woken outside smartswitch)")
            if self.active is None:
                self.active = state.id
                self.save_desired()
        else:
            return  # what we show already
        self.audit("orchestrator", "engine_asleep" if asleep else "engine_awake", state.id, "detected",
                   {"message": "changed outside smartswitch (its sleep routes are open on 127.0.0.1)"})
        self.spawn(self.refresh_and_publish(), "gpu-refresh-after-sleep-change")

    def _fail_load(self: Orchestrator, state: ModelState, exc: EngineFailed) -> None:
        if state.ready is not None and not state.ready.done():
            state.ready.set_exception(exc)

    def _became_ready(self: Orchestrator, state: ModelState) -> None:
        state.last_used = time.time()
        measured, source = self.reading.per_model.get(state.id), "nvml"
        if self.gpu.source != "nvml" or not measured:
            measured, source = sum(state.signal_gb.values()) or None, "engine_logs"
        if measured:
            state.measured_gb = round(measured, 1)
            self.history.record_memory(state.id, state.measured_gb, source, devices=len(state.devices) or 1)
        self.transition(state, S.RUNNING, "engine ready")
        if self.active is None:
            self.active = state.id
            self.save_desired()
        self.spawn(self.refresh_and_publish(), "gpu-refresh-after-ready")
        if state.ready is not None and not state.ready.done():
            state.ready.set_result(None)
