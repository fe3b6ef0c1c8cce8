"""Two lines to a lab in a notebook: ``lab = connect()`` and ``lab``.

``connect(url)`` reaches a shared ``smartswitch serve``; ``connect()`` starts an orchestrator of its own
(the demo catalog unless told otherwise) and serves its dashboard and API on a loopback port, so the
same ``lab.openai()`` and HTTP API work in both cases. A ``Lab`` shown in a cell is the dashboard; its
methods (``switch``, ``status``, ``plan``, ``openai``, ``gpu``, ``close``) are the same actions for code.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import getpass
import html
import logging
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import panel as pn

from dashboard.client import KEY_FILE_RULE, ApiError, SmartswitchClient, default_api_key
from dashboard.config import Config, load_config
from dashboard.errors import SmartswitchError
from dashboard.events import (
    CancelledEvent,
    CompleteEvent,
    ErrorEvent,
    ProgressEvent,
    StageEvent,
    SwitchEvent,
)

if TYPE_CHECKING:
    import openai
    import pandas as pd

    from dashboard.server import App
    from dashboard.ui.app import Dashboard
    from dashboard.ui.backend import LocalBackend, RemoteBackend
    from dashboard.ui.gauge import GpuGauge

log = logging.getLogger(__name__)

__all__ = ["ConnectFailed", "Lab", "SwitchFailed", "connect"]

HOST = "127.0.0.1"  # an embedded lab is reached from this machine only
BIND_TRIES = 3  # a free port can be taken between choosing it and binding it
SERVER_START_S = 60.0
PLAIN_STEP = 10  # without a notebook: a progress line each this many percent
DONE, FAILED = "#2e7d32", "#c62828"


class SwitchFailed(SmartswitchError):
    """A switch from a notebook or script ended without its model ready: refused, failed, cancelled or timed out."""

    code = "switch_failed"
    http_status = 502

    def __init__(self, model: str, reason: str, code: str = "switch_failed",
                 details: dict[str, Any] | None = None) -> None:
        # The figures of the answer that refused or failed it (available models, memory needed and free, ...).
        figures = {k: v for k, v in (details or {}).items() if k not in ("error", "message")}
        super().__init__(f"Switch to {model} failed: {reason}", **{**figures, "model": model, "reason": reason})
        self.model = model
        self.reason = reason
        self.code = code


class ConnectFailed(SmartswitchError):
    """``connect(url)`` found no server there, or one that refuses the key."""

    code = "connect_failed"
    http_status = 502


def in_notebook() -> bool:
    """Running in a Jupyter kernel (where Panel objects render in cells), not a plain interpreter."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


_extension_loaded = False


def ensure_extension() -> None:
    """Load Panel's notebook support once per kernel, its JS and CSS inline: GPU nodes often have no
    internet, so nothing may come from a CDN. Outside a kernel there is nothing to load."""
    global _extension_loaded
    if _extension_loaded or not in_notebook():
        return
    import dashboard.ui.kit  # noqa: F401 - its import settles the design below (Material UI sets its own)
    from dashboard.ui.offline import keep_sheets_inline

    pn.config.inline = True
    # Panel's own widgets inline, in Panel's plain design: Material's theme sheets would come from a CDN.
    pn.config.design = None
    pn.extension("tabulator", inline=True)
    keep_sheets_inline()
    _extension_loaded = True


# Connecting ------------------------------------------------------------------------------------------
def connect(url: str | None = None, *, key: str | None = None, config: Config | str | Path | None = None,
            data_dir: str | Path | None = None, user: str | None = None) -> Lab:
    """A lab: the dashboard for a cell, and switch / status / plan / openai for code.

    ``connect("http://gpu-box:5006")`` reaches a shared server with ``key``, else SMARTSWITCH_API_KEY, else
    the local key file (only for the local server that wrote it: ``KEY_FILE_RULE``; ``data_dir`` says where
    that server keeps it). ``connect()`` starts an orchestrator of its own on ``config`` (a ``Config``, a file
    or a shipped catalog's name; default the demo catalog) in ``data_dir`` (default a new temporary folder,
    removed on close) and serves its API on a free loopback port. ``user`` names you in the audit log and the
    dashboard (default: your login name).
    """
    user = user or login_name()
    ensure_extension()
    if url is not None:
        if config is not None:
            raise ValueError("config is for an embedded lab (connect() without a URL); a shared server has its own")
        return _connect_remote(url, key, data_dir, user)
    return _connect_embedded(key, config, data_dir, user)


