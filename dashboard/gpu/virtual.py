"""A virtual GPU of configured size: used memory is what the running (sim) engines declare.

It also keeps a ledger, a directory with one file per process that still holds memory after its
engine stopped (named by pid, holding GB). That is how a stop that leaves memory held looks here:
the entry counts as used, attributed to no model, until that process is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dashboard.engines.process import pid_alive
from dashboard.engines.sim import LEDGER_ENV
from dashboard.gpu.base import EngineMemory, GpuReading

__all__ = ["LEDGER_ENV", "VirtualGpu"]


class VirtualGpu:
    source = "virtual"

    def __init__(self, total_gb: float, name: str = "Virtual GPU", ledger_dir: Path | None = None) -> None:
        self.total_gb = total_gb
        self.name = name
        self.ledger_dir = ledger_dir
        if ledger_dir is not None:
            ledger_dir.mkdir(parents=True, exist_ok=True)

    def held_gb(self) -> float:
        """Memory still held by processes whose engine has stopped."""
        if self.ledger_dir is None:
            return 0.0
        held = 0.0
        for entry in self.ledger_dir.iterdir():
            try:
                if entry.name.isdigit() and pid_alive(int(entry.name)):
                    held += float(entry.read_text())
                    continue
                entry.unlink()  # the holder is gone: the driver has the memory back
            except (OSError, ValueError):
                continue
        return held

    def read(self, engines: Sequence[EngineMemory]) -> GpuReading:
        per_model = {e.model_id: e.declared_gb for e in engines if e.declared_gb > 0}
        return GpuReading(self.source, self.total_gb, sum(per_model.values()) + self.held_gb(), per_model, self.name)

