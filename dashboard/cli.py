"""The ``smartswitch`` command: serve the dashboard + API, or drive a server (status, plan, switch, cancel)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

import httpx

from dashboard.client import DEFAULT_URL, ApiError, SmartswitchClient
from dashboard.config import ConfigError, load_config
from dashboard.events import (
    CancelledEvent,
    CompleteEvent,
    ErrorEvent,
    ProgressEvent,
    StageEvent,
    SwitchEvent,
    to_dict,
)
from dashboard.orchestrator.core import CONFIG_ENV, DATA_DIR_ENV

STATUS_ICON = {"running": "●", "loading": "◐", "unloading": "◑", "sleeping": "☾", "failed": "✖", "stopped": " "}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smartswitch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the dashboard at / and the API at /v1/... from one process")
    serve.add_argument("--config", help="catalog TOML (default: the embedded demo catalog)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5006)
    serve.add_argument("--data-dir", help="history, audit log, engine logs, API key (default from config)")

    def remote(name: str, help_: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("--url", default=os.environ.get("SMARTSWITCH_URL", DEFAULT_URL))
        cmd.add_argument("--api-key", default=None, help="default: SMARTSWITCH_API_KEY or the local key file")
        cmd.add_argument("--json", action="store_true", help="print raw JSON")
        return cmd

    remote("status", "models, GPU memory and the running switch")
    remote("plan", "what a switch would unload (dry run)").add_argument("model")
    remote("switch", "switch to a model with a progress bar (Ctrl-C cancels)").add_argument("model")
    remote("cancel", "cancel the running switch")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    try:
        with SmartswitchClient(args.url, args.api_key) as client:
            return {"status": status_command, "plan": plan_command, "switch": switch_command,
                    "cancel": cancel_command}[args.command](client, args)
    except ApiError as exc:
        print(f"error: {exc.message} ({exc.code})", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}. Is `smartswitch serve` running?", file=sys.stderr)
        return 1


def serve_command(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"smartswitch: {exc}", file=sys.stderr)
        return 2
    if args.config:
        os.environ[CONFIG_ENV] = os.path.abspath(args.config)
    if args.data_dir:
        os.environ[DATA_DIR_ENV] = os.path.abspath(args.data_dir)
    import logging

    import panel as pn

    from dashboard.api.routes import ROUTES, api_context
    from dashboard.orchestrator.core import get_orchestrator
    from dashboard.ui.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # health polls every 0.1 s would drown the log
    try:
        port = get_orchestrator()
    except ConfigError as exc:
        print(f"smartswitch: {exc}", file=sys.stderr)
        return 2
    api_context()  # makes (and logs) the API key before the first request
    print(f"smartswitch: {len(config.models)} models from {config.source}; "
          f"dashboard http://{args.host}:{args.port}/ API http://{args.host}:{args.port}/v1/", flush=True)
    server = pn.serve({"/": create_app}, address=args.host, port=args.port, show=False, start=False,
                      title="smartswitch", extra_patterns=ROUTES,
                      # Closed tabs stop costing refreshes within seconds, not the default ~30 s.
                      check_unused_sessions_milliseconds=2000, unused_session_lifetime_milliseconds=3000,
                      websocket_origin=[f"{args.host}:{args.port}", f"localhost:{args.port}",
                                        f"127.0.0.1:{args.port}"])
    loop = server.io_loop

    def stop(*_: object) -> None:
        loop.add_callback_from_signal(loop.stop)

    # SIGTERM and Ctrl-C end the loop; then every engine is stopped, none is orphaned.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    try:
        loop.start()
    finally:
        port.close()
    return 0


def status_command(client: SmartswitchClient, args: argparse.Namespace) -> int:
    status = client.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    gpu = status["gpu"]
    print(f"GPU ({status['source']}): {gpu['used_memory_gb']:.1f} / {gpu['total_memory_gb']:.1f} GB used, "
          f"{gpu['available_memory_gb']:.1f} GB free")
    for mid, m in sorted(status["models"].items(), key=lambda kv: kv[1]["status"] != "running"):
        memory = m.get("gpu_memory_used_gb", m.get("gpu_memory_required_gb"))
        label = "" if m["status"] == "stopped" else m["status"]
        if m["status"] == "loading":
            label += f" {m['load_progress']}%"
        print(f" {STATUS_ICON.get(m['status'], '?')} {mid:<32} {m['size_gb']:>6.0f} GB disk "
              f"{memory:>6.1f} GB GPU  {label}")
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
        print(f"Switch to {args.model}: unload {unload}; needs {plan['required_gb']} GB, "
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
