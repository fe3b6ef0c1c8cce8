"""The sim engine: a real HTTP server process that starts, logs and serves like ``vllm serve``.

Stdlib only (it also runs inside a minimal container). It refuses connections while "loading",
prints vLLM-format log lines with real timing, then serves /health, /v1/models, /v1/chat/completions
(replies are marked simulated) and, with --sleep-mode, /sleep, /wake_up and /is_sleeping. With
--api-key (or VLLM_API_KEY) it guards the routes vLLM guards, as vLLM does: /v1/... answer 401 without
``Authorization: Bearer KEY``; /health and the sleep routes stay open.
Fault options make it exit, hang or run out of memory on purpose. ``--workers`` adds child processes
in its process group that, like vLLM's EngineCore and workers, take their time to exit.

With a virtual GPU's ledger (``SMARTSWITCH_VIRTUAL_GPU_DIR``) it books its footprint there, split evenly
over the devices ``CUDA_VISIBLE_DEVICES`` names (device 0 without it), as a real engine would take it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlparse

GIB = 1024**3
LEDGER_ENV = "SMARTSWITCH_VIRTUAL_GPU_DIR"  # the virtual GPU's ledger of memory held after exit
API_KEY_ENV = "VLLM_API_KEY"
GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")  # vLLM's AuthenticationMiddleware guards these only
STAGES = ("start", "weights", "kv_cache", "graphs")
SHARES = {"start": 0.10, "weights": 0.60, "kv_cache": 0.15, "graphs": 0.15}
SLEEP_RESIDUAL = 0.05  # what level-1 sleep leaves on the GPU (the planner assumes the same share)


def visible_devices() -> tuple[int, ...]:
    """The device indices ``CUDA_VISIBLE_DEVICES`` names (device 0 when unset or not plain indices)."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    indices = tuple(int(part) for part in raw.split(",") if part.strip().isdigit())
    return indices or (0,)


def book(model_id: str, gb: float, *, pid: int | None = None, held: bool = False) -> None:
    """Book ``gb`` for process ``pid`` (this one) in the virtual GPU's ledger, split over our devices."""
    ledger = os.environ.get(LEDGER_ENV)
    if not ledger:
        return
    devices = visible_devices()
    entry = {"model": model_id, "held": held, "devices": {str(d): gb / len(devices) for d in devices}}
    path = os.path.join(ledger, str(pid or os.getpid()))
    with contextlib.suppress(OSError):  # the ledger is bookkeeping: an engine never fails over it
        # 0600: the ledger is in the server's data dir, where every file is its user's alone.
        with open(path + ".tmp", "w", opener=lambda p, flags: os.open(p, flags, 0o600)) as file:
            json.dump(entry, file)
        os.replace(path + ".tmp", path)  # whole or not at all: the reader never sees half an entry


def unbook() -> None:
    ledger = os.environ.get(LEDGER_ENV)
    if ledger:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(ledger, str(os.getpid())))


class Log:
    """Prints lines in vLLM's format: ``(APIServer pid=N) INFO MM-DD HH:MM:SS [file.py:line] message``."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()

    def __call__(self, message: str, *, proc: str = "APIServer", level: str = "INFO",
                 where: str = "sim.py:1") -> None:
        stamp = time.strftime("%m-%d %H:%M:%S")
        self.raw(f"({proc} pid={self.pid}) {level} {stamp} [{where}] {message}\n")

    def raw(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()


log = Log()


def fault(args: argparse.Namespace, stage: str) -> None:
    """Apply --fail-at / --hang-at when the start reaches ``stage``."""
    if args.fail_at == stage:
        log("EngineCore failed to start.", proc="EngineCore", level="ERROR", where="core.py:1101")
        log.raw("Traceback (most recent call last):\n"
                '  File "/opt/venv/lib/python3.11/site-packages/vllm/v1/engine/core.py", line 1092, in run\n'
                "    engine_core = EngineCoreProc(*args, **kwargs)\n"
                f"RuntimeError: simulated engine failure at {stage}\n")
        sys.exit(1)
    if args.hang_at == stage:
        while True:  # silent, never serving: only a stall timeout can notice
            time.sleep(3600)


def stage_seconds(args: argparse.Namespace) -> dict[str, float]:
    """Seconds per start-up stage: shares of --load-seconds; with --read-gbps the weights take the checkpoint
    at that rate and --load-seconds is the engine's own start (process, KV cache, graphs), as on a real box."""
    if not args.read_gbps:
        return {stage: args.load_seconds * share for stage, share in SHARES.items()}
    fixed = 1.0 - SHARES["weights"]
    return {stage: args.size_gb / args.read_gbps if stage == "weights" else args.load_seconds * share / fixed
            for stage, share in SHARES.items()}


