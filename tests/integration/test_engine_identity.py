"""An engine process is only ever signalled once it is confirmed to be ours, and a dead one goes at once.

Real processes throughout: sim engines started by ``ProcessEngine``, and plain ``sleep`` processes as the
unrelated programs a stale pid could point at.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from dashboard.config import ModelSpec
from dashboard.engines import signals as sig
from dashboard.engines.process import (
    INSTANCE_ENV,
    MODEL_ENV,
    ProcessEngine,
    free_port,
    group_pids,
    make_ref,
    pid_alive,
    sweep,
)
from dashboard.errors import EngineFailed
from tests.conftest import sim_processes

SIM = ModelSpec(id="ident-sim", name="Ident-Sim", size_gb=1, gpu_memory_gb=1, args=("--load-seconds", "0.3"))
SLEEPY = ModelSpec(id="ident-sleepy", name="Ident-Sleepy", size_gb=1, gpu_memory_gb=1, sleep=True,
                   args=("--load-seconds", "0.3"))
# Like vLLM mid-load: workers in the engine's group that ignore SIGTERM for a long time.
SLOW_WORKERS = ModelSpec(id="ident-workers", name="Ident-Workers", size_gb=1, gpu_memory_gb=1,
                         args=("--load-seconds", "20", "--workers", "2", "--worker-term-delay", "20"))


async def eventually(condition: Callable[[], object], timeout: float, message: str) -> None:
    """``wait_for`` for async tests: poll without blocking the event loop the engine's watchers run on."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(0.02)


async def next_signal(engine: ProcessEngine, kind: type, timeout: float) -> sig.EngineSignal:
    """The first signal of ``kind`` on the engine's queue (others are skipped)."""
    async def find() -> sig.EngineSignal:
        while not isinstance(signal_ := await engine.queue.get(), kind):
            pass
        return signal_
    return await asyncio.wait_for(find(), timeout)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def engines(data_dir: Path) -> AsyncIterator[Callable[..., ProcessEngine]]:
    """Make engines of this test's instance; whatever is left of them is killed afterwards."""
    made: list[ProcessEngine] = []

    def make(spec: ModelSpec = SIM, *, instance: Path | None = None, ref: str | None = None,
             port: int | None = None) -> ProcessEngine:
        engine = ProcessEngine(spec, port or free_port(), data_dir / "logs", instance=str(instance or data_dir),
                               ref=ref)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.kill()


@pytest.fixture
def strangers() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Unrelated programs, each in its own session (so a wrong ``killpg`` of its pid would end it)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "60"], start_new_session=True, env={**os.environ, **(env or {})})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait(5)


async def started(engine: ProcessEngine) -> ProcessEngine:
    await engine.start()
    await next_signal(engine, sig.Ready, 15)
    return engine


async def test_a_stale_ref_to_an_unrelated_process_leaves_it_alone(engines, strangers) -> None:
    stranger = strangers()
    created = psutil.Process(stranger.pid).create_time()
    # Same start time but not our marker; our marker's pid with another start time; an old bare pid.
    for ref in (make_ref(stranger.pid, created), make_ref(stranger.pid, created - 3600), str(stranger.pid)):
        engine = engines(ref=ref)
        assert not engine.alive()
        assert not await engine.adopt()
        assert engine.pids() == ()
        await engine.stop(0.5)
        await engine.kill()
        assert stranger.poll() is None, f"ref {ref!r} signalled an unrelated process"


async def test_an_engine_is_adopted_only_by_its_own_instance(engines, data_dir: Path, tmp_path: Path) -> None:
    first = await started(engines())
    await first.detach()  # the orchestrator went down; the engine serves on
    other_instance = engines(instance=tmp_path / "other", ref=first.ref, port=first.port)
    assert not other_instance.alive() and not await other_instance.adopt()
    await other_instance.stop(0.5)
    assert first.alive()

    again = engines(ref=first.ref, port=first.port)
    assert await again.adopt() and again.alive()
    assert first.pid in again.pids()
    await again.stop(5)
    assert not again.alive() and group_pids(first.pid) == ()


async def test_an_adopted_engine_that_dies_is_reported_at_once(engines) -> None:
    first = await started(engines())
    await first.detach()
    adopted = engines(ref=first.ref, port=first.port)
    assert await adopted.adopt()
    os.kill(first.pid, signal.SIGKILL)
    exited = await next_signal(adopted, sig.Exited, 1.0)
    assert isinstance(exited, sig.Exited) and exited.returncode is None  # not our child: no code to read
    assert first.proc is not None and first.proc.wait(5) == -signal.SIGKILL


