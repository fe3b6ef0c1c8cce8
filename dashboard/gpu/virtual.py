"""A virtual GPU of configured devices: used memory is what the running (sim) engines declare, per device.

It keeps a ledger, a directory with one file per process that books memory, named by its pid (see
``dashboard.engines.sim.book``): a sim engine books its footprint on the devices it was given
(``CUDA_VISIBLE_DEVICES``), which is how a test reads where each model really sits; a process that still
holds memory after its engine stopped books it as ``held``, counted as used and attributed to no model
until that process is gone. An entry whose process is gone is removed: the driver has the memory back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dashboard.engines.process import pid_alive
from dashboard.engines.sim import LEDGER_ENV
from dashboard.gpu.base import DeviceReading, EngineMemory, GpuReading, combined

__all__ = ["LEDGER_ENV", "LedgerEntry", "VirtualGpu", "read_ledger"]


@dataclass(frozen=True)
class LedgerEntry:
    """One live process's booking: GB per device; ``held`` when its engine has stopped."""

    pid: int
    model_id: str
    per_device: dict[int, float]
    held: bool


def parse_entry(pid: int, text: str) -> LedgerEntry:
    """A ledger file's content: JSON ``{"model", "held", "devices": {"0": gb}}``, or a bare number (the
    older form: GB held on device 0)."""
    text = text.strip()
    if not text.startswith("{"):
        return LedgerEntry(pid, "", {0: float(text)}, True)
    data = json.loads(text)
    devices = {int(k): float(v) for k, v in dict(data.get("devices") or {}).items()}
    return LedgerEntry(pid, str(data.get("model") or ""), devices, bool(data.get("held", False)))


def read_ledger(ledger_dir: Path) -> list[LedgerEntry]:
    """Live entries of the ledger; entries of processes that are gone are removed on the way."""
    entries = []
    for entry in ledger_dir.iterdir():
        try:
            if not entry.name.isdigit():
                continue
            if not pid_alive(int(entry.name)):
                entry.unlink()
                continue
            entries.append(parse_entry(int(entry.name), entry.read_text()))
        except (OSError, ValueError):  # written this instant, or removed meanwhile: next reading sees it
            continue
    return entries


class VirtualGpu:
    source = "virtual"

    def __init__(self, total_gb: float, name: str = "Virtual GPU", ledger_dir: Path | None = None,
                 devices_gb: Sequence[float] | None = None) -> None:
        self.devices_gb = tuple(devices_gb) if devices_gb else (total_gb,)
        self.total_gb = sum(self.devices_gb)
        self.name = name
        self.ledger_dir = ledger_dir
        if ledger_dir is not None:
            ledger_dir.mkdir(parents=True, exist_ok=True)

    def ledger(self) -> list[LedgerEntry]:
        return read_ledger(self.ledger_dir) if self.ledger_dir is not None else []

    def held_gb(self) -> float:
        """Memory still held by processes whose engine has stopped."""
        return sum(sum(e.per_device.values()) for e in self.ledger() if e.held)

    def read(self, engines: Sequence[EngineMemory]) -> GpuReading:
        entries = self.ledger()
        # Where a model sits is what its engine booked (the sim knows its CUDA_VISIBLE_DEVICES); how much is
        # what the orchestrator declares for it (a sleeper keeps a residual), split evenly over those devices.
        booked = {e.model_id: tuple(sorted(e.per_device)) for e in entries if not e.held and e.model_id}
        count = len(self.devices_gb)
        models: list[dict[str, float]] = [{} for _ in range(count)]
        held = [0.0] * count
        for engine in engines:
            if engine.declared_gb <= 0:
                continue
            where = [d for d in booked.get(engine.model_id) or engine.devices or (0,) if 0 <= d < count] or [0]
            for index in where:
                models[index][engine.model_id] = engine.declared_gb / len(where)
        tracked = {e.model_id for e in engines}
        for entry in entries:
            # A booking no engine of ours accounts for (held after a stop, or a stray engine) is used memory.
            if entry.held or entry.model_id not in tracked:
                for index, gb in entry.per_device.items():
                    held[min(max(index, 0), count - 1)] += gb
        devices = [DeviceReading(i, total, sum(models[i].values()) + held[i], models[i], self.name)
                   for i, total in enumerate(self.devices_gb)]
        return combined(self.source, devices, self.name if count == 1 else "")
