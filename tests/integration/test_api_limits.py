"""Per-key switch rate limits on a live server of their own (a low limit would starve other tests)."""

from __future__ import annotations

import httpx

from tests.conftest import API_KEY, OTHER_KEY, TEST_CATALOG, Server, serve_catalog, sim_processes


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