def start_up(args: argparse.Namespace) -> None:
    """Print the start-up log with real timing, scaled to --load-seconds."""
    seconds = stage_seconds(args)
    size_gib = args.size_gb * 1e9 / GIB
    memory_gib = args.gpu_memory_gb * 1e9 / GIB
    log(f"non-default args: {{'model': '/models/{args.model_id}', 'served_model_name': ['{args.model_id}'], "
        f"'port': {args.port}}}", where="api_utils.py:286")
    log("Resolved architecture: LlamaForCausalLM", where="model.py:733")
    fault(args, "start")
    time.sleep(seconds["start"])
    log(f"Starting to load model /models/{args.model_id}...", proc="Worker", where="cpu_model_runner.py:68")
    log(f"Filesystem type for checkpoints: EXT4. Checkpoint size: {size_gib:.2f} GiB. Available RAM: 21.74 GiB.",
        proc="Worker", where="weight_utils.py:1108")
    weights_s = seconds["weights"]
    started = time.monotonic()
    for done in range(args.shards + 1):
        if done:
            time.sleep(weights_s / args.shards)
        if args.oom and done == args.shards // 2:
            log("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                "capacity of 79.19 GiB of which 1.06 GiB is free.", proc="Worker", level="ERROR",
                where="multiproc_executor.py:1063")
            sys.exit(1)
        if args.fail_at == "weights" and done == args.shards // 2:
            fault(args, "weights")
        if args.hang_at == "weights" and done == args.shards // 2:
            fault(args, "weights")
        elapsed = time.monotonic() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (args.shards - done) / rate if rate else 0.0
        bar = (f"Loading safetensors checkpoint shards: {100 * done // args.shards:3d}% Completed | "
               f"{done}/{args.shards} [{_clock(elapsed)}<{_clock(left)}, {rate:6.2f}it/s]")
        log.raw(("\r" if done else "") + bar + ("\n" if done == args.shards else ""))
    took = time.monotonic() - started
    log(f"Loading weights took {took:.2f} seconds", proc="Worker", where="default_loader.py:501")
    log(f"Model loading took {memory_gib * 0.8:.2f} GiB memory and {took + 0.1:.2f} seconds", proc="Worker",
        where="gpu_model_runner.py:2120")
    fault(args, "kv_cache")
    init_started = time.monotonic()
    time.sleep(seconds["kv_cache"])
    # Weights, KV cache and graphs add up to exactly the declared footprint, as vLLM's budget does.
    graphs_gib = min(0.5, memory_gib * 0.02)
    kv_gib = memory_gib * 0.2 - graphs_gib
    log(f"Available KV cache memory: {kv_gib:.2f} GiB", proc="Worker", where="gpu_worker.py:298")
    tokens = int(kv_gib * 40_000)
    log(f"GPU KV cache size: {tokens:,} tokens, Maximum concurrency for 256 tokens per request: "
        f"{tokens / 256:.2f}x", proc="EngineCore", where="kv_cache_utils.py:2327")
    fault(args, "graphs")
    log("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 67/67", proc="Worker",
        where="gpu_model_runner.py:3500")
    graphs_started = time.monotonic()
    time.sleep(seconds["graphs"])
    log(f"Graph capturing finished in {time.monotonic() - graphs_started:.0f} secs, took {graphs_gib:.2f} GiB",
        proc="Worker", where="gpu_model_runner.py:3560")
    log(f"init engine (profile, create kv cache, warmup model) took {time.monotonic() - init_started:.2f} s",
        proc="EngineCore", where="core.py:402")
    log(f"Starting vLLM server on http://{args.host}:{args.port}", where="entry.py:140")


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


class SimState:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sleeping = False
        self.lock = threading.Lock()
        # As vLLM: --api-key wins over VLLM_API_KEY; digests compared in constant time.
        key = args.api_key or os.environ.get(API_KEY_ENV) or ""
        self.key_digest = hashlib.sha256(key.encode()).digest() if key else None

    def authorized(self, path: str, header: str | None) -> bool:
        if self.key_digest is None or not path.startswith(GUARDED_PREFIX):
            return True
        scheme, _, token = (header or "").partition(" ")
        return bool(header) and scheme.lower() == "bearer" and \
            hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self.key_digest)


