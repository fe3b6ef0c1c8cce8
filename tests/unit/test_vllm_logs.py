"""The vLLM log parser against real vLLM output (tests/fixtures) and the formats vLLM prints on GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dashboard.engines import signals as sig
from dashboard.engines.vllm_logs import meaningful_tail, milestone_key, parse_line, split_lines

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def signals_of(name: str) -> list[sig.EngineSignal]:
    lines, rest = split_lines((FIXTURES / name).read_bytes().decode())
    return [s for s in (parse_line(line) for line in [*lines, rest]) if s is not None]


def test_real_cpu_startup_yields_each_stage_in_order_and_no_error() -> None:
    found = signals_of("vllm-0.32-cpu-startup.log")
    assert not [s for s in found if isinstance(s, sig.EngineError)]
    kinds = [type(s) for s in found]
    order = [sig.LoadStarted, sig.CheckpointSize, sig.ShardProgress, sig.WeightsLoaded, sig.KVCache,
             sig.EngineInitialized, sig.ServerUp]
    assert [k for k in dict.fromkeys(kinds)] == order
    shards = [s for s in found if isinstance(s, sig.ShardProgress)]
    assert (shards[0].done, shards[-1].done, shards[-1].total) == (0, 10, 10)
    assert sig.KVCache(tokens=524_288) in found
    assert sig.EngineInitialized(2.87) in found


def test_a_real_startup_has_many_milestones_before_the_first_load_phase() -> None:
    lines, _ = split_lines((FIXTURES / "vllm-cpu-tiny-startup.log").read_bytes().decode())
    keys = [k for k in (milestone_key(line) for line in lines) if k is not None]
    first_phase = next(i for i, line in enumerate(lines) if isinstance(parse_line(line), sig.LoadStarted))
    before = {milestone_key(line) for line in lines[:first_phase]} - {None}
    assert len(before) >= 5  # what anchors the ETA while the phases say nothing yet
    assert all(" " in k and ".py:" in k for k in keys)  # process, then source location
    assert milestone_key("(EngineCore pid=12) INFO 11-28 18:03:52 [core.py:93] Initializing") == "EngineCore core.py:93"
    assert milestone_key("Loading safetensors checkpoint shards: 40% Completed | 4/10") is None


def test_tiny_model_startup_with_tqdm_redraws() -> None:
    text = (FIXTURES / "vllm-cpu-tiny-startup.log").read_bytes().decode()  # keep the \r redraws
    assert "\r" in text
    found = signals_of("vllm-cpu-tiny-startup.log")
    assert [s.done for s in found if isinstance(s, sig.ShardProgress)][-1] == 10
    up = next(i for i, s in enumerate(found) if isinstance(s, sig.ServerUp))
    assert not [s for s in found[:up] if isinstance(s, sig.EngineError)]
    # vLLM reports EngineDeadError when it is stopped with SIGTERM; the orchestrator expects that exit.
    assert any(isinstance(s, sig.EngineError) and "EngineDeadError" in s.message for s in found[up:])


def test_unsupported_sleep_mode_is_an_error_in_vllms_words() -> None:
    errors = [s.message for s in signals_of("vllm-0.32-cpu-startup-failure-sleep-mode.log")
              if isinstance(s, sig.EngineError)]
    assert "Value error, Sleep mode is not supported on current platform." in errors
    lines, _ = split_lines((FIXTURES / "vllm-0.32-cpu-startup-failure-sleep-mode.log").read_text())
    assert "Value error, Sleep mode is not supported on current platform." in meaningful_tail(lines)


def test_broken_model_directory_is_an_error() -> None:
    errors = [s.message for s in signals_of("vllm-cpu-broken-model.log") if isinstance(s, sig.EngineError)]
    assert any("config.json" in e for e in errors)


def test_engine_dead_on_request_is_an_error() -> None:
    errors = [s.message for s in signals_of("vllm-0.32-cpu-engine-dead-on-request.log")
              if isinstance(s, sig.EngineError)]
    assert any("Unsupported CPU attention configuration: head_dim=16" in e for e in errors)
    assert any("EngineDeadError" in e for e in errors)


P = "(Worker pid=12) INFO 11-28 18:04:10 [gpu_model_runner.py:1] "


@pytest.mark.parametrize(("line", "expected"), [
    (P + "Model loading took 15.52 GiB memory and 6.2 seconds", sig.ModelMemory(15.52)),
    (P + "Loading model weights took 15.52 GB", sig.ModelMemory(15.52)),
    (P + "Available KV cache memory: 3.40 GiB", sig.KVCache(gib=3.4)),
    (P + "GPU KV cache size: 123,456 tokens", sig.KVCache(tokens=123_456)),
    (P + "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%", sig.GraphCapture(False)),
    (P + "Graph capturing finished in 5 secs, took 0.52 GiB", sig.GraphCapture(True, 0.52)),
    (P + "init engine (profile, create kv cache, warmup model) took 12.50 seconds", sig.EngineInitialized(12.5)),
    (P + "Checkpoint size: 12.00 GiB. Available RAM: 100 GiB.", sig.CheckpointSize(12 * 1024**3)),
    ("Loading safetensors checkpoint shards:  40% Completed | 4/10 [00:01<00:02,  3.1it/s]",
     sig.ShardProgress(4, 10)),
    ("INFO:     Application startup complete.", sig.ServerUp()),
    ("(Worker pid=1) ERROR 11-28 18:00:00 [x.py:1] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate",
     sig.EngineError("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate")),
    (P.replace("INFO", "WARNING") + "Error-prone setting, ignoring", None),
    ("[W1128 18:04:10.365115306 utils.cpp:68] Warning: NUMA binding", None),
    (P + "Initializing a V1 LLM engine with config: error_mode=raise", None),
    # A client gone mid-answer is not the engine failing (it once failed a serving model under load).
    ("BrokenPipeError: [Errno 32] Broken pipe", None),
    ("ConnectionResetError: [Errno 104] Connection reset by peer", None),
])
def test_gpu_and_cpu_formats(line: str, expected: sig.EngineSignal | None) -> None:
    assert parse_line(line) == expected


def test_tqdm_redraws_split_on_carriage_returns() -> None:
    lines, rest = split_lines("bar 1/3\rbar 2/3\rbar 3/3\nnext line\npartial")
    assert lines == ["bar 1/3", "bar 2/3", "bar 3/3", "next line"]
    assert rest == "partial"


@given(st.text())
def test_parse_line_never_raises(text: str) -> None:
    parse_line(text)


@given(st.text(alphabet=st.sampled_from(list("ab \r\n:%|/0123456789"))))
def test_split_lines_loses_nothing(text: str) -> None:
    lines, rest = split_lines(text)
    rebuilt = "".join(lines) + rest
    assert rebuilt == text.replace("\r", "").replace("\n", "")
