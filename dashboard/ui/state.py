"""What one dashboard session knows, as param state (no widgets): refreshed from status snapshots."""

from __future__ import annotations

import time
from typing import Any, Protocol

import param

from dashboard.orchestrator.states import ModelStatus

S = ModelStatus
# The order of a status table (the notebook's): what serves first, then what is changing, then the rest.
STATUS_ORDER = {status: rank for rank, status in enumerate(
    (S.RUNNING, S.LOADING, S.UNLOADING, S.SLEEPING, S.FAILED, S.STOPPED))}
MEMORY_HISTORY = 600  # points kept for the memory plot (5 minutes at 0.5 s)


class Backend(Protocol):
    """The orchestrator as the UI sees it: the in-process port or a remote client share this shape."""

    def status(self) -> dict[str, Any]: ...
    def plan(self, target: str) -> dict[str, Any]: ...
    def switch(self, target: str, actor: str) -> str: ...
    def cancel(self, actor: str) -> bool: ...


class DashboardState(param.Parameterized):
    """One session's view of the orchestrator; views bind to these parameters."""

    models = param.List(default=[], doc="Every catalog model as a status row, in catalog order ('order').")
    active_model = param.String(default=None, allow_None=True, doc="The running model chat goes to.")
    selected_model = param.String(default=None, allow_None=True, doc="The model this user picked.")

    switching = param.Boolean(default=False, doc="A switch is running (in any tab).")
    switch_from = param.String(default=None, allow_None=True, doc="Model active when the switch began.")
    switch_target = param.String(default=None, allow_None=True, doc="Model being loaded.")
    stage = param.String(default="", doc="checking_memory, unloading_models, loading_target, rolling_back.")
    stage_message = param.String(default="", doc="What is happening now, in words.")
    phase = param.String(default="", doc="The load's phase: starting, loading_weights, initializing, warming_up.")
    progress = param.Integer(default=0, bounds=(0, 100), doc="Overall percent, never decreasing.")
    eta_s = param.Number(default=None, allow_None=True, doc="Seconds remaining, from history.")
    bytes_loaded = param.Integer(default=None, allow_None=True, doc="Checkpoint bytes read so far.")
    bytes_total = param.Integer(default=None, allow_None=True, doc="Checkpoint size when known.")
    slow = param.Boolean(default=False, doc="The load is slower than expected.")

    error = param.Dict(default=None, allow_None=True, doc="The last failed switch (code, message, figures).")

    gpu_total_gb = param.Number(default=0.0, doc="GPU memory in all.")
    gpu_used_gb = param.Number(default=0.0, doc="GPU memory in use.")
    gpu_source = param.String(default="virtual", doc="nvml or virtual.")
    gpu_name = param.String(default="", doc="Device name(s).")
    per_model_gb = param.Dict(default={}, doc="GPU memory held by each loaded model.")
    devices = param.List(default=[], doc="Per device: index, name, total_gb, used_gb, free_gb, models {id: GB}.")
    memory_history = param.List(default=[], doc="(unix time, used GB) samples for the plot.")

    chat_locked = param.Boolean(default=True, doc="The chat input is disabled.")
    lock_reason = param.String(default="Select a model to start chatting", doc="Why the chat is locked.")

    confirm_before_unload = param.Boolean(default=False, doc="Ask before a switch that unloads models.")

    def names(self) -> dict[str, str]:
        return {m["id"]: m["name"] for m in self.models}

    def name_of(self, model_id: str | None) -> str:
        return self.names().get(model_id or "", model_id or "")

    def apply(self, snapshot: dict[str, Any], now: float | None = None) -> None:
        """Fold one status snapshot into the parameters (a single batched update)."""
        # Catalog order, never status order: a row must not move under a click (the picker groups them).
        rows = [{**m, "order": i} for i, m in enumerate(snapshot["models"].values())]
        sw = snapshot.get("switch")
        gpu = snapshot["gpu"]
        history = [*self.memory_history[-(MEMORY_HISTORY - 1):], (now or time.time(), gpu["used_memory_gb"])]
        updates: dict[str, Any] = {
            "models": rows,
            "active_model": snapshot.get("active_model"),
            "switching": sw is not None,
            "gpu_total_gb": gpu["total_memory_gb"],
            "gpu_used_gb": gpu["used_memory_gb"],
            "gpu_source": snapshot.get("source", "virtual"),
            "gpu_name": gpu.get("name", ""),
            "per_model_gb": gpu.get("per_model_gb", {}),
            "devices": snapshot.get("devices") or [],
            "memory_history": history,
            "error": snapshot.get("last_switch_error"),
            "confirm_before_unload": bool(snapshot.get("confirm_before_unload")),
        }
        if sw is not None:
            new_switch = sw["target_model"] != self.switch_target or not self.switching
            updates.update(
                switch_from=sw.get("from_model"), switch_target=sw["target_model"], stage=sw["stage"],
                stage_message=sw.get("message", ""), phase=sw.get("phase", ""),
                progress=sw["progress"] if new_switch else max(self.progress, sw["progress"]),
                eta_s=sw.get("eta_seconds"), bytes_loaded=sw.get("bytes_loaded"),
                bytes_total=sw.get("bytes_total"), slow=bool(sw.get("slow")),
            )
        else:
            updates.update(switch_target=None, switch_from=None, stage="", stage_message="", phase="", progress=0,
                           eta_s=None, bytes_loaded=None, bytes_total=None, slow=False)
        if self.selected_model is None and snapshot.get("active_model"):
            updates["selected_model"] = snapshot["active_model"]
        selected = updates.get("selected_model", self.selected_model)
        if sw is None and self.switching and snapshot["models"].get(selected or "", {}).get("status") != S.RUNNING:
            # The switch ended without loading the pick (cancelled, failed, rolled back): follow what runs.
            updates["selected_model"] = snapshot.get("active_model")
        if sw is not None:
            # A switch started anywhere (another tab, the API) is what this tab now waits for.
            updates["selected_model"] = sw["target_model"]
        updates.update(self._lock(snapshot, updates.get("selected_model", self.selected_model), sw))
        self.param.update(**updates)

    def _lock(self, snapshot: dict[str, Any], selected: str | None, sw: dict[str, Any] | None) -> dict[str, Any]:
        if selected is None:
            return {"chat_locked": True, "lock_reason": "Select a model to start chatting"}
        model = snapshot["models"].get(selected)
        name = model["name"] if model else selected
        if sw is not None:
            eta = sw.get("eta_seconds")
            target = snapshot["models"][sw["target_model"]]["name"]
            remaining = f" ({eta:.0f}s remaining)" if eta is not None else ""
            return {"chat_locked": True, "lock_reason": f"Switching to {target}...{remaining}"}
        if model is None or model["status"] != S.RUNNING:
            status = model["status"] if model else "unknown"
            why = (model or {}).get("error") or f"{name} failed"
            reason = {S.FAILED: f"{why.rstrip('.')}. Pick {name} again to restart it, or pick another model",
                      S.SLEEPING: f"{name} is asleep: pick it to wake it"}.get(
                status, f"{name} is not loaded: pick it to load it")
            return {"chat_locked": True, "lock_reason": reason}
        return {"chat_locked": False, "lock_reason": f"Message {name}"}
