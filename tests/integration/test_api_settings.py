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

        # While the model loads, the waiting request is visible in the status.
        wait_for(lambda: status()["request_queue"].get("medium") == 1, timeout=10, message="a queued request")
        assert status()["switch"]["target_model"] == "medium"
        thread.join(60)
        assert replies[0].status_code == 200
        assert "You said: queued?" in replies[0].json()["choices"][0]["message"]["content"]
        assert status()["request_queue"] == {}
        assert status()["active_model"] == "medium"
    finally:
        srv.stop()
    assert not sim_processes()
