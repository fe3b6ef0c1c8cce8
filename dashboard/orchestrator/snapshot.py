"""The status snapshot (``GET /v1/models/status``) as a pure function of the orchestrator's state."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from dashboard.config import Config
from dashboard.gpu.base import GpuReading
from dashboard.orchestrator.operations import WITH_PROGRESS, Operation, OpKind
from dashboard.orchestrator.states import ModelState, ModelStatus


def model_entry(state: ModelState, reading: GpuReading, pinned: bool, expected_s: float,
                op: Operation | None, warm: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": state.id,
        "name": state.spec.name,
        "status": state.status.value,
        "health": state.health,
        "size_gb": state.spec.size_gb,
        "load_progress": 100 if state.status is ModelStatus.RUNNING else 0,
        "estimated_load_time_seconds": round(expected_s, 1),
        "pinned": pinned,
        "warm": warm,  # pre-warmed (loaded or woken before anyone asked) and not used by a person yet
        "sleep_capable": state.spec.sleep,
        "engine": state.spec.engine,
        "runtime": state.spec.runtime,
        "error": state.error,
        "last_used": state.last_used or None,
        "tensor_parallel_size": state.spec.tensor_parallel_size,
        "gpus": list(state.devices),  # the devices it occupies now ([] when it has no engine)
    }
    if state.engine is not None:
        entry["gpu_memory_used_gb"] = round(reading.per_model.get(state.id, state.declared_gb), 2)
        entry["endpoint"] = state.engine.base_url
    else:
        entry["gpu_memory_required_gb"] = round(state.required_gb, 2)
    if (op is not None and op.target == state.id and op.last is not None and op.kind is OpKind.SWITCH
            and state.status is ModelStatus.LOADING):
        entry["load_progress"] = op.last.progress
    return entry


def operation_entry(op: Operation) -> dict[str, Any]:
    last = op.last
    return {
        "id": op.id, "kind": op.kind.value, "from_model": op.from_model, "target_model": op.target,
        "stage": op.stage, "actor": op.actor, "started_at": op.started_at,
        "progress": last.progress if last else 0,
        "eta_seconds": last.eta_seconds if last else None,
        "message": last.message if last else "",
        "bytes_loaded": last.bytes_loaded if last else None,
        "bytes_total": last.bytes_total if last else None,
        "slow": last.slow if last else False,
        "phase": last.phase if last else "",  # the load's phase (starting, loading_weights, ...): the steps
        "cancelling": op.cancelling,
        "restoring": list(op.restoring),
    }


def device_entries(reading: GpuReading) -> list[dict[str, Any]]:
    """Each device with what each model holds on it (one entry on a one-device box)."""
    return [{"index": d.index, "name": d.name or reading.name, "total_gb": round(d.total_gb, 2),
             "used_gb": round(d.used_gb, 2), "free_gb": round(d.free_gb, 2),
             "models": {m: round(gb, 2) for m, gb in d.per_model.items()}}
            for d in reading.by_device()]


def build_snapshot(config: Config, models: Mapping[str, ModelState], reading: GpuReading, *,
                   active: str | None, op: Operation | None, pinned: Collection[str],
                   expected_s: Callable[[str], float], last_switch_error: dict[str, Any] | None,
                   queue: Mapping[str, dict[str, Any]], bookkeeping_error: str | None,
                   warm: Collection[str] = (), prewarm: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a client shows; the shape is the API's contract (DESIGN.md)."""
    return {
        "models": {mid: model_entry(state, reading, mid in pinned, expected_s(mid), op, mid in warm)
                   for mid, state in models.items()},
        "gpu": {"total_memory_gb": round(reading.total_gb, 2), "used_memory_gb": round(reading.used_gb, 2),
                "available_memory_gb": round(reading.free_gb, 2),
                "per_model_gb": {k: round(v, 2) for k, v in reading.per_model.items()},
                "name": reading.name},
        "devices": device_entries(reading),
        "source": reading.source,
        "active_model": active,
        # The banner's operation: a switch, or the rollback that follows a failed or cancelled one.
        "switch": operation_entry(op) if op is not None and op.kind in WITH_PROGRESS else None,
        "operation": None if op is None else {"kind": op.kind.value, "target_model": op.target,
                                              "actor": op.actor, "started_at": op.started_at},
        "last_switch_error": last_switch_error,
        # Chat requests waiting for their model (``switch_on_request``): how many, and the oldest's wait.
        "request_queue": {mid: entry["waiting"] for mid, entry in queue.items()},
        "request_queue_detail": dict(queue),
        "strategy": config.switching.strategy,
        "confirm_before_unload": config.switching.confirm_before_unload,
        "bookkeeping_error": bookkeeping_error,
        "prewarm": prewarm,  # the pre-warmer: enabled, what it does or why not (None: not part of this server)
    }
