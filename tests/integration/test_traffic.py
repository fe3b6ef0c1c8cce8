"""Shared-box traffic on a live `smartswitch serve` with sim engines: every chat request gated, drained,
queued, never dropped, never cut (issue 10), over repeated rounds of each scenario."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from httpx_sse import connect_sse

from dashboard.api.ratelimit import RateLimited
from dashboard.engines.process import INSTANCE_ENV, instance_marker
from dashboard.errors import ModelNotRunning
from dashboard.ui.backend import LocalBackend
from tests.conftest import API_KEY, TEST_CATALOG, Server, wait_for

ROUNDS = 3
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
LONG = " ".join(f"w{i}" for i in range(40))  # the sim echoes it: a 45-word reply, one word per chunk


def model(mid: str, name: str, gb: int, *args: str) -> str:
    quoted = ", ".join(f'"{a}"' for a in args)
    return f'\n[models.{mid}]\nname = "{name}"\nsize_gb = {gb}\ngpu_memory_gb = {gb}\nargs = [{quoted}]\n'


# Two models that cannot both be loaded (60 + 60 > 100 GB), and a few that load slowly or misbehave.
def catalog(*, queue: bool, drain_s: float, queue_timeout_s: float = 16, per_minute: int = 1000) -> str:
    return (f'[gpu]\nsource = "virtual"\ntotal_gb = 100\n\n[switching]\nstall_timeout_s = 3\nstop_timeout_s = 10\n'
            f'drain_timeout_s = {drain_s}\n\n[server]\nswitch_on_request = {str(queue).lower()}\n'
            f'queue_timeout_s = {queue_timeout_s}\nswitches_per_minute = {per_minute}\n'
            + model("a", "Alpha", 60, "--load-seconds", "1.0", "--token-delay", "0.1")
            + model("b", "Beta", 60, "--load-seconds", "1.0", "--token-delay", "0.1")
            + model("slow", "Slow", 60, "--load-seconds", "7")
            + model("slower", "Slower", 60, "--load-seconds", "24")
            + model("lingerer", "Lingerer", 60, "--load-seconds", "0.5", "--workers", "1",
                    "--worker-term-delay", "6")
            + model("dier", "Dier", 10, "--load-seconds", "0.5", "--token-delay", "0.1", "--die-mid-reply", "5")
            + model("staller", "Staller", 10, "--load-seconds", "0.5", "--stall-reply-after", "5"))


def engines_of(srv: Server) -> list[int]:
    """The engine processes ``srv`` started (the module's other server may still be running its own)."""
    marker = instance_marker(str(srv.data_dir))
    return [p.pid for p in psutil.process_iter(["environ", "status"])
            if (p.info["environ"] or {}).get(INSTANCE_ENV) == marker and p.info["status"] != psutil.STATUS_ZOMBIE]


def stopped_server(srv: Server) -> None:
    srv.stop()
    wait_for(lambda: not engines_of(srv), timeout=20, message="every engine to exit with the server")
    log = srv.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture(scope="module")
def queued(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``switch_on_request = true``: a chat for a model that is not running waits in the queue."""
    srv = Server(tmp_path_factory.mktemp("queued"), catalog(queue=True, drain_s=30))
    yield srv
    stopped_server(srv)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``switch_on_request = false`` and a one-second drain: a 409 for a model not running, cuts past the bound."""
    srv = Server(tmp_path_factory.mktemp("strict"), catalog(queue=False, drain_s=1))
    yield srv
    stopped_server(srv)


@dataclass
class Reply:
    """One chat as its client saw it."""

    status: int
    started: float
    stream: bool
    text: str = ""
    done: bool = False  # streamed: [DONE] arrived
    error: dict | None = None  # an error chunk, or the error body
    comments: list[tuple[float, str]] = field(default_factory=list)
    headers_at: float | None = None
    retry_after: str | None = None

    @property
    def complete(self) -> bool:
        """Neither failed nor cut: the whole reply, and for a stream its [DONE]."""
        return self.status == 200 and self.error is None and "You said:" in self.text and (
            self.done or not self.stream)


async def chat(client: httpx.AsyncClient, url: str, mid: str, prompt: str, *, stream: bool) -> Reply:
    body = {"model": mid, "messages": [{"role": "user", "content": prompt}], "stream": stream}
    reply = Reply(0, time.monotonic(), stream)
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=HEADERS) as response:
        reply.status, reply.headers_at = response.status_code, time.monotonic()
        reply.retry_after = response.headers.get("retry-after")
        if not stream or response.status_code != 200:
            data = json.loads(await response.aread())
            if response.status_code == 200:
                reply.text = data["choices"][0]["message"]["content"]
            else:
                reply.error = data["error"]
            return reply
        async for line in response.aiter_lines():
            if line.startswith(":"):
                reply.comments.append((time.monotonic(), line))
            elif line == "data: [DONE]":
                reply.done = True
            elif line.startswith("data:"):
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    reply.error = chunk["error"]
                for choice in chunk.get("choices", []):
                    reply.text += choice["delta"].get("content") or ""
    return reply


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(10, read=120))


