"""A notebook's two lines, end to end: ``connect()`` to an embedded orchestrator, ``connect(url)`` to a shared
server; switches with progress, the status table, chat through the proxy with openai, clear failures, close."""

from __future__ import annotations

import _thread
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dashboard import ConnectFailed, Lab, SwitchFailed, connect
from dashboard.config import load_config, parse_config
from dashboard.errors import SmartswitchError
from tests.conftest import API_KEY, TEST_CATALOG, Server, serve_catalog, sim_processes, wait_for

CATALOG = serve_catalog(TEST_CATALOG, switches_per_minute=1000)
KEY_VARS = ("SMARTSWITCH_API_KEY", "SMARTSWITCH_API_KEYS", "SMARTSWITCH_DATA_DIR")


def chat(lab: Lab, model: str) -> str:
    reply = lab.openai().chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}])
    return reply.choices[0].message.content or ""


def idle(lab: Lab) -> bool:
    return lab.status().attrs["switch"] is None


# Embedded: connect() ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    data_dir = tmp_path_factory.mktemp("lab") / "data"
    lab = connect(config=parse_config(CATALOG, "test.toml"), data_dir=data_dir, user="tester")
    yield lab
    lab.close()
    wait_for(lambda: not sim_processes(data_dir), timeout=15, message="the lab's engines to exit")


def test_switch_returns_when_the_model_is_running(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    done = lab.switch("small")
    assert (done.kind, done.status, done.target_model) == ("complete", "success", "small")
    assert lab.status().loc["small", "status"] == "running"
    assert lab.active_model == "small"
    # Outside a notebook the progress is plain text lines: stages, a bar every few percent, the outcome.
    out = capsys.readouterr().out
    assert "Loading Small-8B" in out and "%" in out and "Done: small is ready (success" in out


def test_status_is_a_table_of_every_model(lab: Lab) -> None:
    lab.switch("small")
    table = lab.status()
    assert set(table.index) == set(parse_config(CATALOG, "test.toml").models)
    assert {"status", "GPU GB", "needs GB", "pinned", "warm", "active"} <= set(table.columns)
    small = table.loc["small"]
    assert small["status"] == "running" and bool(small["active"]) and small["GPU GB"] > 0
    assert table.loc["giant", "status"] == "stopped" and table.loc["giant", "needs GB"] == 95
    assert table.attrs["gpu"]["total_memory_gb"] == 100 and table.attrs["active_model"] == "small"
    assert table.index[0] == "small"  # what serves first, as in the dashboard


def test_openai_client_chats_with_the_engine_through_the_proxy(lab: Lab) -> None:
    lab.switch("small")
    assert lab.url.startswith("http://127.0.0.1:")
    assert "simulated reply from small" in chat(lab, "small")
    # The embedded server's API answers the lab's key like any client's.
    status = httpx.get(f"{lab.url}/v1/models/status", headers={"Authorization": f"Bearer {lab.api_key}"}, timeout=5)
    assert status.json()["active_model"] == "small"
    assert httpx.get(f"{lab.url}/", timeout=30).status_code == 200  # and the dashboard, for a browser tab


def test_failing_model_raises_an_error_naming_it_and_the_reason(lab: Lab) -> None:
    lab.switch("small")
    with pytest.raises(SwitchFailed) as failed:
        lab.switch("crasher")
    assert failed.value.model == "crasher" and failed.value.code == "engine_failed"
    assert str(failed.value).startswith("Switch to crasher failed: ")
    assert "simulated engine failure at weights" in failed.value.reason
    wait_for(lambda: idle(lab), timeout=30, message="the rollback to end")
    assert lab.status().loc["small", "status"] == "running"  # nothing of what ran is lost


def test_unknown_model_raises_an_error_listing_the_known_ones(lab: Lab) -> None:
    with pytest.raises(SwitchFailed) as failed:
        lab.switch("no-such-model")
    assert failed.value.code == "unknown_model"
    assert "no-such-model" in str(failed.value) and "Known models: big, medium, small" in str(failed.value)


def test_switch_past_its_timeout_is_cancelled(lab: Lab) -> None:
    lab.switch("small")
    with pytest.raises(SwitchFailed) as failed:
        lab.switch("medium", timeout=0.3)  # loads in 2.5 s
    assert failed.value.code == "timeout" and "within 0.3 s" in str(failed.value)
    wait_for(lambda: idle(lab), timeout=30, message="the cancel to finish")
    assert lab.status().loc["medium", "status"] == "stopped"
    assert lab.active_model == "small"


def test_interrupting_a_switch_cancels_it(lab: Lab) -> None:
    lab.switch("small")

    def interrupt() -> None:
        wait_for(lambda: lab.status().attrs["switch"] is not None, timeout=10, message="the switch to start")
        if lab.status().attrs["switch"] is not None:  # only while it runs: never into the test runner
            _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        lab.switch("medium")  # loads in 2.5 s
    wait_for(lambda: idle(lab), timeout=30, message="the cancel to finish")
    assert lab.status().loc["medium", "status"] == "stopped" and lab.active_model == "small"


def test_plan_and_history_come_from_the_orchestrator(lab: Lab) -> None:
    lab.switch("small")
    plan = lab.plan("giant")
    assert plan["feasible"] and "small" in plan["unload"]
    history = lab.history()
    assert {"model_id", "at", "total_s", "outcome"} <= set(history.columns)
    assert "success" in set(history[history["model_id"] == "small"]["outcome"])


def test_shown_in_a_cell_the_lab_is_the_dashboard(lab: Lab) -> None:
    assert lab.__panel__() is lab.dashboard
    assert lab.dashboard.actor == "dashboard:tester"
    assert lab.gpu.state is lab.dashboard.state  # the gauge alone reads the dashboard's state


def test_close_stops_every_engine_and_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where connect() makes its data dir
    lab = connect(config=parse_config(CATALOG, "test.toml"))
    data_dir = lab.data_dir
    assert data_dir is not None and data_dir.is_relative_to(tmp_path.resolve())
    lab.switch("small")
    lab.switch("big")  # small stays: both fit
    assert len(sim_processes(data_dir)) >= 2
    url = lab.url
    lab.close()
    wait_for(lambda: not sim_processes(data_dir), timeout=15, message="every engine of the lab to exit")
    assert not data_dir.exists()  # a temporary data dir goes with the lab
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=5)
    with pytest.raises(SmartswitchError, match="closed"):
        lab.status()
    lab.close()  # twice is harmless


