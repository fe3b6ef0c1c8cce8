"""Engines as local processes: own process group, output to a log file we tail, TERM then KILL.

Identity before any signal. Every engine carries a marker in its environment (this orchestrator's
data dir and the model id), and its ``ref`` is ``pid@create_time``. A process is only ever
signalled, adopted or counted as alive once both match: a pid from the database alone may by
now belong to anything else on the machine.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import psutil

from dashboard.config import ModelSpec
from dashboard.engines.base import API_KEY_ENV, Engine, configured_api_key

log = logging.getLogger("smartswitch.engines")

VLLM_PYTHON_ENV = "SMARTSWITCH_VLLM_PYTHON"
INSTANCE_ENV = "SMARTSWITCH_INSTANCE"  # the orchestrator's data dir: whose engine this is
MODEL_ENV = "SMARTSWITCH_MODEL_ID"  # which model it serves
# Create times come from boot time + start ticks; boot time as the kernel reports it moves when the
# wall clock is stepped, so a restart may see the same process a little earlier or later.
CREATE_TIME_TOLERANCE_S = 1.0
KILL_WAIT_S = 5.0  # after SIGKILL the kernel frees a process in milliseconds; this only bounds a stuck one
KILL_REST_WAIT_S = 1.0  # after the main process died: how long to wait for its group to be gone
SWEEP_GRACE_S = 5.0  # an untracked engine gets this long after TERM before KILL
GROUP_POLL_S = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_args(spec: ModelSpec, port: int, *, host: str = "127.0.0.1",
                gpu_total_gb: float | None = None, devices: tuple[int, ...] | None = None) -> list[str]:
    """The engine's arguments (after its program): they name the model id, so ``ps`` tells engines apart.

    ``devices`` is the set it runs on (its size is the tensor-parallel size); ``gpu_total_gb`` is the memory
    of those devices together (real GPUs only): vLLM takes the same share of each of them.
    """
    if spec.engine == "sim":
        args = ["--model-id", spec.id, "--host", host, "--port", str(port), "--size-gb", f"{spec.size_gb:g}",
                "--gpu-memory-gb", f"{spec.gpu_memory_gb:g}"]
        if spec.sleep:
            args.append("--sleep-mode")
        return [*args, *spec.args]
    args = ["--model", spec.path, "--served-model-name", spec.id, "--host", host, "--port", str(port)]
    tp = len(devices) if devices else spec.tensor_parallel_size
    if tp > 1:
        args += ["--tensor-parallel-size", str(tp)]
    if gpu_total_gb and "--gpu-memory-utilization" not in spec.args:
        # vLLM takes a share of each device: its footprint's share of its devices is exactly that.
        share = min(spec.gpu_memory_gb / gpu_total_gb, 0.95)
        args += ["--gpu-memory-utilization", f"{share:.3f}"]
    if spec.sleep:
        args.append("--enable-sleep-mode")
    return [*args, *spec.args]


def engine_command(spec: ModelSpec, port: int, *, gpu_total_gb: float | None = None,
                   devices: tuple[int, ...] | None = None) -> list[str]:
    """The local command line that serves ``spec`` on 127.0.0.1."""
    if spec.engine == "sim":
        program = [sys.executable, "-m", "dashboard.engines.sim"]
    else:
        program = [os.environ.get(VLLM_PYTHON_ENV, sys.executable), "-m", "vllm.entrypoints.openai.api_server"]
    return [*program, *engine_args(spec, port, gpu_total_gb=gpu_total_gb, devices=devices)]


def device_env(devices: tuple[int, ...] | None) -> dict[str, str]:
    """The environment that confines an engine to ``devices`` (numbered as NVML numbers them)."""
    if devices is None:
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in devices), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def engine_env(spec: ModelSpec, extra: dict[str, str] | None = None, *, instance: str = "",
               devices: tuple[int, ...] | None = None) -> dict[str, str]:
    # The placement comes after the catalog's env: a CUDA_VISIBLE_DEVICES there would undo the planner's.
    env = {**os.environ, **(extra or {}), **dict(spec.env), **device_env(devices), "PYTHONUNBUFFERED": "1"}
    env.pop(INSTANCE_ENV, None)  # never pass on a marker this process inherited
    env.pop(MODEL_ENV, None)
    if spec.engine == "vllm":
        env.setdefault("HF_HUB_OFFLINE", "1")
        if spec.sleep:
            env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep and /wake_up are dev routes
    marker = instance_marker(instance)
    if marker:  # last, so no configured env can forge or drop it; workers inherit it
        env[INSTANCE_ENV] = marker
        env[MODEL_ENV] = spec.id
    return env


def with_secret(env: dict[str, str], secret: str | None) -> dict[str, str]:
    """``env`` with the engine's secret as vLLM's key: in the environment, which only its user can read,
    not in its arguments, which ``ps`` shows everyone."""
    env = {k: v for k, v in env.items() if k != API_KEY_ENV}  # one this process inherited is not the engine's
    if secret:
        env[API_KEY_ENV] = secret
    return env


# Processes, through psutil ----------------------------------------------------------------------
def instance_marker(instance: str) -> str:
    """The marker value for an orchestrator's data dir ("" = no marker: nothing is adopted or swept)."""
    return str(Path(instance).resolve()) if instance else ""