def make_handler(state: SimState) -> type[BaseHTTPRequestHandler]:
    args = state.args

    class Handler(BaseHTTPRequestHandler):
        server_version = "smartswitch-sim"

        def log_message(self, format: str, *values: Any) -> None:
            if not self.path.startswith("/health"):  # health is polled every 0.1 s: keep the log readable
                log.raw(f'INFO:     {self.client_address[0]}:{self.client_address[1]} - "{self.command} '
                        f'{self.path} HTTP/1.1" {values[1] if len(values) > 1 else ""} OK\n')

        def send_json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, status: int, message: str, kind: str = "BadRequestError") -> None:
            self.send_json(status, {"error": {"message": message, "type": kind, "code": status}})

        def refuse_unauthorized(self, path: str) -> bool:
            if state.authorized(path, self.headers.get("Authorization")):
                return False
            self.send_json(401, {"error": "Unauthorized"})
            return True

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if self.refuse_unauthorized(path):
                return
            if path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{
                    "id": args.model_id, "object": "model", "created": int(time.time()),
                    "owned_by": "smartswitch-sim", "root": f"/models/{args.model_id}", "max_model_len": 4096}]})
            elif path == "/is_sleeping" and args.sleep_mode:
                self.send_json(200, {"is_sleeping": state.sleeping})
            else:
                self.error(404, f"Not Found: {path}", "NotFoundError")

        def do_POST(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.refuse_unauthorized(url.path):
                return
            if url.path == "/v1/chat/completions":
                self.chat(raw)
            elif url.path == "/sleep" and args.sleep_mode:
                level = parse_qs(url.query).get("level", ["1"])[0]
                time.sleep(0.3)
                state.sleeping = True
                book(args.model_id, args.gpu_memory_gb * SLEEP_RESIDUAL)
                log(f"It took 0.30 seconds to fall asleep (level {level}).", where="gpu_worker.py:120")
                self.send_json(200, {})
            elif url.path == "/wake_up" and args.sleep_mode:
                time.sleep(0.3)
                state.sleeping = False
                book(args.model_id, args.gpu_memory_gb)
                log("It took 0.30 seconds to wake up.", where="gpu_worker.py:150")
                self.send_json(200, {})
            else:
                self.error(404, f"Not Found: {url.path}", "NotFoundError")

        def chat(self, raw: bytes) -> None:
            try:
                body = json.loads(raw or b"{}")
                messages = body["messages"]
                last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                self.error(400, "Invalid request: expected JSON with a 'messages' list.")
                return
            if body.get("model") not in (args.model_id, None):
                self.error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
                return
            if state.sleeping:
                self.error(503, "The engine is sleeping.", "ServiceUnavailableError")
                return
            if isinstance(last, list):  # OpenAI content parts
                last = " ".join(part.get("text", "") for part in last if isinstance(part, dict))
            words = f"[simulated reply from {args.model_id}] You said: {last}".split(" ")
            limit = body.get("max_tokens")
            if isinstance(limit, int) and limit > 0:
                words = words[:max(limit, 1)]
            reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())
            usage = {"prompt_tokens": sum(len(str(m.get("content", "")).split()) for m in messages),
                     "completion_tokens": len(words)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if not body.get("stream"):
                time.sleep(args.token_delay * len(words))  # the whole reply is generated before it is sent
                self.send_json(200, {
                    "id": reply_id, "object": "chat.completion", "created": created, "model": args.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                                 "finish_reason": "stop"}], "usage": usage})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()

            def chunk(delta: dict[str, Any], finish: str | None = None) -> None:
                data = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                        "model": args.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

            try:
                chunk({"role": "assistant", "content": ""})
                for i, word in enumerate(words):
                    if i == args.die_mid_reply:
                        log("EngineCore died in the middle of a reply.", proc="EngineCore", level="ERROR",
                            where="core.py:1130")
                        os._exit(1)
                    while i == args.stall_reply_after:  # silent, connection open: only a read timeout notices
                        time.sleep(3600)
                    time.sleep(args.token_delay)
                    chunk({"content": word if i == 0 else " " + word})
                chunk({}, "stop")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away mid-reply

    return Handler


def serve(args: argparse.Namespace) -> None:
    state = SimState(args)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    server.daemon_threads = True
    log.raw(f"INFO:     Started server process [{os.getpid()}]\nINFO:     Waiting for application startup.\n"
            "INFO:     Application startup complete.\n")
    if args.die_after_seconds is not None:
        def die() -> None:
            time.sleep(args.die_after_seconds)
            log("EngineCore encountered a fatal error.", proc="EngineCore", level="ERROR", where="core.py:1130")
            os._exit(1)
        threading.Thread(target=die, daemon=True).start()
    server.serve_forever(poll_interval=0.1)


