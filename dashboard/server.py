"""The composition root: one data dir lock, one orchestrator, its API and its dashboard, wired for ``pn.serve``.

``smartswitch serve`` calls ``build_app`` with what its command line says. ``panel serve dashboard/app.py
--plugins dashboard.api.routes`` has no command line of ours: both of its entries share the one app that
``from_environment`` makes from SMARTSWITCH_CONFIG / SMARTSWITCH_DATA_DIR (the only reader of those).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import panel as pn

from dashboard.api.auth import check_keys
from dashboard.api.routes import ApiContext, Route, make_api_context, make_routes
from dashboard.config import Config, load_config
from dashboard.conversations import close_store
from dashboard.orchestrator.core import OrchestratorPort
from dashboard.orchestrator.datadir import prepare_data_dir
from dashboard.ui.app import create_app
from dashboard.ui.backend import LocalBackend

if TYPE_CHECKING:
    from dashboard.api.hosts import HostPolicy
    from dashboard.api.limits import HttpLimits

log = logging.getLogger(__name__)
CONFIG_ENV = "SMARTSWITCH_CONFIG"
DATA_DIR_ENV = "SMARTSWITCH_DATA_DIR"


@dataclass
class App:
    """What ``pn.serve`` needs (``dashboard`` for "/", ``routes`` as ``extra_patterns``) over one orchestrator."""

    port: OrchestratorPort
    api: ApiContext
    url: str | None = None
    routes: list[Route] = field(init=False)

    def __post_init__(self) -> None:
        self.routes = make_routes(self.api)

    @property
    def data_dir(self) -> Path:
        return self.port.data_dir

    def dashboard(self) -> pn.viewable.Viewable:
        """One browser session's page (its dashboard made once the browser has loaded it)."""
        return create_app(LocalBackend(self.port))

    def panel_server(self, address: str, port: int, limits: HttpLimits, hosts: HostPolicy, *,
                     verbose: bool = True, **auth: Any) -> Any:
        """The Panel server of ``smartswitch serve`` and of an embedded lab, not started: the dashboard on
        "/", the API beside it, the HTTP limits on every request.

        Closed tabs (and page loads no browser follows) stop costing refreshes within seconds, not the
        default ~30 s.
        """
        return pn.serve({"/": self.dashboard}, address=address, port=port, show=False, start=False,
                        verbose=verbose, title="smartswitch", extra_patterns=self.routes,
                        http_server_kwargs=limits.server_kwargs(),
                        check_unused_sessions_milliseconds=2000, unused_session_lifetime_milliseconds=3000,
                        websocket_origin=hosts.origins(port), **auth)

    def close(self, stop_engines: bool = True) -> None:
        """Stop the orchestrator (and its engines unless told not to); it frees the data dir last."""
        try:
            self.port.close(stop_engines)
        finally:
            close_store(self.data_dir)


def build_app(config: Config, data_dir: Path | None = None, *, host: str | None = None,
              port: int | None = None) -> App:
    """Start the data dir's orchestrator (it takes the data dir's lock first) and make the API context;
    raises ``DataDirError`` (data dir in use, database unusable, key file unsafe) or ``ConfigError`` (keys
    too short) before anything is served."""
    # Absolute and resolved: the same directory must read the same in the lock, the logs and engine markers.
    data_dir = prepare_data_dir(Path(data_dir) if data_dir is not None else config.data_dir).resolve()
    # Before the orchestrator starts: a refusal must not stop (or adopt) any engine.
    check_keys(data_dir)
    url = f"http://{host}:{port}" if host and port else None
    orchestrator = OrchestratorPort(config, data_dir=data_dir, url=url).start()
    try:
        api = make_api_context(orchestrator)  # makes (and logs) the API key before the first request
    except BaseException:
        orchestrator.close()
        raise
    return App(orchestrator, api, url=url)


_env_lock = threading.Lock()
_env_app: App | None = None


def from_environment() -> App:
    """The app of this process for ``panel serve``, made on first use from SMARTSWITCH_CONFIG and
    SMARTSWITCH_DATA_DIR (unset: the embedded catalog and the config's data dir)."""
    global _env_app
    with _env_lock:
        if _env_app is None:
            config = load_config(os.environ.get(CONFIG_ENV) or None)
            data_dir = os.environ.get(DATA_DIR_ENV)
            _env_app = build_app(config, Path(data_dir) if data_dir else None)
        return _env_app
