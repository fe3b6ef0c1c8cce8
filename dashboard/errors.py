"""Errors a caller can act on, each with a stable code and the HTTP status the API answers with."""

from __future__ import annotations

from typing import Any


class SmartswitchError(Exception):
    code = "error"
    http_status = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details}


class UnknownModel(SmartswitchError):
    code = "unknown_model"
    http_status = 404

    def __init__(self, model_id: str, known: list[str]) -> None:
        super().__init__(f"Unknown model {model_id!r}. Known models: {', '.join(known)}.",
                         model=model_id, available_models=known)


class Conflict(SmartswitchError):
    code = "conflict"
    http_status = 409


class SwitchInProgress(Conflict):
    code = "switch_in_progress"


class ModelNotRunning(Conflict):
    code = "model_not_running"


class InsufficientMemory(Conflict):
    code = "insufficient_memory"


class EngineFailed(SmartswitchError):
    """An engine died, stalled or reported a fatal error while loading."""

    code = "engine_failed"
    http_status = 502


class OperationInProgress(Conflict):
    """Another operation holds the orchestrator's one operation slot."""

    code = "operation_in_progress"


class DataDirError(SmartswitchError):
    """The data dir (or its database) cannot be used: in use by another server, corrupt, read-only."""

    code = "data_dir_error"
    http_status = 500


class BookkeepingError(SmartswitchError):
    """A write to the history database failed after its retries."""

    code = "bookkeeping_failed"
    http_status = 503