def post(srv: Server, path: str, **body: object) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body or None, headers=HEADERS, timeout=120)


def status(srv: Server) -> dict:
    return httpx.get(f"{srv.url}/v1/models/status", headers=HEADERS, timeout=10).json()


def nothing_loaded(srv: Server) -> None:
    for mid, entry in status(srv)["models"].items():
        if entry["status"] != "stopped":
            assert post(srv, f"/v1/models/{mid}/unload").status_code == 200
    wait_for(lambda: all(m["status"] == "stopped" for m in status(srv)["models"].values()), timeout=30,
             message="every model stopped")


def switched_to(srv: Server, mid: str) -> None:
    done = post(srv, "/v1/models/switch", target_model=mid, stream=False).json()
    assert done["event"] == "complete", done


def served(reply: Reply, mid: str, prompt: str) -> None:
    assert reply.complete, reply
    assert reply.text == f"[simulated reply from {mid}] You said: {prompt}", reply.text


# The dashboard, in process: the same gate and the same limit. These and the next test come before the
# module's servers start: their clean-up checks that no sim engine of this session is left. -------------
async def test_the_dashboards_chat_is_counted_and_drained_like_the_apis(make_port) -> None:
    port = make_port(TEST_CATALOG.replace("stop_timeout_s = 5", "stop_timeout_s = 5\ndrain_timeout_s = 20"))
    await asyncio.to_thread(port.switch_and_wait, "small", "test", None, 60)
    backend = LocalBackend(port)
    prompt = " ".join(f"p{i}" for i in range(100))  # 2 s of reply at the sim's 20 ms a word
    unloading: asyncio.Future[None] | None = None
    texts: list[str] = []
    async for text in backend.chat("small", [{"role": "user", "content": prompt}], "dashboard:alice"):
        texts.append(text)
        if unloading is None:
            assert len(port.core.traffic.leases["small"]) == 1  # counted, like a request through the API
            unloading = asyncio.ensure_future(port.acall("unload", "small", "dashboard:alice"))
            await asyncio.to_thread(wait_for, lambda: "small" in port.core.traffic.draining, timeout=5,
                                    message="the unload to drain small")
    assert texts[-1] == f"[simulated reply from small] You said: {prompt}"  # whole: the unload waited
    assert unloading is not None
    await unloading
    assert port.status()["models"]["small"]["status"] == "stopped"
    with pytest.raises(ModelNotRunning, match="small is not running"):
        async for _ in backend.chat("small", [{"role": "user", "content": "hi"}], "dashboard:alice"):
            pass