async def test_sweep_ends_unrecorded_engines_of_this_instance_only(engines, strangers, data_dir: Path,
                                                                   tmp_path: Path) -> None:
    orphan = engines(ModelSpec(id="orphan", name="Orphan", size_gb=1, gpu_memory_gb=1,
                               args=("--load-seconds", "0.3", "--workers", "1", "--worker-term-delay", "0.5")))
    await orphan.start()
    await orphan.detach()  # no record of it survives: only its marker says whose it is
    kept = await started(engines())
    unmarked = strangers()
    other_instance = strangers({INSTANCE_ENV: str(tmp_path / "other"), MODEL_ENV: "orphan"})
    await eventually(lambda: len(orphan.pids()) == 2, 10, "the orphan and its worker")
    orphan_group = orphan.pids()

    removed = await asyncio.to_thread(sweep, str(data_dir), {kept.ref})

    assert removed == ["orphan"]
    assert not any(pid_alive(pid) for pid in orphan_group)
    assert kept.alive() and await kept.healthy()
    assert unmarked.poll() is None and other_instance.poll() is None
    assert await asyncio.to_thread(sweep, "", set()) == []  # no instance: nothing is anyone's


async def test_main_process_killed_mid_load_takes_its_workers_with_it_at_once(engines) -> None:
    engine = engines(SLOW_WORKERS)
    await engine.start()
    await eventually(lambda: len(engine.pids()) == 3, 10, "the engine and its two workers")
    await next_signal(engine, sig.LoadStarted, 10)
    group, pgid = engine.pids(), engine.pid
    assert pgid is not None

    os.kill(pgid, signal.SIGKILL)
    killed_at = time.monotonic()
    exited = await next_signal(engine, sig.Exited, 1.0)
    assert time.monotonic() - killed_at < 1.0
    assert isinstance(exited, sig.Exited) and exited.returncode == -signal.SIGKILL
    await eventually(lambda: not group_pids(pgid) and not any(pid_alive(p) for p in group), 1.0,
                     "no process of the engine's group to be left")


async def test_stop_kills_workers_that_ignore_sigterm(engines) -> None:
    engine = engines(SLOW_WORKERS)
    await engine.start()
    await eventually(lambda: len(engine.pids()) == 3, 10, "the engine and its two workers")
    group = engine.pids()
    started_at = time.monotonic()
    await engine.stop(0.5)
    assert time.monotonic() - started_at < 3.0
    assert not any(pid_alive(pid) for pid in group)


async def test_an_engine_killed_right_after_its_spawn_never_starts_unwatched(engines) -> None:
    # Killed before the child has made its own process group: the kill must still reach it.
    engine = engines(SLOW_WORKERS)
    await engine.start()
    await engine.kill()
    assert engine.proc is not None and engine.proc.returncode is not None
    assert not engine.pids()


async def test_sleep_wake_and_is_sleeping_speak_vllms_protocol(engines) -> None:
    engine = await started(engines(SLEEPY))
    assert await engine.is_sleeping() is False
    await engine.sleep(1)
    assert await engine.is_sleeping() is True
    assert await engine.healthy()  # like vLLM: /health says nothing about sleep
    await engine.wake()  # includes the one-token probe
    assert await engine.is_sleeping() is False


async def test_sleep_errors_name_the_model_and_the_reason(engines) -> None:
    engine = await started(engines())  # no --sleep-mode: the routes do not exist
    assert await engine.is_sleeping() is None
    with pytest.raises(EngineFailed, match=r"Ident-Sim could not be put to sleep: HTTP 404"):
        await engine.sleep()
    await engine.stop(5)
    assert await engine.is_sleeping() is None  # does not answer at all
    with pytest.raises(EngineFailed, match="Ident-Sim did not come back from sleep"):
        await engine.wake()


async def test_leak_checks_count_only_this_test_sessions_engines(engines) -> None:
    # An engine of a developer's `smartswitch serve` beside the tests: its data dir is elsewhere.
    with tempfile.TemporaryDirectory() as elsewhere:
        theirs = engines(ModelSpec(id="theirs", name="Theirs", size_gb=1, gpu_memory_gb=1), instance=Path(elsewhere))
        ours = engines()
        await asyncio.gather(started(theirs), started(ours))
        found = sim_processes()
        assert any("--model-id ident-sim" in cmd for cmd in found)
        assert not any("--model-id theirs" in cmd for cmd in found)
        await theirs.kill()
