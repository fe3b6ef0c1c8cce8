"""Typed signals an engine emits while it starts and serves (parsed logs, health, exit)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class LoadStarted:
    """The engine began loading the model (``Starting to load model ...``)."""


@dataclass(frozen=True)
class CheckpointSize:
    """Size of the checkpoint about to be read (``Checkpoint size: 12.34 GiB``)."""

    bytes_total: int


@dataclass(frozen=True)
class ShardProgress:
    """``Loading safetensors checkpoint shards: 40% Completed | 4/10``."""

    done: int
    total: int


@dataclass(frozen=True)
class WeightsLoaded:
    """``Loading weights took 0.01 seconds``."""

    seconds: float


@dataclass(frozen=True)
class ModelMemory:
    """``Model loading took X GiB memory and Y seconds``: the weights' real footprint."""

    gib: float


@dataclass(frozen=True)
class KVCache:
    """``Available KV cache memory: X GiB`` or ``GPU/CPU KV cache size: N tokens``."""

    gib: float | None = None
    tokens: int | None = None


@dataclass(frozen=True)
class GraphCapture:
    """``Capturing CUDA graphs`` (finished=False) / ``Graph capturing finished`` (True)."""

    finished: bool
    gib: float | None = None


@dataclass(frozen=True)
class EngineInitialized:
    """``init engine (profile, create kv cache, warmup model) took N s``."""

    seconds: float


@dataclass(frozen=True)
class ServerUp:
    """``Starting vLLM server on ...`` or uvicorn's ``Application startup complete.``"""


@dataclass(frozen=True)
class Milestone:
    """A log statement (process and source location) seen for the first time in this start.

    Its place in past loads of the same model anchors the ETA: vLLM prints dozens of these, most of
    them long before the load phases the other signals name.
    """

    key: str


@dataclass(frozen=True)
class Ready:
    """``/health`` answered 200 after the server came up."""


@dataclass(frozen=True)
class EngineError:
    """A line that names why the engine cannot go on (OOM, validation error, ...)."""

    message: str


@dataclass(frozen=True)
class SleepState:
    """``/is_sleeping`` changed without the orchestrator asking: someone slept or woke the engine directly."""

    asleep: bool


@dataclass(frozen=True)
class Exited:
    """The engine process (or container) ended."""

    returncode: int | None
    last_lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stalled:
    """No output and no readiness for ``seconds``."""

    seconds: float


EngineSignal = (
    LoadStarted
    | CheckpointSize
    | ShardProgress
    | WeightsLoaded
    | ModelMemory
    | KVCache
    | GraphCapture
    | EngineInitialized
    | ServerUp
    | Milestone
    | Ready
    | EngineError
    | SleepState
    | Exited
    | Stalled
)