def login_name() -> str:
    """The OS user's name; a container without a passwd entry for its user has none to give."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "notebook"


def _connect_remote(url: str, key: str | None, data_dir: str | Path | None, user: str) -> Lab:
    from dashboard.ui.backend import RemoteBackend

    url = url.rstrip("/")
    key = key or default_api_key(url, str(data_dir) if data_dir is not None else None)
    if not key:
        raise ConnectFailed(f"No API key for {url}: pass connect(url, key=KEY) or set SMARTSWITCH_API_KEY. "
                            f"{KEY_FILE_RULE}", url=url)
    client = SmartswitchClient(url, key)
    try:
        client.status()  # fail here, with the reason, rather than in the first cell that uses the lab
    except ApiError as exc:
        client.close()
        raise ConnectFailed(f"{url} refused the request: {exc.message} ({exc.code}).", url=url) from exc
    except httpx.HTTPError as exc:
        client.close()
        raise ConnectFailed(f"Cannot reach {url}: {exc}. Is `smartswitch serve` running there?", url=url) from exc
    return Lab(RemoteBackend(client), url=url, api_key=key, user=user)


def _connect_embedded(key: str | None, config: Config | str | Path | None, data_dir: str | Path | None,
                      user: str) -> Lab:
    from dashboard.api.auth import load_keys
    from dashboard.engines.process import free_port
    from dashboard.server import build_app
    from dashboard.ui.backend import LocalBackend

    if not isinstance(config, Config):
        config = load_config(config)
    owned = data_dir is None
    folder = Path(tempfile.mkdtemp(prefix="smartswitch-lab-")) if data_dir is None else Path(data_dir)
    try:
        for attempt in range(BIND_TRIES):
            port = free_port()
            # The key file's path is worth a log line on a server, not a red line in a cell: lab.api_key has it.
            auth_log = logging.getLogger("dashboard.api.auth")
            level, auth_log.level = auth_log.level, logging.ERROR
            try:
                app = build_app(config, folder, host=HOST, port=port)
            finally:
                auth_log.setLevel(level)
            server = EmbeddedServer(app, HOST, port)
            try:
                server.start()
                break
            except OSError as exc:
                app.close()
                if exc.errno != errno.EADDRINUSE or attempt == BIND_TRIES - 1:
                    raise
    except BaseException:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    # The embedded server's own key (SMARTSWITCH_API_KEYS, else the one it generated in its data dir).
    api_key = key or load_keys(app.data_dir)[0]
    return Lab(LocalBackend(app.port), url=f"http://{HOST}:{port}", api_key=api_key, user=user,
               app=app, server=server, owned_dir=folder if owned else None)


class EmbeddedServer:
    """An embedded lab's dashboard and API on a loopback port, as ``smartswitch serve`` makes them (HTTP
    limits included), on a Tornado loop in a daemon thread: a kernel can exit without waiting for it, and
    Panel's server, started off the main thread, leaves the kernel's SIGINT (cell interrupts) alone."""

    def __init__(self, app: App, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._ready: Future[Any] = Future()
        self._server: Any = None
        self._thread = threading.Thread(target=self._run, name=f"smartswitch-lab-{port}", daemon=True)

    def start(self) -> None:
        """Serve; raises what stopped it (``OSError`` when the port is taken)."""
        self._thread.start()
        self._server = self._ready.result(SERVER_START_S)

    def _run(self) -> None:
        from dashboard.api.hosts import HostPolicy
        from dashboard.api.limits import HttpLimits, guard_server

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # Bokeh's server takes the thread's current loop
        try:
            settings = self.app.port.config.server
            hosts = HostPolicy.for_bind(self.host)
            limits = HttpLimits(settings.max_body_bytes, hosts=hosts,
                                page_views_per_minute=settings.page_views_per_minute)
            server = self.app.panel_server(self.host, self.port, limits, hosts, verbose=False)
            guard_server(server, limits)  # before the loop runs: no request is served without it
            server.start()
        except BaseException as exc:
            self._ready.set_exception(exc)
            loop.close()
            return
        self._ready.set_result(server)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening and end the thread (requests in flight are cut)."""
        server = self._server
        if server is None or not self._thread.is_alive():
            return

        def halt() -> None:
            try:
                server.stop()
            finally:
                asyncio.get_event_loop().stop()

        server.io_loop.add_callback(halt)
        self._thread.join(timeout)


