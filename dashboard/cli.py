"""The ``smartswitch`` command: serve the dashboard + API, or drive a server (status, plan, switch, cancel)."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from dashboard.api.limits import CLIENT_TIMEOUT_S
from dashboard.client import DEFAULT_URL, KEY_FILE_RULE, ApiError, SmartswitchClient
from dashboard.config import ConfigError, load_config
from dashboard.errors import DataDirError
from dashboard.events import (
    CancelledEvent,
    CompleteEvent,
    ErrorEvent,
    ProgressEvent,
    StageEvent,
    SwitchEvent,
    to_dict,
)
from dashboard.orchestrator.states import ModelStatus
from dashboard.users import USERS_FILE, UsersFileError, read_users, remove_user, write_user

LOG_LEVELS = ("debug", "info", "warning", "error")
S = ModelStatus
STATUS_ICON: dict[ModelStatus, str] = {S.RUNNING: "●", S.LOADING: "◐", S.UNLOADING: "◑", S.SLEEPING: "☾",
                                       S.FAILED: "✖", S.STOPPED: " "}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smartswitch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the dashboard at / and the API at /v1/... from one process")
    serve.add_argument("--config", help="catalog TOML, or the name of a shipped one (demo, demo-4gpu); "
                                         "default: the embedded demo catalog")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5006)
    serve.add_argument("--data-dir", help="history, audit log, engine logs, API key (default from config); "
                                          "one server per data dir")
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                       help="debug also shows every HTTP request (default: info)")
    serve.add_argument("--users", metavar="FILE",
                       help="who may log in to the dashboard (written by 'smartswitch users add'); default: the "
                            "data dir's users file if there is one. Required to bind beyond loopback")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="a name this server is reached by (its DNS name, a proxy's); requests naming any other "
                            "Host are refused. Loopback names are always allowed; on a non-loopback bind so are "
                            "this machine's names and addresses. Repeatable")
    serve.add_argument("--client-timeout", type=positive_seconds, default=CLIENT_TIMEOUT_S, metavar="SECONDS",
                       help="close a connection whose request header or body has not fully arrived within this "
                            f"long, and idle keep-alive connections after it (default: {CLIENT_TIMEOUT_S:g})")

    def remote(name: str, help_: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("--url", default=os.environ.get("SMARTSWITCH_URL", DEFAULT_URL))
        cmd.add_argument("--api-key", default=None,
                         help=f"default: SMARTSWITCH_API_KEY, else the local key file. {KEY_FILE_RULE}")
        cmd.add_argument("--json", action="store_true", help="print raw JSON")
        return cmd

    users = sub.add_parser("users", help="who may log in to the dashboard: add, remove, list")
    users.add_argument("action", choices=("add", "remove", "list"))
    users.add_argument("name", nargs="?")
    users.add_argument("--users", metavar="FILE", help="default: the users file of the data dir")
    users.add_argument("--data-dir", help="default: the config's")
    users.add_argument("--config", help="catalog TOML whose data dir to use")
    users.add_argument("--password-stdin", action="store_true", help="read the password from standard input")

    remote("status", "models, GPU memory and the running switch")
    remote("plan", "what a switch would unload (dry run)").add_argument("model")
    remote("switch", "switch to a model with a progress bar (Ctrl-C cancels)").add_argument("model")
    remote("cancel", "cancel the running switch")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    if args.command == "users":
        return users_command(args)
    try:
        with SmartswitchClient(args.url, args.api_key) as client:
            return {"status": status_command, "plan": plan_command, "switch": switch_command,
                    "cancel": cancel_command}[args.command](client, args)
    except ApiError as exc:
        print(f"error: {exc.message} ({exc.code})", file=sys.stderr)
        if exc.status == 401 and not args.api_key:
            print(f"hint: pass --api-key KEY or set SMARTSWITCH_API_KEY. {KEY_FILE_RULE}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}. Is `smartswitch serve` running?", file=sys.stderr)
        return 1


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 86400, got {text!r}")
    return value


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # health polls every 0.1 s would drown the log
    if level != "debug":
        # One line per HTTP request (pages, static files, polls) is noise; server errors still show.
        logging.getLogger("tornado.access").setLevel(logging.ERROR)


class Shutdown:
    """SIGTERM / Ctrl-C: the first asks for a clean stop, a second one exits at once."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.loop: Any = None  # the server's IOLoop once it exists

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested.is_set():
            print("smartswitch: stopping now without waiting; engines still running are adopted by the next "
                  "start on this data dir.", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested.set()
        print(f"smartswitch: {signal.Signals(signum).name}: stopping engines and shutting down "
              "(again to exit at once).", file=sys.stderr, flush=True)
        if self.loop is not None:
            self.loop.add_callback(self.loop.stop)


def serve_command(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    shutdown = Shutdown()
    shutdown.install()  # before the orchestrator starts: a signal during start-up still stops cleanly
    from dashboard.api.hosts import HostPolicy, is_loopback

    try:
        config = load_config(args.config)
        data_dir = Path(args.data_dir) if args.data_dir else config.data_dir
        users_file = Path(args.users) if args.users else data_dir / USERS_FILE
        if args.users or users_file.exists():
            count = len(read_users(users_file))  # a bad line stops the start, with its number
            if not count:
                raise UsersFileError(f"{users_file} has no users: add one with 'smartswitch users add NAME'.")
            login = f"login required ({count} user{'s' if count > 1 else ''} in {users_file})"
        elif not is_loopback(args.host):
            print(f"smartswitch: --host {args.host} lets other machines reach the dashboard, so it needs a login: "
                  f"add users with 'smartswitch users add NAME{_data_dir_arg(args)}' (or pass --users FILE).",
                  file=sys.stderr)
            return 2
        else:
            users_file = None
            login = ("open to anyone on this machine: no login on a loopback bind without users "
                     "('smartswitch users add NAME' to require one)")
        from dashboard.server import build_app

        app = build_app(config, data_dir, host=args.host, port=args.port)
    except (ConfigError, DataDirError, UsersFileError, OSError) as exc:
        print(f"smartswitch: {exc}", file=sys.stderr)
        return 2

    from dashboard.api.limits import HttpLimits, guard_server
    from dashboard.login import UsersFileAuth, cookie_secret

    hosts = HostPolicy.for_bind(args.host, tuple(args.allow_host))
    limits = HttpLimits(config.server.max_body_bytes, client_timeout_s=args.client_timeout, hosts=hosts,
                        page_views_per_minute=config.server.page_views_per_minute)
    auth: dict[str, Any] = {} if users_file is None else {
        "auth_provider": UsersFileAuth(users_file), "cookie_secret": cookie_secret(app.data_dir)}
    try:
        server = app.panel_server(args.host, args.port, limits, hosts, **auth)
    except OSError as exc:
        print(f"smartswitch: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}. "
              "Pick another --port.", file=sys.stderr)
        return stop_app(app, config.switching.stop_timeout_s) or 2
    guard_server(server, limits)  # before the loop runs: no request is served without it
    print(f"smartswitch: {len(config.models)} models from {config.source}; data dir {app.data_dir}; "
          f"dashboard {app.url}/ API {app.url}/v1/", flush=True)
    print(f"smartswitch: dashboard {login}.", flush=True)
    shutdown.loop = server.io_loop
    shutdown.install()  # again: pn.serve puts in its own SIGINT handler, which knows nothing of the engines
    if not shutdown.requested.is_set():
        server.start()
        server.io_loop.start()
    server.stop()
    return stop_app(app, config.switching.stop_timeout_s)


SHUTDOWN_GRACE_S = 30.0


def _data_dir_arg(args: argparse.Namespace) -> str:
    return f" --data-dir {args.data_dir}" if args.data_dir else ""


def users_command(args: argparse.Namespace) -> int:
    """Add, remove or list the users who may log in to the dashboard."""
    try:
        if args.users:
            path = Path(args.users)
        else:
            path = (Path(args.data_dir) if args.data_dir else load_config(args.config).data_dir) / USERS_FILE
        if args.action == "list":
            for name in read_users(path) if path.exists() else {}:
                print(name)
            return 0
        if not args.name:
            print(f"smartswitch: users {args.action} needs a user name.", file=sys.stderr)
            return 2
        if args.action == "remove":
            if not remove_user(path, args.name):
                print(f"smartswitch: no user {args.name!r} in {path}.", file=sys.stderr)
                return 1
            print(f"removed {args.name} from {path}")
            return 0
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = getpass.getpass(f"password for {args.name}: ")
            if getpass.getpass("again: ") != password:
                print("smartswitch: the passwords differ.", file=sys.stderr)
                return 2
        new = write_user(path, args.name, password)
        print(f"{'added' if new else 'changed the password of'} {args.name} in {path}")
        return 0
    except (ConfigError, UsersFileError, OSError) as exc:
        print(f"smartswitch: {exc}", file=sys.stderr)
        return 2


def stop_app(app: Any, stop_timeout_s: float) -> int:
    """Stop every engine and free the data dir, within a bound; 0 when all went well."""
    # Draining and stopping are each bounded by stop_timeout_s; the grace covers the rest.
    bound = 2 * stop_timeout_s + SHUTDOWN_GRACE_S
    errors: list[BaseException] = []

    def close() -> None:
        try:
            app.close()
        except BaseException as exc:  # reported below, without a traceback
            errors.append(exc)

    worker = threading.Thread(target=close, name="smartswitch-shutdown", daemon=True)
    worker.start()
    worker.join(bound)
    if worker.is_alive():
        print(f"smartswitch: shutdown took over {bound:.0f} s; exiting. Engines still running are adopted by "
              "the next start on this data dir.", file=sys.stderr, flush=True)
        return 1
    if errors:
        logging.getLogger(__name__).error("shutdown failed", exc_info=errors[0])
        return 1
    print("smartswitch: stopped.", flush=True)
    return 0


def status_command(client: SmartswitchClient, args: argparse.Namespace) -> int:
    status = client.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    gpu = status["gpu"]
    print(f"GPU ({status['source']}): {gpu['used_memory_gb']:.1f} / {gpu['total_memory_gb']:.1f} GB used, "
          f"{gpu['available_memory_gb']:.1f} GB free")
    devices = status.get("devices") or []
    if len(devices) > 1:  # several GPUs: what each holds
        for d in devices:
            held = ", ".join(f"{m} {gb:.0f} GB" for m, gb in d.get("models", {}).items()) or "-"
            print(f"  GPU {d['index']} {d.get('name', '')}: {d['used_gb']:.1f} / {d['total_gb']:.1f} GB  {held}")
    for mid, m in sorted(status["models"].items(), key=lambda kv: kv[1]["status"] != S.RUNNING):
        memory = m.get("gpu_memory_used_gb", m.get("gpu_memory_required_gb"))
        label = "" if m["status"] == S.STOPPED else m["status"]
        if m["status"] == S.LOADING:
            label += f" {m['load_progress']}%"
        gpus = f"  GPU {','.join(map(str, m['gpus']))}" if len(devices) > 1 and m.get("gpus") else ""
        print(f" {STATUS_ICON.get(m['status'], '?')} {mid:<32} {m['size_gb']:>6.0f} GB disk "
              f"{memory:>6.1f} GB GPU  {label}{gpus}")
    if status.get("switch"):
        sw = status["switch"]
        print(f"Switching {sw['from_model'] or '-'} -> {sw['target_model']}: {sw['stage']} {sw['progress']}%")
    return 0


def plan_command(client: SmartswitchClient, args: argparse.Namespace) -> int:
    plan = client.plan(args.model)
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    if plan["already_loaded"]:
        print(f"{args.model} is already loaded.")
    elif not plan["feasible"]:
        print(f"Not possible: {plan['reason']}")
        return 1
    else:
        unload = ", ".join(plan["unload"]) or "nothing"
        by_device = {d: ms for d, ms in (plan.get("unload_by_device") or {}).items() if ms}
        if by_device:
            unload = "; ".join(f"GPU {d}: {', '.join(ms)}" for d, ms in sorted(by_device.items()))
        where = f" on GPU {','.join(map(str, plan['gpus']))}" if len(plan.get("gpus") or []) > 1 or by_device else ""
        print(f"Switch to {args.model}{where}: unload {unload}; needs {plan['required_gb']} GB, "
              f"{plan['available_gb']} GB free now, {plan['free_gb_after']} GB free after; "
              f"~{plan['estimated_load_time_seconds']:.0f} s to load.")
    return 0


def progress_line(event: SwitchEvent, width: int = 30) -> str:
    """One terminal line for a switch event (progress bar with stage, ETA and bytes)."""
    if isinstance(event, ProgressEvent):
        filled = width * event.progress // 100
        bar = "#" * filled + "-" * (width - filled)
        eta = f" ~{event.eta_seconds:.0f}s left" if event.eta_seconds is not None else ""
        size = ""
        if event.bytes_total:
            size = f" {(event.bytes_loaded or 0) / 1e9:.1f}/{event.bytes_total / 1e9:.1f} GB"
        return f"[{bar}] {event.progress:3d}% {event.message}{eta}{size}"
    if isinstance(event, StageEvent):
        return event.message
    if isinstance(event, CompleteEvent):
        return f"Done: {event.target_model} is ready ({event.status}, {event.total_time_seconds:.1f} s)."
    if isinstance(event, ErrorEvent):
        return f"Failed: {event.message}"
    return f"Cancelled: {event.message}"


def switch_command(client: SmartswitchClient, args: argparse.Namespace) -> int:
    last: Any = None
    tty = sys.stdout.isatty()
    try:
        for event in client.switch_events(args.model):
            last = event
            line = progress_line(event)
            if args.json:
                print(json.dumps({"event": event.kind, **to_dict(event)}), flush=True)
            elif isinstance(event, ProgressEvent):
                # On a terminal the bar redraws in place; in a pipe each update is a line.
                print("\r" + line.ljust(100) if tty else line, end="" if tty else "\n", flush=True)
            else:
                print(("\n" if tty else "") + line, flush=True)
    except KeyboardInterrupt:
        print("\nCancelling the switch...", flush=True)
        started = time.monotonic()
        client.cancel()
        print(f"Cancelled ({time.monotonic() - started:.1f} s).")
        return 130
    return 0 if isinstance(last, CompleteEvent) else 1 if not isinstance(last, CancelledEvent) else 130


def cancel_command(client: SmartswitchClient, args: argparse.Namespace) -> int:
    print("Cancelled the running switch." if client.cancel() else "No switch is running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
