"""Hostile and broken clients against a live ``smartswitch serve``: each edge answered, bounded, never a 500.

Oversized bodies are refused unread (the server's memory stays flat), half-sent requests are closed,
malformed input is a 400, the protocol details are right (401 names Bearer, 405 says Allow, 431 for a
huge header), engines answer only the orchestrator, whose view stays true when an engine is put to
sleep behind its back, and the data dir is its user's alone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from dashboard.api.limits import MAX_HEADER_BYTES
from tests.conftest import API_KEY, OTHER_KEY, TEST_CATALOG, serve_catalog, sim_processes, wait_for

CLIENT_TIMEOUT_S = 2.0
BIG_BODY = 95 * 1000 * 1000


class HardServer:
    """``smartswitch serve`` with a short client timeout, on a free port, over ``data_dir``."""

    def __init__(self, root: Path, catalog: str, data_dir: Path | None = None) -> None:
        from dashboard.engines.process import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir or root / "server-data"
        config = root / "catalog.toml"
        config.write_text(catalog)
        self.log_path = root / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        env = {**os.environ, "SMARTSWITCH_API_KEYS": f"{API_KEY},{OTHER_KEY}"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dashboard.cli", "serve", "--config", str(config), "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--client-timeout", str(CLIENT_TIMEOUT_S)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.process = psutil.Process(self.proc.pid)
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=60, message="smartswitch serve to answer /healthz")

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=30, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(self.url + path, headers=self.headers, timeout=60, **kwargs)  # type: ignore[arg-type]

    def status(self) -> dict:
        return self.get("/v1/models/status").json()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardServer]:
    root = tmp_path_factory.mktemp("hardened")
    srv = HardServer(root, serve_catalog(TEST_CATALOG, switches_per_minute=1000))
    yield srv
    srv.stop()
    wait_for(lambda: not sim_processes(), timeout=15, message="every sim engine to exit with the server")


def engines_of(data_dir: Path) -> list[psutil.Process]:
    """Engine processes started for ``data_dir`` (by its instance marker) that are still running."""
    from dashboard.engines.process import INSTANCE_ENV

    marker, found = str(data_dir.resolve()), []
    for proc in psutil.process_iter(["environ", "status"]):
        if (proc.info["environ"] or {}).get(INSTANCE_ENV) == marker and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def connect(server: HardServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response; got {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


# Bodies ------------------------------------------------------------------------------------------
def send_big_body_without_a_key(server: HardServer, results: list[tuple[int, dict]]) -> None:
    with connect(server) as sock:
        sock.sendall(f"POST /v1/models/switch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {BIG_BODY}\r\n\r\n".encode())
        chunk, sent = b"[" * (1 << 20), 0
        try:
            while sent < BIG_BODY:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before all of it was sent, as it should be
        status, _, body = read_response(sock)
        results.append((status, json.loads(body)))


def test_a_95_mb_body_without_a_key_is_refused_unread_and_memory_stays_flat(server: HardServer) -> None:
    before = server.process.memory_info().rss
    results: list[tuple[int, dict]] = []
    clients = [threading.Thread(target=send_big_body_without_a_key, args=(server, results)) for _ in range(6)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(60)
    assert [status for status, _ in results] == [413] * 6
    assert all(body["error"] == "body_too_large" and body["max_body_bytes"] == 1048576 for _, body in results)
    grown_mb = (server.process.memory_info().rss - before) / 1e6
    assert grown_mb < 30, f"six 95 MB bodies grew the server by {grown_mb:.0f} MB"
    assert server.get("/v1/models/status").status_code == 200


def test_a_body_over_the_limit_is_refused_before_the_key_is_checked(server: HardServer) -> None:
    refused = httpx.post(f"{server.url}/v1/models/switch", content=b"x" * 2_000_000, timeout=30)
    assert refused.status_code == 413 and refused.json()["error"] == "body_too_large"
    assert refused.headers["connection"] == "close"


def test_a_chunked_body_over_the_limit_is_refused(server: HardServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    try:
        response = httpx.post(f"{server.url}/v1/models/switch", content=chunks(), headers=server.headers,
                              timeout=30)
    except httpx.HTTPError:
        pass  # closed while sending: refused too
    else:
        assert response.status_code in (400, 413)
    assert server.get("/v1/models/status").status_code == 200


# Slow clients ------------------------------------------------------------------------------------
def test_500_half_sent_request_headers_are_closed_after_the_client_timeout(server: HardServer) -> None:
    fds_before = server.process.num_fds()
    sockets = []
    try:
        for _ in range(500):
            sock = connect(server)
            sock.sendall(b"GET /v1/models/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bea")
            sockets.append(sock)
        for sock in sockets:
            sock.settimeout(CLIENT_TIMEOUT_S + 15)
        assert all(closed_by_peer(sock) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    wait_for(lambda: server.process.num_fds() <= fds_before + 5, timeout=10,
             message="the server's file descriptors back to where they were")


def test_a_request_body_that_stops_halfway_is_closed_after_the_client_timeout(server: HardServer) -> None:
    with connect(server) as sock:
        sock.sendall(f"POST /v1/models/switch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"target".encode())
        started = time.monotonic()
        sock.settimeout(CLIENT_TIMEOUT_S + 15)
        assert closed_by_peer(sock)
        assert time.monotonic() - started < CLIENT_TIMEOUT_S + 10


def test_an_idle_keep_alive_connection_is_closed(server: HardServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.settimeout(CLIENT_TIMEOUT_S + 15)
        assert closed_by_peer(sock)


# Malformed input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/audit?limit=%C2%B2", None),
    ("GET", "/v1/audit?limit=" + "9" * 5000, None),
    ("GET", "/v1/audit?limit=0", None),
    ("GET", "/v1/audit?limit=%FF", None),
    ("POST", "/v1/models/switch", b"[" * 100_000),
    ("POST", "/v1/models/switch", b'{"target_model": ' + b"7" * 5000 + b"}"),
    ("POST", "/v1/models/switch", b'{"target_model": 12}'),
    ("POST", "/v1/models/switch", b'{"target_model": true}'),
    ("POST", "/v1/models/switch", b'{"target_model": ["small"]}'),
    ("POST", "/v1/models/switch", b'{"target_model": {"id": "small"}}'),
    ("POST", "/v1/models/switch", b'{"target_model": 1.5e999}'),
    ("POST", "/v1/models/switch", b'{"target_model": ""}'),
    ("POST", "/v1/models/switch", b"\xff\xfe{}"),
    ("POST", "/v1/chat/completions", b'{"model": ' + b"1" * 5000 + b', "messages": []}'),
    ("POST", "/v1/chat/completions", b"[" * 100_000),
    ("GET", "/v1/models/plan?target_model=", None),
])
def test_malformed_input_is_a_400_never_a_500(server: HardServer, method: str, path: str,
                                               body: bytes | None) -> None:
    response = httpx.request(method, server.url + path, content=body, timeout=30,
                             headers={**server.headers, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    if isinstance(error, dict):  # the OpenAI-compatible routes answer in OpenAI's shape
        error = error["code"]
    assert error == "bad_request"


def test_nothing_malformed_left_a_traceback_in_the_log(server: HardServer) -> None:
    assert "Traceback" not in server.log_path.read_text(errors="replace")


# Protocol ----------------------------------------------------------------------------------------
def test_401_names_the_bearer_scheme(server: HardServer) -> None:
    response = httpx.get(f"{server.url}/v1/models/status", timeout=10)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"] == "unauthorized"


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("DELETE", "/v1/models/status", "GET"),
    ("PUT", "/v1/models/switch", "POST"),
    ("GET", "/v1/models/small/load", "POST"),
    ("PATCH", "/healthz", "GET"),
    ("TRACE", "/v1/audit", "GET"),
])
def test_405_says_what_is_allowed(server: HardServer, method: str, path: str, allowed: str) -> None:
    response = httpx.request(method, server.url + path, headers=server.headers, timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["error"] == "method_not_allowed"


def test_a_header_over_64_kb_gets_431_and_the_server_goes_on(server: HardServer) -> None:
    response = httpx.get(f"{server.url}/v1/models/status", timeout=10,
                         headers={**server.headers, "X-Padding": "x" * (MAX_HEADER_BYTES + 1000)})
    assert response.status_code == 431
    assert response.json()["error"] == "headers_too_large"
    just_under = {**server.headers, "X-Padding": "x" * (MAX_HEADER_BYTES - 2000)}
    assert httpx.get(f"{server.url}/v1/models/status", headers=just_under, timeout=10).status_code == 200


# Engines answer only the orchestrator ------------------------------------------------------------------
def engine_of(server: HardServer, model_id: str) -> tuple[str, psutil.Process]:
    endpoint = server.status()["models"][model_id]["endpoint"]
    port = int(endpoint.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return endpoint, psutil.Process(conn.pid)
    raise AssertionError(f"no process listens on {endpoint}")


def test_an_engine_answers_only_with_its_secret_which_ps_does_not_show(server: HardServer) -> None:
    done = server.post("/v1/models/switch", json={"target_model": "small", "stream": False})
    assert done.json()["status"] in ("success", "already_loaded")
    endpoint, engine = engine_of(server, "small")
    chat = {"model": "small", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{endpoint}/v1/chat/completions", json=chat, timeout=10).status_code == 401
    assert httpx.get(f"{endpoint}/v1/models", timeout=10).status_code == 401
    wrong = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{endpoint}/v1/models", headers=wrong, timeout=10).status_code == 401
    assert httpx.get(f"{endpoint}/health", timeout=10).status_code == 200  # open, as vLLM's is
    secret = engine.environ().get("VLLM_API_KEY")
    assert secret and secret not in " ".join(engine.cmdline())
    assert httpx.get(f"{endpoint}/v1/models", headers={"Authorization": f"Bearer {secret}"},
                     timeout=10).status_code == 200
    # The orchestrator's own requests carry it: the proxy answers.
    reply = server.post("/v1/chat/completions", json=chat)
    assert reply.status_code == 200 and "You said: hi" in reply.json()["choices"][0]["message"]["content"]


def test_an_engine_put_to_sleep_behind_the_orchestrators_back_is_shown_sleeping(server: HardServer) -> None:
    if server.status()["models"]["small"]["status"] != "running":
        server.post("/v1/models/switch", json={"target_model": "small", "stream": False})
    endpoint, _ = engine_of(server, "small")
    # What any local user can do: vLLM's sleep routes take no key.
    assert httpx.post(f"{endpoint}/sleep", params={"level": 1}, timeout=10).status_code == 200
    wait_for(lambda: server.status()["models"]["small"]["status"] == "sleeping", timeout=10,
             message="small shown sleeping")
    assert httpx.post(f"{endpoint}/wake_up", timeout=10).status_code == 200
    wait_for(lambda: server.status()["models"]["small"]["status"] == "running", timeout=10,
             message="small shown running again")
    entries = server.get("/v1/audit").json()["entries"]
    actions = {e["action"] for e in entries if e["target"] == "small" and e["actor"] == "orchestrator"}
    assert {"engine_asleep", "engine_awake"} <= actions


def test_the_orchestrators_own_sleep_and_wake_are_not_mistaken_for_outside_ones(server: HardServer) -> None:
    if server.status()["models"]["small"]["status"] != "running":
        server.post("/v1/models/switch", json={"target_model": "small", "stream": False})

    def detected() -> int:
        entries = server.get("/v1/audit", params={"limit": 5000}).json()["entries"]
        return sum(e["action"] in ("engine_asleep", "engine_awake") for e in entries)

    before = detected()
    assert server.post("/v1/models/small/sleep").json()["status"] == "sleeping"
    time.sleep(2.5)  # longer than the health interval: a poll has seen it asleep
    assert server.status()["models"]["small"]["status"] == "sleeping"
    assert server.post("/v1/models/small/wake").json()["status"] == "running"
    time.sleep(2.5)
    assert server.status()["models"]["small"]["status"] == "running"
    assert detected() == before


def test_the_sim_engine_guards_what_vllm_guards(tmp_path: Path) -> None:
    from dashboard.engines.process import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dashboard.engines.sim", "--model-id", "m", "--port", str(port),
                             "--load-seconds", "0.2", "--sleep-mode", "--api-key", "flag-key-0123456789"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "VLLM_API_KEY": "env-key-0123456789"})
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(up, timeout=20, message="the sim to serve")
        assert httpx.get(f"{url}/v1/models", timeout=5).json() == {"error": "Unauthorized"}
        # --api-key wins over VLLM_API_KEY, as in vLLM.
        for key, code in (("env-key-0123456789", 401), ("flag-key-0123456789", 200)):
            assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"},
                             timeout=5).status_code == code
        assert httpx.get(f"{url}/is_sleeping", timeout=5).status_code == 200
        assert httpx.post(f"{url}/sleep", timeout=5).status_code == 200  # the dev routes are open, as in vLLM
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_restarted_server_adopts_an_engine_and_still_knows_its_secret(tmp_path: Path) -> None:
    catalog = serve_catalog(TEST_CATALOG, switches_per_minute=1000)
    first = HardServer(tmp_path, catalog)
    done = first.post("/v1/models/switch", json={"target_model": "small", "stream": False})
    assert done.json()["status"] == "success"
    first.kill()  # no clean-up: the engine is left running for the next start to adopt
    second = HardServer(tmp_path, catalog, data_dir=first.data_dir)
    try:
        assert second.status()["models"]["small"]["status"] == "running"
        chat = {"model": "small", "messages": [{"role": "user", "content": "still there?"}]}
        reply = second.post("/v1/chat/completions", json=chat)
        assert reply.status_code == 200, reply.text
    finally:
        second.stop()
    wait_for(lambda: not engines_of(first.data_dir), timeout=15, message="its engines to exit")


# Keys and files ------------------------------------------------------------------------------------
def test_the_data_dir_holds_nothing_others_can_read(server: HardServer) -> None:
    server.post("/v1/models/switch", json={"target_model": "small", "stream": False})
    wait_for(lambda: any((server.data_dir / "logs").iterdir()), timeout=10, message="an engine log")
    loose = []
    for folder, dirs, files in os.walk(server.data_dir):
        for name in dirs:
            if stat.S_IMODE(os.stat(Path(folder, name)).st_mode) != 0o700:
                loose.append(Path(folder, name))
        for name in files:
            path = Path(folder, name)
            if path.exists() and stat.S_IMODE(os.stat(path).st_mode) & 0o077:
                loose.append(path)
    assert stat.S_IMODE(os.stat(server.data_dir).st_mode) == 0o700
    assert not loose, f"readable by others: {loose}"


def test_a_short_key_or_a_key_file_others_can_read_stops_the_server_at_start(tmp_path: Path) -> None:
    config = tmp_path / "catalog.toml"
    config.write_text(TEST_CATALOG)
    data_dir = tmp_path / "data"

    def serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        from dashboard.engines.process import free_port

        env = {k: v for k, v in {**os.environ, **env}.items() if k != "SMARTSWITCH_API_KEYS" or v}
        return subprocess.run([sys.executable, "-m", "dashboard.cli", "serve", "--config", str(config),
                               "--port", str(free_port()), "--data-dir", str(data_dir)],
                              capture_output=True, text=True, timeout=60, env=env)

    short = serve({"SMARTSWITCH_API_KEYS": "k1"})
    assert short.returncode == 2 and "at least 16" in short.stderr
    data_dir.mkdir(mode=0o700, exist_ok=True)
    key_file = data_dir / "api-key"
    key_file.write_text("a-key-long-enough-0123456789\n")
    key_file.chmod(0o644)
    loose = serve({"SMARTSWITCH_API_KEYS": ""})
    assert loose.returncode == 2 and "readable by others" in loose.stderr and "chmod 600" in loose.stderr
    key_file.write_text("")
    key_file.chmod(0o600)
    empty = serve({"SMARTSWITCH_API_KEYS": ""})
    assert empty.returncode == 2 and "is empty" in empty.stderr
    assert not engines_of(data_dir)


def test_the_cli_sends_the_local_key_file_only_to_its_own_server(tmp_path: Path) -> None:
    catalog = serve_catalog(TEST_CATALOG)
    env = {k: v for k, v in os.environ.items() if k not in ("SMARTSWITCH_API_KEYS", "SMARTSWITCH_API_KEY")}
    from dashboard.engines.process import free_port

    port = free_port()
    config = tmp_path / "catalog.toml"
    config.write_text(catalog)
    data_dir = tmp_path / "data"
    log = open(tmp_path / "own.log", "wb")  # noqa: SIM115 - closed below
    own = subprocess.Popen([sys.executable, "-m", "dashboard.cli", "serve", "--config", str(config),
                            "--port", str(port), "--data-dir", str(data_dir)], stdout=log, stderr=subprocess.STDOUT,
                           env=env)
    # Something else listening on another local port: it must never see the key.
    seen: list[bytes] = []
    other = socket.create_server(("127.0.0.1", 0))
    other_port = other.getsockname()[1]

    def listen() -> None:
        conn, _ = other.accept()
        with conn:
            seen.append(conn.recv(65536))
            conn.sendall(b'HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 46\r\n'
                         b'Connection: close\r\n\r\n{"error": "unauthorized", "message": "no key"}')

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        wait_for(lambda: (data_dir / "server.json").exists() and (data_dir / "api-key").exists(), timeout=60,
                 message="the server to write its key")
        cli_env = {**env, "SMARTSWITCH_DATA_DIR": str(data_dir)}

        def cli(url: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "dashboard.cli", "status", "--json", "--url", url],
                                  capture_output=True, text=True, timeout=60, env=cli_env)

        wait_for(lambda: cli(f"http://127.0.0.1:{port}").returncode == 0, timeout=60,
                 message="the CLI to reach its own server with the key file")
        refused = cli(f"http://127.0.0.1:{other_port}")
        listener.join(10)
        key = (data_dir / "api-key").read_text().strip()
        assert seen and key.encode() not in seen[0] and b"Authorization" not in seen[0]
        assert refused.returncode == 1 and "--api-key" in refused.stderr
    finally:
        other.close()
        own.send_signal(signal.SIGTERM)
        own.wait(30)
        log.close()
