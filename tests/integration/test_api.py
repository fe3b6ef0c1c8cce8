"""The HTTP API of a live `smartswitch serve`, driven by real clients (httpx-sse, openai, the CLI)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import httpx
import openai
from httpx_sse import connect_sse

from dashboard.api.routes import ROUTES, openapi_document
from dashboard.client import SmartswitchClient
from tests.conftest import API_KEY, Server, wait_for


def switch_events(server: Server, target: str, key: str = API_KEY) -> list[tuple[str, dict]]:
    with httpx.Client(timeout=httpx.Timeout(10, read=60)) as client, connect_sse(
            client, "POST", f"{server.url}/v1/models/switch", json={"target_model": target},
            headers={"Authorization": f"Bearer {key}"}) as source:
        return [(sse.event, sse.json()) for sse in source.iter_sse()]


def status(server: Server) -> dict:
    return httpx.get(f"{server.url}/v1/models/status", headers=server.headers, timeout=5).json()


def test_status_has_the_seed_shape_plus_source_active_and_switch(server: Server) -> None:
    body = status(server)
    assert {"models", "gpu", "source", "active_model", "switch"} <= set(body)
    assert body["source"] == "virtual"
    assert set(body["gpu"]) >= {"total_memory_gb", "used_memory_gb", "available_memory_gb"}
    assert body["gpu"]["total_memory_gb"] == 100
    for model in body["models"].values():
        assert {"status", "health", "size_gb", "load_progress", "estimated_load_time_seconds"} <= set(model)
        assert model["status"] in {"running", "loading", "unloading", "sleeping", "stopped", "failed"}
        assert ("gpu_memory_used_gb" in model) or ("gpu_memory_required_gb" in model)


def test_switch_streams_ordered_events_with_monotonic_progress(server: Server) -> None:
    events = switch_events(server, "medium")
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "stage" and kinds[-1] == "complete" and kinds.count("complete") == 1
    stages = [data["stage"] for kind, data in events if kind == "stage"]
    assert stages[0] == "checking_memory" and stages[-1] == "loading_target"
    progress = [data["progress"] for kind, data in events if kind == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100
    assert any(data.get("bytes_total") for kind, data in events if kind == "progress")
    assert events[-1][1]["status"] in ("success", "already_loaded")
    assert events[-1][1]["total_time_seconds"] >= 0
    assert status(server)["models"]["medium"]["status"] == "running"


def test_client_disconnect_does_not_stop_the_switch(server: Server) -> None:
    httpx.post(f"{server.url}/v1/models/small/unload", headers=server.headers, timeout=30)
    with httpx.Client(timeout=httpx.Timeout(10, read=60)) as client, connect_sse(
            client, "POST", f"{server.url}/v1/models/switch", json={"target_model": "small"},
            headers=server.headers) as source:
        for sse in source.iter_sse():
            if sse.event == "stage" and sse.json()["stage"] == "loading_target":
                break  # hang up mid-switch
    wait_for(lambda: status(server)["models"]["small"]["status"] == "running", timeout=30,
             message="small to finish loading after the client left")


def test_two_event_streams_see_the_same_transitions(server: Server) -> None:
    httpx.post(f"{server.url}/v1/models/big/unload", headers=server.headers, timeout=30)
    seen: list[list[tuple[str, str]]] = [[], []]
    ready = [threading.Event(), threading.Event()]

    def watch(i: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(10, read=60)) as client, connect_sse(
                client, "GET", f"{server.url}/v1/events", headers=server.headers) as source:
            for sse in source.iter_sse():
                ready[i].set()
                data = sse.json()
                if sse.event == "status":
                    seen[i].append(("status", data["models"]["big"]["status"]))
                elif sse.event in ("stage", "complete", "error", "cancelled"):
                    seen[i].append((sse.event, data.get("stage") or data.get("status", "")))
                if sse.event == "complete" and data["target_model"] == "big":
                    return

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in (0, 1)]
    for t in threads:
        t.start()
    assert ready[0].wait(10) and ready[1].wait(10)
    switch_events(server, "big")
    for t in threads:
        t.join(30)

    def transitions(events: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out = [e for e in events if e[0] != "status"]
        statuses = [s for kind, s in events if kind == "status"]
        return out + [("status", s) for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]

    assert transitions(seen[0])[-6:] == transitions(seen[1])[-6:]
    assert ("status", "loading") in seen[0] and ("status", "running") in seen[0]
    assert ("complete", "success") in seen[0]


def test_openai_client_streams_a_chat_completion_through_the_proxy(server: Server) -> None:
    switch_events(server, "small")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    stream = client.chat.completions.create(model="small", stream=True,
                                            messages=[{"role": "user", "content": "hello there"}])
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(chunks) > 2
    assert "simulated" in "".join(chunks) and "hello there" in "".join(chunks)
    reply = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "again"}])
    assert "again" in reply.choices[0].message.content
    listed = {m.id for m in client.models.list().data}
    assert {"big", "medium", "small"} <= listed


def test_chat_with_a_model_that_is_not_running_says_how_to_switch(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=10,
                          json={"model": "giant", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 409
    error = response.json()["error"]  # OpenAI's shape on its routes, so its clients show the message
    assert error["code"] == "model_not_running" and error["type"] == "conflict_error"
    assert "POST /v1/models/switch" in error["message"] and "giant" in error["message"]
    assert "running_model" in error


def test_plan_is_a_dry_run(server: Server) -> None:
    before = status(server)
    response = httpx.get(f"{server.url}/v1/models/plan", params={"target_model": "giant"},
                         headers=server.headers, timeout=10)
    assert response.status_code == 200
    plan = response.json()
    assert {"feasible", "unload", "required_gb", "available_gb", "free_gb_after"} <= set(plan)
    assert plan["required_gb"] == 95
    assert {m: s["status"] for m, s in status(server)["models"].items()} == \
           {m: s["status"] for m, s in before["models"].items()}


def test_bad_input_gets_a_json_error_with_the_right_status(server: Server) -> None:
    url = server.url
    cases = [
        (httpx.post(f"{url}/v1/models/switch", json={"target_model": "nope"}, headers=server.headers), 404,
         "unknown_model"),
        (httpx.post(f"{url}/v1/models/switch", content=b"{not json", headers=server.headers), 400, "bad_request"),
        (httpx.post(f"{url}/v1/models/switch", json={}, headers=server.headers), 400, "bad_request"),
        (httpx.get(f"{url}/v1/models/status"), 401, "unauthorized"),
        (httpx.get(f"{url}/v1/models/status", headers={"Authorization": "Bearer wrong"}), 403, "forbidden"),
        (httpx.post(f"{url}/v1/models/switch", content=b"x" * 10_000, headers=server.headers), 413,
         "body_too_large"),
        (httpx.get(f"{url}/v1/models/plan", headers=server.headers), 400, "bad_request"),
        (httpx.post(f"{url}/v1/models/ghost/load", headers=server.headers), 404, "unknown_model"),
        (httpx.get(f"{url}/v1/nothing/here", headers=server.headers), 404, "not_found"),
        (httpx.get(f"{url}/v1/audit", params={"limit": "lots"}, headers=server.headers), 400, "bad_request"),
    ]
    for response, code, error in cases:
        assert response.status_code == code, response.text
        assert response.json()["error"] == error
        assert response.json()["message"]
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_switch_during_a_switch_cancels_the_older_one(server: Server) -> None:
    httpx.post(f"{server.url}/v1/models/medium/unload", headers=server.headers, timeout=30)
    first: list[tuple[str, dict]] = []
    thread = threading.Thread(target=lambda: first.extend(switch_events(server, "medium")), daemon=True)
    thread.start()
    wait_for(lambda: (status(server)["switch"] or {}).get("stage") == "loading_target", timeout=30)
    second = switch_events(server, "big")
    thread.join(30)
    assert first[-1][0] == "cancelled" and first[-1][1]["superseded_by"] == "big"
    assert second[-1][0] == "complete"


def test_every_switch_is_audited_with_the_key_id_not_the_key(server: Server) -> None:
    entries = httpx.get(f"{server.url}/v1/audit", headers=server.headers, timeout=10).json()["entries"]
    switches = [e for e in entries if e["action"] == "switch"]
    assert switches and all(e["actor"].startswith("api:key-") for e in switches)
    assert {"success", "cancelled"} <= {e["outcome"] for e in switches}
    assert API_KEY not in json.dumps(entries)


def test_openapi_document_covers_every_route(server: Server) -> None:
    served = httpx.get(f"{server.url}/v1/openapi.json", headers=server.headers, timeout=10).json()
    assert served == openapi_document()
    documented = set(served["paths"])
    routed = set()
    for pattern, _, _ in ROUTES:
        if pattern == "/v1/.*":
            continue  # the JSON 404 for every other path
        path = pattern.replace("\\.", ".")
        match = re.fullmatch(r"(.*)/\(\[A-Za-z0-9\]\[A-Za-z0-9\._-\]\*\)/\((.*)\)", path)
        if match:
            routed |= {f"{match.group(1)}/{{model_id}}/{action}" for action in match.group(2).split("|")}
        else:
            routed.add(path)
    assert routed == documented


def test_python_client_has_the_orchestrator_interface(server: Server) -> None:
    with SmartswitchClient(server.url, API_KEY) as client:
        assert client.plan("small")["target_model"] == "small"
        final = client.switch_and_wait("small")
        assert final.kind == "complete"
        assert client.status()["models"]["small"]["status"] == "running"
        assert client.cancel() is False


def test_cli_switch_shows_progress_and_finishes(server: Server) -> None:
    httpx.post(f"{server.url}/v1/models/small/unload", headers=server.headers, timeout=30)
    base = [sys.executable, "-m", "dashboard.cli"]
    opts = ["--url", server.url, "--api-key", API_KEY]
    out = subprocess.run([*base, "switch", "small", *opts], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "%" in out.stdout and "Done: small is ready" in out.stdout
    assert re.search(r"\[#+-*\]", out.stdout)
    out = subprocess.run([*base, "status", *opts], capture_output=True, text=True, timeout=30)
    assert "small" in out.stdout and "running" in out.stdout and "Stopped" not in out.stdout
    out = subprocess.run([*base, "plan", "giant", *opts], capture_output=True, text=True, timeout=30)
    assert "giant" in out.stdout
    out = subprocess.run([*base, "switch", "nope", *opts], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "Unknown model 'nope'" in out.stderr


async def test_async_client_follows_a_switch_and_the_event_stream(server: Server) -> None:
    from dashboard.client import AsyncSmartswitchClient
    from dashboard.events import StatusEvent

    client = AsyncSmartswitchClient(server.url, API_KEY)
    try:
        events = client.events()
        first = await anext(events)
        assert isinstance(first, StatusEvent) and "models" in first.snapshot
        await events.aclose()
        kinds = [event.kind async for event in client.switch_events("small")]
        assert kinds[0] == "stage" and kinds[-1] == "complete"
        assert (await client.status())["models"]["small"]["status"] == "running"
    finally:
        await client.aclose()


def test_ctrl_c_in_the_cli_cancels_the_switch(server: Server) -> None:
    import signal

    httpx.post(f"{server.url}/v1/models/medium/unload", headers=server.headers, timeout=30)
    cli = subprocess.Popen([sys.executable, "-m", "dashboard.cli", "switch", "medium", "--url", server.url,
                            "--api-key", API_KEY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (status(server)["switch"] or {}).get("stage") == "loading_target", timeout=30)
    cli.send_signal(signal.SIGINT)
    out, _ = cli.communicate(timeout=60)
    assert cli.returncode == 130
    assert "Cancelling the switch" in out
    assert status(server)["models"]["medium"]["status"] == "stopped"
    # What the switch unloaded comes back in a rollback of its own; then the slot is free.
    wait_for(lambda: status(server)["switch"] is None, timeout=30, message="the rollback to end")
