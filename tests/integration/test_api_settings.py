"""Server settings that change behaviour (rate limit, switch on request), each on a live server of its own."""

from __future__ import annotations

import threading

import httpx

from tests.conftest import API_KEY, OTHER_KEY, TEST_CATALOG, Server, serve_catalog, sim_processes, wait_for


def test_switches_are_rate_limited_per_key(tmp_path) -> None:
    srv = Server(tmp_path, serve_catalog(TEST_CATALOG, switches_per_minute=2))
    try:
        def start(key: str) -> httpx.Response:
            return httpx.post(f"{srv.url}/v1/models/switch", json={"target_model": "small", "wait": False},
                              headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert [start(API_KEY).status_code for _ in range(2)] == [202, 202]
        limited = start(API_KEY)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
        assert limited.json()["error"] == "rate_limited"
        assert start(OTHER_KEY).status_code == 202
    finally:
        srv.stop()
    assert not sim_processes()


def test_switch_on_request_queues_the_chat_until_the_model_is_up(tmp_path) -> None:
    srv = Server(tmp_path, serve_catalog(TEST_CATALOG, switch_on_request=True))
    try:
        replies: list[httpx.Response] = []
        body = {"model": "medium", "messages": [{"role": "user", "content": "queued?"}]}
        thread = threading.Thread(target=lambda: replies.append(httpx.post(
            f"{srv.url}/v1/chat/completions", json=body, headers=srv.headers, timeout=60)), daemon=True)
        thread.start()

        def status() -> dict:
            return httpx.get(f"{srv.url}/v1/models/status", headers=srv.headers, timeout=5).json()

        def queued_while_loading() -> bool:
            now = status()  # one snapshot: the request is queued a moment before its switch starts
            return now["request_queue"].get("medium") == 1 and (now["switch"] or {}).get("target_model") == "medium"

        # While the model loads, the waiting request is visible in the status.
        wait_for(queued_while_loading, timeout=10, message="a queued request while medium loads")
        thread.join(60)
        assert replies[0].status_code == 200
        assert "You said: queued?" in replies[0].json()["choices"][0]["message"]["content"]
        assert status()["request_queue"] == {}
        assert status()["active_model"] == "medium"
    finally:
        srv.stop()
    assert not sim_processes()


def test_server_killed_mid_switch_recovers_on_restart(tmp_path) -> None:
    import signal

    catalog = serve_catalog(TEST_CATALOG, switches_per_minute=100)
    first = Server(tmp_path, catalog)
    done = httpx.post(f"{first.url}/v1/models/switch", json={"target_model": "small", "stream": False},
                      headers=first.headers, timeout=60)
    assert done.json()["status"] == "success"
    before = httpx.get(f"{first.url}/v1/audit", headers=first.headers, timeout=5).json()["entries"]
    started = httpx.post(f"{first.url}/v1/models/switch", json={"target_model": "medium", "wait": False},
                         headers=first.headers, timeout=10)
    assert started.status_code == 202

    def stage() -> str | None:
        switch = httpx.get(f"{first.url}/v1/models/status", headers=first.headers, timeout=5).json()["switch"]
        return switch and switch["stage"]

    wait_for(lambda: stage() == "loading_target", timeout=20, message="the switch to be loading")
    first.proc.send_signal(signal.SIGKILL)  # no clean-up at all: the engine is left running
    first.proc.wait(10)
    first._log.close()
    assert any("--model-id medium" in cmd for cmd in sim_processes())

    second = Server(tmp_path, catalog)  # same data dir
    try:
        status = httpx.get(f"{second.url}/v1/models/status", headers=second.headers, timeout=5).json()
        # The engine is adopted if it came up meanwhile (the switch completed), else stopped and marked
        # failed (the switch was interrupted); never lost.
        medium = status["models"]["medium"]["status"]
        assert medium in ("running", "failed")
        audit = httpx.get(f"{second.url}/v1/audit", headers=second.headers, timeout=5).json()["entries"]
        ended = next(e for e in audit if e["action"] == "switch" and e["target"] == "medium")
        if medium == "running":
            assert ended["outcome"] == "success" and ended["detail"]["resumed_after_restart"]
        else:
            assert status["last_switch_error"]["error"] == "interrupted"
            assert ended["outcome"] == "failed" and ended["detail"]["error"] == "interrupted"
        assert all(entry in audit for entry in before)  # what was logged before the kill is all still there
        assert len([c for c in sim_processes() if "--model-id medium" in c]) <= 1
    finally:
        second.stop()
    wait_for(lambda: not sim_processes(), timeout=15, message="nothing orphaned after the restart")


def test_a_storm_of_switches_ends_with_the_last_one_and_never_overcommits(tmp_path) -> None:
    import random
    import time

    srv = Server(tmp_path, TEST_CATALOG)  # the default limit: 6 switches a minute per key
    samples: list[tuple[float, int]] = []
    accepted: list[tuple[float, str, str]] = []
    limited: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            used = httpx.get(f"{srv.url}/v1/models/status", headers=srv.headers, timeout=5).json()["gpu"]
            per_model = [c.split("--model-id ")[1].split()[0] for c in sim_processes()]
            samples.append((used["used_memory_gb"], max((per_model.count(m) for m in per_model), default=0)))

    def client(key: str, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            for _ in range(10):
                target = rng.choice(["big", "medium", "small"])
                response = http.post(f"{srv.url}/v1/models/switch", json={"target_model": target, "wait": False})
                if response.status_code == 202:
                    accepted.append((time.monotonic(), response.json()["switch_id"], target))
                else:
                    assert response.status_code == 429 and response.headers["Retry-After"]
                    limited.append(1)
                time.sleep(rng.uniform(0.05, 0.35))  # pacing of the storm, not a wait for a result

    try:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        clients = [threading.Thread(target=client, args=([API_KEY, OTHER_KEY][i % 2], i)) for i in range(5)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(60)
        assert len(accepted) + len(limited) == 50 and len(accepted) == 12  # 6 a minute for each of 2 keys
        wait_for(lambda: httpx.get(f"{srv.url}/v1/models/status", headers=srv.headers).json()["switch"] is None,
                 timeout=30, message="the storm to settle")
        stop.set()
        sampler.join(10)
        last_target = max(accepted)[2]
        status = httpx.get(f"{srv.url}/v1/models/status", headers=srv.headers).json()
        assert status["active_model"] == last_target
        assert all(used <= 100 for used, _ in samples) and all(n <= 1 for _, n in samples)
        audit = httpx.get(f"{srv.url}/v1/audit", headers=srv.headers).json()["entries"]
        outcomes = {e["detail"].get("switch_id"): e["outcome"] for e in audit if e["action"] == "switch"}
        assert {outcomes[switch_id] for _, switch_id, _ in accepted} <= {"success", "cancelled"}
        assert outcomes[max(accepted)[1]] == "success"
        assert sum(e["outcome"] == "rate_limited" for e in audit) == len(limited)
    finally:
        stop.set()
        srv.stop()
    assert not sim_processes()