def make_ref(pid: int, create_time: float) -> str:
    return f"{pid}@{create_time:.2f}"


def parse_ref(ref: str | None) -> tuple[int, float] | None:
    """``(pid, create_time)``, or None for a ref that cannot confirm anything (an old bare pid, "pending")."""
    if not ref or "@" not in ref:
        return None
    pid, _, created = ref.partition("@")
    try:
        return int(pid), float(created)
    except ValueError:
        return None


def _process(pid: int) -> psutil.Process | None:
    """The live (not zombie) process ``pid``, or None."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _environ(proc: psutil.Process) -> dict[str, str] | None:
    """The process's environment; None when it cannot be read (another user's, gone, a zombie)."""
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return None


def pid_alive(pid: int) -> bool:
    return _process(pid) is not None


def group_pids(pgid: int) -> tuple[int, ...]:
    """Live pids whose process group is ``pgid`` (no identity check: see ``ProcessEngine.pids``)."""
    return tuple(proc.pid for proc in _group_members(pgid))


def pid_cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return ""


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for pid in psutil.pids():
        if _pgid(pid) == pgid and (proc := _process(pid)) is not None:
            members.append(proc)
    return members


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    # Gone already, or (PermissionError) a group we may not signal: either way nothing to end.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _own_group() -> set[int]:
    """Never signal the group this orchestrator runs in, whatever a process claims."""
    return {os.getpgrp(), os.getpid()}


def sweep(instance: str, adopted: set[str]) -> list[str]:
    """End this instance's engines that nobody adopted (no record, or a start cut short); their model ids.

    Only processes whose environment carries exactly this instance's marker are considered; the
    group of such a process is ended when its leader is that process (or is gone) and no adopted
    ref names the group. TERM first, KILL after ``SWEEP_GRACE_S``.
    """
    marker = instance_marker(instance)
    if not marker:
        return []
    kept = {parsed[0] for ref in adopted if (parsed := parse_ref(ref)) is not None}
    groups: dict[int, str] = {}
    for pid in psutil.pids():
        proc = _process(pid)
        env = _environ(proc) if proc is not None else None
        if env is None or env.get(INSTANCE_ENV) != marker:
            continue
        pgid = _pgid(pid)
        if pgid is None or pgid in kept or pgid in _own_group() or pgid in groups:
            continue
        leader = _process(pgid)
        if leader is not None and leader.pid != pid and (_environ(leader) or {}).get(INSTANCE_ENV) != marker:
            continue  # a marked process inside someone else's group: not an engine of ours
        groups[pgid] = ((_environ(leader) if leader is not None else None) or env).get(MODEL_ENV, "?")
    if not groups:
        return []
    for pgid, model_id in groups.items():
        log.warning("sweep: ending untracked engine of %s (process group %d)", model_id, pgid)
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + SWEEP_GRACE_S
    while time.monotonic() < deadline and any(_group_members(pgid) for pgid in groups):
        time.sleep(0.05)
    for pgid in groups:
        if _group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)
    return list(groups.values())


class ProcessEngine(Engine):
    """A local engine process (``vllm serve`` or the sim) in its own session and process group."""

    runtime = "process"

    def __init__(self, spec: ModelSpec, port: int, log_dir: Path, *, instance: str = "",
                 ref: str | None = None, command: list[str] | None = None, gpu_total_gb: float | None = None,
                 env: dict[str, str] | None = None, pid: int | None = None,
                 devices: tuple[int, ...] | None = None, **kwargs: float) -> None:
        super().__init__(spec, port, **kwargs)
        if pid is not None:
            warnings.warn("ProcessEngine(pid=...) is deprecated: pass ref='pid@create_time'",
                          DeprecationWarning, stacklevel=2)
            ref = ref or str(pid)  # a bare pid confirms nothing: never adopted, never signalled
        self.instance = instance_marker(instance)
        self.env = env or {}
        self.devices = devices  # the GPUs it is confined to (None: not placed, e.g. adopted)
        self.command = command or engine_command(spec, port, gpu_total_gb=gpu_total_gb, devices=devices)
        self.log_path = log_dir / f"{spec.id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._ref = ref or ""
        self._read_pos = 0

    @property
    def ref(self) -> str:
        return self._ref

    @property
    def pid(self) -> int | None:
        parsed = parse_ref(self._ref)
        return parsed[0] if parsed is not None else None

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A log file, not a pipe: the engine keeps running (and logging) if we restart. Readable by its
        # owner only (0600), as everything in the data dir.
        with open(self.log_path, "wb", opener=lambda path, flags: os.open(path, flags, 0o600)) as log_file:
            self.proc = subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         env=with_secret(engine_env(self.spec, self.env, instance=self.instance,
                                                                    devices=self.devices), self.secret),
                                         start_new_session=True)
        try:
            created = psutil.Process(self.proc.pid).create_time()
        except psutil.Error:  # gone already (exec failed at once): no later start can be confused with it
            created = time.time()
        self._ref = make_ref(self.proc.pid, created)

    async def _output(self, from_start: bool) -> AsyncIterator[str]:
        # Bytes and an incremental decoder: ``_read_pos`` is then exactly what has been handed on.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(self.log_path, "rb") as log_file:
            if not from_start:
                log_file.seek(0, os.SEEK_END)
            self._read_pos = log_file.tell()
            while True:
                data = log_file.read(65536)
                self._read_pos = log_file.tell()
                if data:
                    if chunk := decoder.decode(data):
                        yield chunk
                else:
                    await asyncio.sleep(0.05)

    async def _output_caught_up(self) -> None:
        deadline = time.monotonic() + 1.0  # an engine that writes faster than we read must not hold us up
        while time.monotonic() < deadline:
            try:
                if self._read_pos >= self.log_path.stat().st_size:
                    return
            except OSError:
                return
            await asyncio.sleep(0.02)

    # Identity ----------------------------------------------------------------------------------
    def _is_mine(self, proc: psutil.Process) -> bool:
        """Does ``proc`` carry this engine's marker (this instance, this model)?"""
        if not self.instance:
            return False
        env = _environ(proc)
        if env is not None:
            return env.get(INSTANCE_ENV) == self.instance and env.get(MODEL_ENV) == self.spec.id
        try:  # unreadable environment: the model id in the command line is the next best sign
            args = proc.cmdline()
        except (psutil.Error, OSError):
            return False
        return self.spec.id in args

    def _running_secret(self) -> str | None:
        leader = self._leader()
        env = _environ(leader) if leader is not None else None
        if env is None:  # cannot tell: the catalog's own key, if it names one
            return configured_api_key(self.spec.args)
        return env.get(API_KEY_ENV) or None

    def _own_child(self) -> bool:
        """Our child not yet reaped: its pid (and so its group id) cannot have been reused."""
        return self.proc is not None and self.proc.returncode is None

    def _leader(self) -> psutil.Process | None:
        """The engine's main process, if it runs and is confirmed to be this engine."""
        parsed = parse_ref(self._ref)
        if parsed is None:
            return None
        pid, created = parsed
        proc = _process(pid)
        if proc is None:
            return None
        if self._own_child():
            return proc
        try:
            same_start = abs(proc.create_time() - created) <= CREATE_TIME_TOLERANCE_S
        except psutil.Error:
            return None
        return proc if same_start and self._is_mine(proc) else None

    def _group(self) -> list[psutil.Process]:
        """Live processes of the engine's group, if the group is confirmed to be this engine's, else []."""
        pgid = self.pid if parse_ref(self._ref) is not None else None
        if pgid is None or pgid in _own_group():
            return []
        members = _group_members(pgid)
        if self._own_child() or self._leader() is not None or any(self._is_mine(p) for p in members):
            return members
        return []

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.poll()  # so the main process does not linger as a zombie

    # Engine -----------------------------------------------------------------------------------
    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self._leader() is not None

    def pids(self) -> tuple[int, ...]:
        return tuple(proc.pid for proc in self._group())

    async def _wait_exit(self) -> int | None:
        pid = self.pid
        if pid is None or parse_ref(self._ref) is None:
            return None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return self.proc.poll() if self.proc is not None else None
        try:
            # Checked after opening, so the descriptor names this very process, not a later one with its pid.
            if self.proc is not None:
                if self.proc.poll() is not None:  # already reaped: the pid may belong to anyone now
                    return self.proc.returncode
            elif self._leader() is None:
                return None
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
            try:
                await exited  # readable once the process has exited; cancelled by detach()
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        return self.proc.poll() if self.proc is not None else None

    async def _signal_and_wait(self, signum: signal.Signals, wait_s: float) -> bool:
        """Signal the engine's group if it is confirmed ours; True once nothing of it is left."""
        pgid = self.pid
        self._reap()
        if pgid is None or (not self._group() and not self._own_child()):
            return True
        _signal_group(pgid, signum)
        if self._own_child():
            # A child signalled right after the spawn may not have made its own group yet (setsid
            # runs in the child before exec): signal it directly too, or it would start unwatched.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pgid, signum)
        deadline = time.monotonic() + wait_s
        while True:
            self._reap()
            if not _group_members(pgid) and not self._own_child():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(GROUP_POLL_S)

    async def _terminate(self, timeout: float) -> None:
        if parse_ref(self._ref) is None:
            if self._ref:
                log.warning("%s: ref %r cannot be confirmed; not signalling anything", self.model_id, self._ref)
            return
        if not await self._signal_and_wait(signal.SIGTERM, timeout):
            log.warning("%s: still running %g s after SIGTERM; sending SIGKILL", self.model_id, timeout)
            await self._signal_and_wait(signal.SIGKILL, KILL_WAIT_S)

    async def _kill(self) -> None:
        await self._signal_and_wait(signal.SIGKILL, KILL_WAIT_S)

    async def _kill_rest(self) -> None:
        if self._group():
            log.info("%s: main process exited; killing the rest of its process group", self.model_id)
        await self._signal_and_wait(signal.SIGKILL, KILL_REST_WAIT_S)