def hold_after_exit(model_id: str, gb: float, seconds: float) -> None:
    """Leave ``gb`` held for ``seconds`` by a process outside our group, as a leaked worker would."""
    ledger = os.environ.get(LEDGER_ENV)
    if not ledger or gb <= 0:
        return
    import subprocess

    holder = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds!r})"],
                              start_new_session=True, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    book(model_id, gb, pid=holder.pid, held=True)


def start_workers(count: int, term_delay_s: float) -> list[int]:
    """Fork ``count`` workers into our process group (before any thread exists, so forking is safe)."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            run_worker(term_delay_s)
        pids.append(pid)
    return pids


def run_worker(term_delay_s: float) -> NoReturn:
    """Idle like an engine core; on SIGTERM or when the server is gone, exit only ``term_delay_s`` later.

    Silent: a line written between the server's tqdm redraws would break them.
    """
    parent = os.getppid()
    exit_at: list[float] = []

    def later(_signum: int, _frame: Any) -> None:
        if not exit_at:
            exit_at.append(time.monotonic() + term_delay_s)

    signal.signal(signal.SIGTERM, later)
    signal.signal(signal.SIGINT, later)
    while True:
        if os.getppid() != parent:  # the server died: notice, slowly, as vLLM's engine core does
            later(0, None)
        if exit_at and time.monotonic() >= exit_at[0]:
            os._exit(0)
        time.sleep(0.05)


def make_shutdown(args: argparse.Namespace) -> Callable[[int, Any], None]:
    def shutdown(signum: int, _frame: Any) -> None:
        log("[shutdown] API server: shutdown triggered", where="launcher.py:254")
        unbook()
        if args.hold_memory_after_exit:
            hold_after_exit(args.model_id, args.gpu_memory_gb, args.hold_memory_after_exit)
        log.raw("INFO:     Shutting down\nINFO:     Application shutdown complete.\n")
        os._exit(0)
    return shutdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dashboard.engines.sim", description=__doc__.split("\n")[0])
    parser.add_argument("--model-id", required=True, help="served model name (shows in ps)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--size-gb", type=float, default=10.0, help="checkpoint size on disk")
    parser.add_argument("--gpu-memory-gb", type=float, default=10.0, help="weights + KV cache footprint")
    parser.add_argument("--load-seconds", type=float, default=5.0, help="time from start to server up")
    parser.add_argument("--read-gbps", type=float, metavar="GB_PER_S",
                        help="read the checkpoint at this rate; --load-seconds is then the rest of the start")
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--sleep-mode", action="store_true", help="serve /sleep, /wake_up, /is_sleeping")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on {', '.join(GUARDED_PREFIX)} "
                                          f"(default: {API_KEY_ENV}; as vLLM, /health and sleep routes stay open)")
    parser.add_argument("--fail-at", choices=STAGES, help="exit with an error at this stage")
    parser.add_argument("--hang-at", choices=STAGES, help="stop printing and never serve from this stage")
    parser.add_argument("--oom", action="store_true", help="run out of GPU memory while loading weights")
    parser.add_argument("--die-after-seconds", type=float, help="crash this long after serving")
    parser.add_argument("--token-delay", type=float, default=0.02, metavar="SECONDS",
                        help="time per generated word (a streamed reply sends one word per chunk)")
    parser.add_argument("--stall-reply-after", type=int, metavar="N",
                        help="a streamed reply stops after N words and hangs with the connection open")
    parser.add_argument("--die-mid-reply", type=int, metavar="N",
                        help="the engine exits after sending N words of a streamed reply")
    parser.add_argument("--hold-memory-after-exit", type=float, metavar="SECONDS",
                        help="on stop, leave the GPU memory held this long by a leaked process (virtual GPU)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="fork N worker processes into the engine's process group")
    parser.add_argument("--worker-term-delay", type=float, default=0.0, metavar="SECONDS",
                        help="workers exit this long after SIGTERM or after the server died")
    args = parser.parse_args(argv)
    start_workers(args.workers, args.worker_term_delay)
    book(args.model_id, args.gpu_memory_gb)
    atexit.register(unbook)  # a start that fails on purpose exits through sys.exit
    shutdown = make_shutdown(args)
    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    start_up(args)
    serve(args)


if __name__ == "__main__":
    main()
