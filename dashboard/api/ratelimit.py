"""Switches per minute per actor: a sliding one-minute window, and the 429 it answers with.

The orchestrator charges it for the expensive step, starting an engine, whoever asks for it: a switch
(API, dashboard), a model-manager load, or a switch a queued chat request triggers.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque

from dashboard.errors import SmartswitchError

# The actors the limit applies to: API keys and dashboard users. Code in this process (a notebook's
# own orchestrator, recovery at start) acts for the person running it and is not limited.
LIMITED_ACTORS = ("api:", "dashboard:")


class RateLimited(SmartswitchError):
    code = "rate_limited"
    http_status = 429


class RateLimiter:
    def __init__(self, per_minute: int, window_s: float = 60.0) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, key: str, now: float | None = None) -> int | None:
        """Record a hit; returns None when allowed, else the seconds to wait (Retry-After)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits[key]
            while hits and hits[0] <= now - self.window_s:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return max(1, math.ceil(hits[0] + self.window_s - now))
            hits.append(now)
            return None

    def waiting(self, key: str, now: float | None = None) -> int | None:
        """The seconds until ``key`` may hit again when it is at the limit, else None (records nothing)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits.get(key)
            while hits and hits[0] <= now - self.window_s:
                hits.popleft()
            if hits is not None and len(hits) >= self.per_minute:
                return max(1, math.ceil(hits[0] + self.window_s - now))
            return None

    def refusal(self, retry_after: int) -> RateLimited:
        return RateLimited(f"Too many switches: at most {self.per_minute} per minute. Retry in {retry_after} s.",
                           retry_after_seconds=retry_after)