# The lab ---------------------------------------------------------------------------------------------
class Lab(pn.viewable.Viewer):
    """An orchestrator reached from a notebook: shown in a cell it is the dashboard; its methods act.

    ``switch(model)``, ``cancel()``, ``status()`` (a table), ``plan(model)``, ``history()``, ``openai()``,
    ``gpu`` (the gauge alone), ``close()``; ``url`` and ``api_key`` reach the same server from other tools.
    """

    def __init__(self, backend: LocalBackend | RemoteBackend, *, url: str, api_key: str, user: str,
                 app: App | None = None, server: EmbeddedServer | None = None, owned_dir: Path | None = None,
                 **params: Any) -> None:
        super().__init__(**params)
        self.backend = backend
        self.url = url
        self.api_key = api_key
        self.user = user
        self.actor = f"notebook:{user}"
        self._app = app
        self._server = server
        self._owned_dir = owned_dir
        self._dashboard: Dashboard | None = None
        self._gauge: GpuGauge | None = None
        self._closed = False
        if app is not None:
            # A kernel shutdown (or the end of a script) must not leave engines behind. Registered after the
            # orchestrator's own hook, so it runs first: the server stops before the orchestrator does.
            atexit.register(self.close)

    def __repr__(self) -> str:
        where = f"embedded, data dir {self._app.data_dir}" if self._app is not None else "shared server"
        return f"<Lab {self.url} ({where}{'; closed' if self._closed else ''})>"

    __str__ = __repr__  # Parameterized's own would name the object only

    @property
    def embedded(self) -> bool:
        """This lab runs its own orchestrator (``connect()`` without a URL)."""
        return self._app is not None

    @property
    def data_dir(self) -> Path | None:
        """The embedded orchestrator's data dir (history, audit log, engine logs, API key); None when remote."""
        return self._app.data_dir if self._app is not None else None

    # Views -------------------------------------------------------------------------------------------
    @property
    def dashboard(self) -> Dashboard:
        """The dashboard this lab shows (made on first use: a lab used from code alone never builds it)."""
        self._check_open()
        if self._dashboard is None:
            from dashboard.ui.app import Dashboard

            self._dashboard = Dashboard(self.backend, user=self.user)
        return self._dashboard

    def __panel__(self) -> pn.viewable.Viewable:
        return self.dashboard

    @property
    def gpu(self) -> GpuGauge:
        """The live GPU memory gauge alone, over the dashboard's state."""
        if self._gauge is None:
            from dashboard.ui.gauge import GpuGauge

            self._gauge = GpuGauge(state=self.dashboard.state)
        if in_notebook():
            self.dashboard.start_polling()  # the gauge is live even when the whole dashboard is not shown
        return self._gauge

    # Reads -------------------------------------------------------------------------------------------
    def status(self) -> pd.DataFrame:
        """One row per model (index: model id): status, GPU memory held now and needed, pinned, warm, ...;
        ``attrs`` holds the GPU figures and the active model."""
        import pandas as pd

        from dashboard.ui.state import STATUS_ORDER

        snapshot = self._status()
        active = snapshot.get("active_model")
        rows = [{
            "model": m["id"], "name": m["name"], "status": m["status"], "active": m["id"] == active,
            "GPU GB": m.get("gpu_memory_used_gb", 0.0), "needs GB": m.get("gpu_memory_required_gb"),
            "pinned": m["pinned"], "warm": m["warm"], "sleep capable": m["sleep_capable"],
            "load %": m["load_progress"], "load ETA s": m["estimated_load_time_seconds"], "error": m["error"],
        } for m in sorted(snapshot["models"].values(),
                          key=lambda m: (STATUS_ORDER.get(m["status"], 9), m["name"]))]
        table = pd.DataFrame(rows).set_index("model")
        table.attrs.update(gpu=snapshot["gpu"], active_model=active, switch=snapshot.get("switch"))
        return table

    @property
    def active_model(self) -> str | None:
        """The running model chat goes to, if any."""
        return self._status().get("active_model")

    def plan(self, model: str) -> dict[str, Any]:
        """Dry run: what a switch to ``model`` would unload, memory before and after, feasible or why not."""
        self._check_open()
        return self.backend.plan(model)

    def history(self) -> pd.DataFrame:
        """Past loads (model_id, at, total_s, outcome), newest first: what ETAs are made from.
        A shared server's API does not serve its history: empty there."""
        import pandas as pd

        table = pd.DataFrame(self.backend.load_history(), columns=["model_id", "at", "total_s", "outcome"])
        table["at"] = pd.to_datetime(table["at"], unit="s")
        return table

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        """An OpenAI client on this lab's chat proxy (``<url>/v1``) with its key."""
        self._check_open()
        try:
            import openai
        except ImportError:
            raise ImportError("lab.openai() needs the openai package: pip install openai") from None
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, **kwargs)

    # Actions -----------------------------------------------------------------------------------------
    def switch(self, model: str, timeout: float | None = None) -> CompleteEvent:
        """Switch to ``model`` with a progress bar (stage, percent, ETA) and return when it is ready.

        Raises ``SwitchFailed`` naming the model and the reason when the switch is refused, fails, is
        cancelled (from anywhere) or takes over ``timeout`` seconds (it is then cancelled: what it unloaded
        is restored). Interrupting the cell cancels it too.
        """
        self._check_open()
        view = SwitchProgress(model, notebook=in_notebook())
        deadline = _Deadline(timeout, lambda switch_id: self._cancel_own(model, switch_id))

        def on_event(event: SwitchEvent) -> None:
            deadline.seen(event)
            view.show(event)

        try:
            final = self._follow(model, on_event)
        except KeyboardInterrupt:
            self._cancel_own(model, deadline.switch_id)
            view.note(f"Interrupted: the switch to {model} is cancelled.")
            raise
        except SmartswitchError as exc:  # refused before it started (unknown model, in progress, no memory)
            view.note(f"Failed: {exc.message}")
            raise SwitchFailed(model, exc.message, code=exc.code, details=exc.details) from exc
        except ApiError as exc:
            view.note(f"Failed: {exc.message}")
            raise SwitchFailed(model, exc.message, code=exc.code, details=exc.body) from exc
        except httpx.HTTPError as exc:  # the shared server went away mid-switch; it finishes or rolls back there
            view.note(f"Lost {self.url}: {exc}")
            raise SwitchFailed(model, f"lost the connection to {self.url} ({exc}); see lab.status() once it "
                                      "answers again", code="connection_lost") from exc
        finally:
            deadline.stop()
            if self._dashboard is not None:
                self._dashboard.refresh()  # a cell that blocked kept its poll from running
        if isinstance(final, CompleteEvent):
            return final
        if deadline.expired:
            raise SwitchFailed(model, f"not ready within {timeout:g} s, so it was cancelled and what it unloaded "
                                      "restored", code="timeout")
        if isinstance(final, ErrorEvent):
            raise SwitchFailed(model, final.message, code=final.error, details=final.details)
        if isinstance(final, CancelledEvent):
            by = f" (superseded by a switch to {final.superseded_by})" if final.superseded_by else ""
            raise SwitchFailed(model, f"cancelled{by}: {final.message}", code="cancelled")
        raise SwitchFailed(model, f"the switch stream ended with {final.kind}", code="stream_ended")

    def cancel(self) -> bool:
        """Cancel the running switch (whoever started it); what it unloaded is restored."""
        self._check_open()
        return self.backend.cancel(self.actor)

    def close(self) -> None:
        """Embedded: stop the server, every engine and the orchestrator (and remove a temporary data dir).
        Remote: close the connection; the shared server keeps running."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._dashboard is not None:
            try:
                self._dashboard.stop_polling()
            except Exception:  # at interpreter exit Panel may be half gone; the engines matter more
                log.debug("stopping the dashboard's poll failed", exc_info=True)
        if self._server is not None:
            self._server.stop()
        if self._app is not None:
            self._app.close()
            if self._owned_dir is not None:
                shutil.rmtree(self._owned_dir, ignore_errors=True)
        client = getattr(self.backend, "client", None)
        if client is not None:
            client.close()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Plumbing ----------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SmartswitchError("This lab is closed: connect() again for a new one.")

    def _status(self) -> dict[str, Any]:
        self._check_open()
        return self.backend.status()

    def _follow(self, model: str, on_event: Callable[[SwitchEvent], None]) -> SwitchEvent:
        """Start a switch and pass each of its events to ``on_event``; returns the terminal one."""
        if self._app is not None:
            return self._app.port.switch_and_wait(model, self.actor, on_event=on_event)
        client: SmartswitchClient = self.backend.client  # type: ignore[union-attr]
        last: SwitchEvent | None = None
        for event in client.switch_events(model):
            on_event(event)
            last = event
        if last is None:
            raise ApiError(502, {"error": "stream_ended", "message": "The switch stream ended with no event."})
        return last

    def _cancel_own(self, model: str, switch_id: str | None) -> None:
        """Cancel the switch this call started, and no one else's (it may have been superseded)."""
        running = self._status().get("switch")
        if running is None or running.get("kind", "switch") != "switch":
            return
        ours = running.get("id") == switch_id if switch_id else running.get("target_model") == model
        if ours:
            self.backend.cancel(self.actor)


