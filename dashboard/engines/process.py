"""Engines as local processes: own process group, output to a log file we tail, TERM then KILL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from dashboard.config import ModelSpec
from dashboard.engines.base import Engine

VLLM_PYTHON_ENV = "SMARTSWITCH_VLLM_PYTHON"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_args(spec: ModelSpec, port: int, *, host: str = "127.0.0.1",
                gpu_total_gb: float | None = None) -> list[str]:
    """The engine's arguments (after its program): they name the model id, so ``ps`` tells engines apart."""
    if spec.engine == "sim":
        args = ["--model-id", spec.id, "--host", host, "--port", str(port), "--size-gb", f"{spec.size_gb:g}",
                "--gpu-memory-gb", f"{spec.gpu_memory_gb:g}"]
        if spec.sleep:
            args.append("--sleep-mode")
        return [*args, *spec.args]
    args = ["--model", spec.path, "--served-model-name", spec.id, "--host", host, "--port", str(port)]
    if spec.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if gpu_total_gb and "--gpu-memory-utilization" not in spec.args:
        # vLLM takes a share of the whole GPU: give it exactly the planned footprint.
        share = min(spec.gpu_memory_gb / gpu_total_gb, 0.95)
        args += ["--gpu-memory-utilization", f"{share:.3f}"]
    if spec.sleep:
        args.append("--enable-sleep-mode")
    return [*args, *spec.args]


def engine_command(spec: ModelSpec, port: int, *, gpu_total_gb: float | None = None) -> list[str]:
    """The local command line that serves ``spec`` on 127.0.0.1."""
    if spec.engine == "sim":
        program = [sys.executable, "-m", "dashboard.engines.sim"]
    else:
        program = [os.environ.get(VLLM_PYTHON_ENV, sys.executable), "-m", "vllm.entrypoints.openai.api_server"]
    return [*program, *engine_args(spec, port, gpu_total_gb=gpu_total_gb)]


def engine_env(spec: ModelSpec, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {}), **dict(spec.env), "PYTHONUNBUFFERED": "1"}
    if spec.engine == "vllm":
        env.setdefault("HF_HUB_OFFLINE", "1")
        if spec.sleep:
            env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep and /wake_up are dev routes
    return env


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name: state, ppid, pgrp, ... (None once the pid is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def group_pids(pgid: int) -> tuple[int, ...]:
    """Live pids whose process group is ``pgid`` (the engine and all its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return tuple(pids)


def pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class ProcessEngine(Engine):
    """A local engine process (``vllm serve`` or the sim) in its own session."""

    runtime = "process"

    def __init__(self, spec: ModelSpec, port: int, log_dir: Path, *, command: list[str] | None = None,
                 gpu_total_gb: float | None = None, pid: int | None = None, env: dict[str, str] | None = None,
                 **kwargs: float) -> None:
        super().__init__(spec, port, **kwargs)
        self.env = env or {}
        self.command = command or engine_command(spec, port, gpu_total_gb=gpu_total_gb)
        self.log_path = log_dir / f"{spec.id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = pid
        self._read_pos = 0

    @property
    def ref(self) -> str:
        return str(self.pid)

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A log file, not a pipe: the engine keeps running (and logging) if we restart.
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=engine_env(self.spec, self.env),
                                         start_new_session=True)
        self.pid = self.proc.pid

    async def _output(self, from_start: bool) -> AsyncIterator[str]:
        with open(self.log_path, encoding="utf-8", errors="replace", newline="") as log:
            if not from_start:
                log.seek(0, os.SEEK_END)
            while True:
                chunk = log.read(65536)
                self._read_pos = log.buffer.tell() if hasattr(log, "buffer") else 0
                if chunk:
                    yield chunk
                else:
                    await asyncio.sleep(0.05)

    async def _output_caught_up(self) -> None:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                if self._read_pos >= self.log_path.stat().st_size:
                    return
            except OSError:
                return
            await asyncio.sleep(0.02)

    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        # An adopted engine is not our child: check it still exists and is the same program.
        return bool(group_pids(self.pid)) and self.spec.id in pid_cmdline(self.pid)

    async def _wait_exit(self) -> int | None:
        while self.alive():
            await asyncio.sleep(0.1)
        return self.proc.returncode if self.proc is not None else None

    def pids(self) -> tuple[int, ...]:
        return group_pids(self.pid) if self.pid is not None else ()

    async def _terminate(self, timeout: float) -> None:
        if self.pid is None:
            return
        for sig_, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig_)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while group_pids(self.pid) and time.monotonic() < deadline:
                if self.proc is not None:
                    self.proc.poll()  # reap the leader so it does not linger as a zombie
                await asyncio.sleep(0.05)
            if not group_pids(self.pid):
                break
        if self.proc is not None:
            self.proc.poll()