def test_connect_defaults_to_the_demo_catalog(tmp_path: Path) -> None:
    with connect(data_dir=tmp_path / "demo") as lab:
        assert set(lab.status().index) == set(load_config().models)
        assert lab.embedded and lab.user  # the OS user by default


# Shared server: connect(url) ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("remote"), CATALOG)
    yield srv
    srv.stop()
    wait_for(lambda: not sim_processes(srv.data_dir), timeout=15, message="the server's engines to exit")


def test_connect_url_switches_and_chats_with_the_given_key(remote: Server) -> None:
    lab = connect(remote.url, key=API_KEY, user="tester")
    try:
        assert not lab.embedded and lab.data_dir is None
        done = lab.switch("small")
        assert (done.status, done.target_model) == ("success", "small")
        assert lab.status().loc["small", "status"] == "running"
        assert "simulated reply from small" in chat(lab, "small")
        with pytest.raises(SwitchFailed) as failed:
            lab.switch("crasher")
        assert failed.value.code == "engine_failed" and "crasher" in str(failed.value)
        with pytest.raises(SwitchFailed) as unknown:
            lab.switch("no-such-model")
        assert unknown.value.code == "unknown_model"
    finally:
        lab.close()
    # Closing a remote lab closes its connection only: the shared server and its engines carry on.
    assert httpx.get(f"{remote.url}/healthz", timeout=5).status_code == 200
    assert sim_processes(remote.data_dir)


def test_connect_url_takes_the_key_from_the_environment(remote: Server, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    for name in KEY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SMARTSWITCH_API_KEY", API_KEY)
    with connect(remote.url, data_dir=tmp_path) as lab:
        assert lab.api_key == API_KEY
        lab.switch("small")
        assert "simulated reply from small" in chat(lab, "small")


def test_connect_url_without_a_usable_key_says_what_to_do(remote: Server, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    for name in KEY_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConnectFailed, match="SMARTSWITCH_API_KEY"):
        connect(remote.url, data_dir=tmp_path)
    with pytest.raises(ConnectFailed, match="refused"):
        connect(remote.url, key="wrong-key-0123456789")