class _Deadline:
    """Cancels a switch that is not over ``timeout`` seconds after it began (None: no deadline)."""

    def __init__(self, timeout: float | None, cancel: Callable[[str | None], None]) -> None:
        self.switch_id: str | None = None
        self.expired = False
        self._cancel = cancel
        self._timer = threading.Timer(timeout, self._expire) if timeout is not None else None
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()

    def seen(self, event: SwitchEvent) -> None:
        self.switch_id = event.switch_id

    def _expire(self) -> None:
        self.expired = True
        try:
            self._cancel(self.switch_id)
        except Exception:  # the switch may have ended meanwhile; the caller sees how it ended
            log.info("cancelling a switch past its deadline failed", exc_info=True)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class SwitchProgress:
    """A switch's progress for whoever watches: in a notebook one output that updates in place (a bar with
    stage, percent, ETA and bytes as HTML, the CLI's line as text), else plain text lines (each stage, a step
    each ``PLAIN_STEP`` percent, the outcome). The cell output is IPython's, not a Panel object's: it needs
    no widget state or JS, so it reads the same in a saved notebook, and each one is a few hundred bytes."""

    def __init__(self, model: str, *, notebook: bool) -> None:
        self.model = model
        self.notebook = notebook
        self._percent = 0
        self._printed = -PLAIN_STEP
        self._stage = ""
        self._handle: Any = None
        if notebook:
            from IPython.display import display

            text = f"Switching to {model}..."
            self._handle = display(self._bundle(text, html.escape(text)), raw=True, display_id=True)

    def show(self, event: SwitchEvent) -> None:
        from dashboard.cli import progress_line  # the CLI's wording: one place says what an event reads as

        line = progress_line(event)
        if self.notebook:
            self._handle.update(self._bundle(line, self._label(event, line), event), raw=True)
            return
        if isinstance(event, ProgressEvent):
            step = event.progress // PLAIN_STEP * PLAIN_STEP
            if step <= self._printed and event.stage == self._stage:
                return
            self._printed, self._stage = step, event.stage
        elif isinstance(event, StageEvent):
            self._stage = event.stage
        print(line, flush=True)

    def note(self, text: str) -> None:
        if self.notebook:
            self._handle.update(self._bundle(text, f"<b style='color:{FAILED}'>{html.escape(text)}</b>"), raw=True)
        else:
            print(text, flush=True)

    def _label(self, event: SwitchEvent, line: str) -> str:
        model = f"<b>{html.escape(self.model)}</b>"
        if isinstance(event, ProgressEvent):
            parts = [html.escape(event.message), f"{event.progress}%"]
            if event.eta_seconds is not None:
                parts.append(f"~{event.eta_seconds:.0f} s left")
            if event.bytes_total:
                parts.append(f"{(event.bytes_loaded or 0) / 1e9:.1f} / {event.bytes_total / 1e9:.1f} GB")
            if event.slow:
                parts.append("slower than usual")
            return f"{model}: {' · '.join(parts)}"
        if isinstance(event, StageEvent):
            return f"{model}: {html.escape(event.message)}"
        colour = DONE if isinstance(event, CompleteEvent) else FAILED
        return f"<b style='color:{colour}'>{html.escape(line)}</b>"

    def _bundle(self, text: str, label: str, event: SwitchEvent | None = None) -> dict[str, str]:
        if isinstance(event, ProgressEvent):
            self._percent = event.progress
        elif isinstance(event, CompleteEvent):
            self._percent = 100
        return {"text/plain": text,
                "text/html": f"<div style='max-width:640px'><div>{label}</div>"
                             f"<progress value='{self._percent}' max='100' style='width:100%'></progress></div>"}