def test_the_dashboard_is_held_to_the_same_switches_per_minute_per_user(make_port) -> None:
    port = make_port(TEST_CATALOG + "\n[server]\nswitches_per_minute = 3\n")
    for target in ("small", "medium", "small"):
        port.switch(target, "dashboard:alice")
    with pytest.raises(RateLimited) as info:
        port.switch("big", "dashboard:alice")  # the 4th in a minute: today's 8 in 10 s no longer all go
    assert info.value.details["retry_after_seconds"] > 0
    port.switch("big", "dashboard:bob")  # each user has their own minute
    outcomes = [e["outcome"] for e in port.audit_log() if e["actor"] == "dashboard:alice"]
    assert outcomes.count("rate_limited") == 1


# One limit for every actor -------------------------------------------------------------------------------
def test_the_rate_limit_holds_across_switch_load_and_request_triggered_switches(tmp_path: Path) -> None:
    srv = Server(tmp_path, catalog(queue=True, drain_s=5, per_minute=2))
    try:
        assert post(srv, "/v1/models/switch", target_model="dier", stream=False).status_code == 200
        assert post(srv, "/v1/models/staller/load").status_code == 200
        for refused in (post(srv, "/v1/models/switch", target_model="a", stream=False),
                        post(srv, "/v1/models/a/load")):
            assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
            assert refused.json()["error"] == "rate_limited"
        chat = httpx.post(f"{srv.url}/v1/chat/completions", headers=HEADERS, timeout=30,
                          json={"model": "a", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 429 and int(chat.headers["Retry-After"]) > 0
        assert chat.json()["error"]["code"] == "rate_limited"
        assert status(srv)["models"]["a"]["status"] == "stopped"
    finally:
        stopped_server(srv)


# The table: each scenario, over repeated rounds, with zero failed and zero cut requests ----------
async def test_chats_for_two_models_at_the_same_moment_with_nothing_loaded_both_complete(queued: Server) -> None:
    async with client() as http:
        for round_ in range(ROUNDS):
            nothing_loaded(queued)
            stream = round_ % 2 == 0
            first, second = await asyncio.gather(chat(http, queued.url, "a", f"one {round_}", stream=stream),
                                                 chat(http, queued.url, "b", f"two {round_}", stream=stream))
            served(first, "a", f"one {round_}")
            served(second, "b", f"two {round_}")


async def test_a_chat_for_the_serving_model_and_one_for_another_at_the_same_moment_both_complete(
        queued: Server) -> None:
    async with client() as http:
        for round_ in range(ROUNDS):
            serving, other = ("b", "a") if round_ % 2 == 0 else ("a", "b")
            switched_to(queued, serving)
            stream = round_ < 2
            replies = await asyncio.gather(chat(http, queued.url, serving, f"{LONG} {round_}", stream=stream),
                                           chat(http, queued.url, other, f"other {round_}", stream=stream))
            served(replies[0], serving, f"{LONG} {round_}")
            served(replies[1], other, f"other {round_}")


async def test_a_long_streamed_reply_is_not_cut_when_another_model_is_requested(queued: Server) -> None:
    async with client() as http:
        for round_ in range(ROUNDS):
            switched_to(queued, "b")
            long_reply = asyncio.ensure_future(chat(http, queued.url, "b", f"{LONG} {round_}", stream=True))
            await asyncio.sleep(0.3)  # the other request comes 0.3 s later, while b streams
            other = await chat(http, queued.url, "a", f"later {round_}", stream=True)
            long = await long_reply
            served(long, "b", f"{LONG} {round_}")  # every one of its 47 words, then [DONE]
            served(other, "a", f"later {round_}")
            assert other.headers_at is not None and long.headers_at is not None


async def test_a_chat_waiting_for_its_model_gets_its_200_and_a_note_at_least_every_5_s(queued: Server) -> None:
    switched_to(queued, "a")
    async with client() as http:
        reply = await chat(http, queued.url, "slow", "are you there", stream=True)
    served(reply, "slow", "are you there")
    assert reply.headers_at is not None and reply.headers_at - reply.started < 2.5  # not after the 7 s load
    notes = [line for _, line in reply.comments]
    assert any(re.fullmatch(r": loading slow \d+ %( ~\d+ s)?.*", line) for line in notes), notes
    times = [reply.started] + [t for t, _ in reply.comments]
    assert len(times) >= 3 and max(b - a for a, b in itertools.pairwise(times)) <= 5.0, notes


async def test_a_queued_request_waits_through_a_persons_switch_and_is_served(queued: Server) -> None:
    switched_to(queued, "a")
    async with client() as http:
        waiting = asyncio.ensure_future(chat(http, queued.url, "slow", "still queued?", stream=False))
        await asyncio.to_thread(wait_for, lambda: (status(queued)["switch"] or {}).get("target_model") == "slow",
                                timeout=10, message="the queue's switch to slow")
        detail = status(queued)["request_queue_detail"]["slow"]
        assert detail["waiting"] == 1 and detail["oldest_wait_s"] >= 0
        # A person switches elsewhere: the queue's load is superseded, the request stays queued.
        person = await asyncio.to_thread(post, queued, "/v1/models/switch", target_model="b", stream=False)
        assert person.json()["event"] == "complete"
        assert not waiting.done()
        reply = await waiting
    served(reply, "slow", "still queued?")
    entries = httpx.get(f"{queued.url}/v1/audit", headers=HEADERS, timeout=10).json()["entries"]
    slow = [e["outcome"] for e in entries if e["action"] == "switch" and e["target"] == "slow"]
    assert slow[:2] == ["success", "cancelled"]  # newest first: superseded, then loaded for the request


async def test_a_request_queued_past_queue_timeout_gets_503_retry_after_and_the_reason(queued: Server) -> None:
    switched_to(queued, "a")
    async with client() as http:
        reply = await chat(http, queued.url, "slower", "too slow", stream=False)
    assert reply.status == 503 and reply.retry_after and int(reply.retry_after) > 0
    assert reply.error is not None and reply.error["code"] == "queue_timeout"
    assert "queue_timeout_s = 16 s" in reply.error["message"] and "Slower" in reply.error["message"]
    wait_for(lambda: status(queued)["switch"] is None, timeout=30, message="the load of slower to end")


def test_a_switch_stream_sends_keep_alives_in_quiet_stretches(queued: Server) -> None:
    switched_to(queued, "lingerer")  # its workers take 6 s to exit: a stop with nothing to report
    lines: list[str] = []
    with httpx.Client(timeout=httpx.Timeout(10, read=60)) as http, http.stream(
            "POST", f"{queued.url}/v1/models/switch", json={"target_model": "a"}, headers=HEADERS) as response:
        for line in response.iter_lines():
            lines.append(line)
    assert ": keep-alive" in lines
    assert any(line.startswith("event: complete") for line in lines)


# Drain, cut, errors -------------------------------------------------------------------------------------
async def test_past_drain_timeout_a_stream_ends_with_an_error_chunk_and_done(strict: Server) -> None:
    for round_ in range(2):
        switched_to(strict, "a")
        async with client() as http:
            prompt = " ".join(f"x{i}" for i in range(60))  # 6 s of reply, the drain allows 1 s
            streaming = asyncio.ensure_future(chat(http, strict.url, "a", prompt, stream=True))
            blocking = asyncio.ensure_future(chat(http, strict.url, "a", prompt, stream=False))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(switched_to, strict, "b")
            cut, whole = await streaming, await blocking
        assert cut.status == 200 and cut.done and cut.error is not None, cut
        assert cut.error["code"] == "request_cut" and "drain_timeout_s = 1 s" in cut.error["message"]
        assert cut.text.startswith("[simulated reply from a]")  # what came before the cut arrived
        assert whole.status == 503 and whole.error is not None and whole.error["code"] == "request_cut", round_


def test_the_openai_client_gets_a_conflict_error_that_says_what_runs_and_how_to_switch(strict: Server) -> None:
    switched_to(strict, "a")
    client = openai.OpenAI(base_url=f"{strict.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.ConflictError) as info:
        client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "b is not running (running: a)" in message
    assert 'POST /v1/models/switch {"target_model": "b"}' in message
    assert info.value.code == "model_not_running"
    with pytest.raises(openai.NotFoundError, match="Unknown model 'nope'"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


async def test_an_engine_that_dies_mid_stream_is_an_error_chunk_and_done(strict: Server) -> None:
    switched_to(strict, "dier")
    async with client() as http:
        reply = await chat(http, strict.url, "dier", LONG, stream=True)
    assert reply.status == 200 and reply.done and reply.error is not None, reply
    assert reply.text.startswith("[simulated reply from dier]")  # the words before the death
    wait_for(lambda: status(strict)["models"]["dier"]["status"] == "failed", timeout=5, message="dier failed")


async def test_an_engine_that_stalls_mid_stream_is_an_error_chunk_within_the_stall_timeout(strict: Server) -> None:
    switched_to(strict, "staller")
    async with client() as http:
        reply = await chat(http, strict.url, "staller", LONG, stream=True)
    assert reply.status == 200 and reply.done and reply.error is not None, reply
    assert "stalled: no output for 3 s" in reply.error["message"]
    assert time.monotonic() - reply.started < 10


# The event stream ---------------------------------------------------------------------------------------
async def test_two_hundred_event_subscribers_opened_and_dropped_leave_nothing_behind(strict: Server) -> None:
    proc = psutil.Process(strict.proc.pid)

    async def one(http: httpx.AsyncClient) -> None:
        async with http.stream("GET", f"{strict.url}/v1/events", headers=HEADERS) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    return  # hang up after the first event

    async with client() as http:
        await one(http)
    baseline = proc.num_fds()
    for _ in range(4):
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=60)) as http:
            await asyncio.gather(*(one(http) for _ in range(50)))
    wait_for(lambda: proc.num_fds() <= baseline + 3, timeout=10, message="the server's fds back to their count")
    log = strict.log_path.read_text()
    assert "aclose(): asynchronous generator is already running" not in log and "Traceback" not in log


def test_a_subscriber_that_never_reads_is_dropped_with_a_last_notice(strict: Server) -> None:
    proc = psutil.Process(strict.proc.pid)
    rss = proc.memory_info().rss
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", strict.port))
    sock.sendall(f"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode())
    with httpx.Client(headers=HEADERS, timeout=10) as http:
        for _ in range(600):  # 1200 status events, each a full snapshot
            http.post(f"{strict.url}/v1/models/a/pin")
            http.post(f"{strict.url}/v1/models/a/unpin")
    wait_for(lambda: "dropped: more than 256 events behind" in strict.log_path.read_text(), timeout=10,
             message="the slow subscriber to be dropped")
    sock.settimeout(20)
    received = b""
    # What it had been sent, then the end of the response: the last notice and the final chunk, or (when
    # even that could not be delivered) the server closing the connection.
    while not received.endswith(b"\r\n0\r\n\r\n") and (chunk := sock.recv(65536)):
        received += chunk
    sock.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert b"event: dropped" in received or not received.endswith(b"0\r\n\r\n")
    assert proc.memory_info().rss - rss < 30e6


def test_switch_events_still_flow_to_an_sse_client(strict: Server) -> None:
    with httpx.Client(timeout=httpx.Timeout(10, read=60)) as http, connect_sse(
            http, "POST", f"{strict.url}/v1/models/switch", json={"target_model": "b"}, headers=HEADERS) as source:
        kinds = [sse.event for sse in source.iter_sse()]
    assert kinds[0] == "stage" and kinds[-1] == "complete"
