"""The dashboard: selector, GPU gauge, switching banner, locked chat, manager and activity, per session."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import panel as pn
import param
from panel.io.state import set_curdoc

from dashboard.client import ApiError
from dashboard.errors import SmartswitchError
from dashboard.events import Event, StageEvent, StatusEvent, is_terminal
from dashboard.orchestrator.states import ModelStatus
from dashboard.ui.activity import ActivityLog
from dashboard.ui.backend import LocalBackend, RemoteBackend
from dashboard.ui.banner import ConfirmSwitch, SwitchBanner
from dashboard.ui.chat import ChatPanel
from dashboard.ui.gauge import GpuGauge
from dashboard.ui.manager import ModelManager
from dashboard.ui.selector import ModelSelector
from dashboard.ui.state import DashboardState

log = logging.getLogger(__name__)
POLL_MS = 500
CONFIRM_PAST = 50  # a switch this far along asks before it is replaced

pn.extension("tabulator", notifications=True)


class Dashboard(pn.viewable.Viewer):
    """One session's dashboard over a backend; the same object serves a tab or a notebook cell."""

    state = param.ClassSelector(class_=DashboardState)
    poll_ms = param.Integer(default=POLL_MS, bounds=(100, None), doc="Refresh period of this session.")

    def __init__(self, backend: LocalBackend | RemoteBackend, user: str | None = None, **params: Any) -> None:
        super().__init__(state=DashboardState(), **params)
        self.backend = backend
        self.actor = f"dashboard:{user or 'anonymous'}"
        self.state.apply(backend.status())
        self.confirm = ConfirmSwitch(on_confirm=self.start_switch)
        self.selector = ModelSelector(state=self.state, on_pick=self.pick)
        self.banner = SwitchBanner(state=self.state, on_cancel=self.cancel)
        self.chat = ChatPanel(state=self.state, target=backend.chat, actor=self.actor)
        self.manager = ModelManager(state=self.state, act=self.act, load_history=backend.load_history)
        self.activity = ActivityLog(state=self.state, audit_log=backend.audit_log)
        self.gauge = GpuGauge(state=self.state)
        self._callback: Any = None
        self._unsubscribe: Any = None
        self._doc: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refresh_pending = False

    # Actions ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        try:
            self.state.apply(self.backend.status())
        except Exception:  # a remote server may blink; the next poll tries again
            log.exception("status refresh failed")

    def refresh_soon(self) -> None:
        """Refresh on the session's loop the way a periodic callback does (safe from any thread)."""
        if self._loop is None or self._doc is None:
            self.refresh()
            return

        if self._refresh_pending:
            return  # a burst of events needs one refresh, not one each
        self._refresh_pending = True

        def run() -> None:
            self._refresh_pending = False
            with set_curdoc(self._doc):
                self.refresh()
        self._loop.call_soon_threadsafe(run)

    async def pick(self, model_id: str) -> None:
        s = self.state
        running = next((m for m in s.models if m["id"] == model_id and m["status"] == ModelStatus.RUNNING), None)
        if running is not None and not s.switching:
            s.selected_model = model_id
            self.refresh_soon()
            return
        replacing = s.switching and s.switch_target != model_id and s.progress > CONFIRM_PAST
        if replacing or s.confirm_before_unload:
            plan = await asyncio.to_thread(self.backend.plan, model_id)
            if replacing or plan["unload"]:
                plan["target_name"] = s.name_of(model_id)
                if replacing:
                    plan["note"] = (f"This cancels the switch to {s.name_of(s.switch_target)}, "
                                    f"already {s.progress}% done.")
                self.confirm.plan = plan
                return
        await self.start_switch(model_id)

    async def start_switch(self, model_id: str) -> None:
        self.state.selected_model = model_id
        try:
            await asyncio.to_thread(self.backend.switch, model_id, self.actor)
        except (SmartswitchError, ApiError) as exc:  # refused (switches per minute, shutting down): say so
            if pn.state.notifications is not None:
                pn.state.notifications.warning(exc.message, duration=8000)
            log.info("switch to %s by %s refused: %s", model_id, self.actor, exc.message)
        self.refresh_soon()

    async def cancel(self) -> None:
        await asyncio.to_thread(self.backend.cancel, self.actor)
        self.refresh_soon()

    async def act(self, action: str, model_id: str) -> None:
        await asyncio.to_thread(self.backend.act, action, model_id, self.actor)
        self.refresh_soon()

    # Layout -----------------------------------------------------------------------------------
    def _welcome_back(self) -> pn.viewable.Viewable:
        last = self.backend.last_used(self.actor)
        if not last or last == self.state.active_model or last not in self.state.names():
            return pn.Spacer(height=0)
        button = pn.widgets.Button(name=f"Continue with {self.state.name_of(last)} (your last model)",
                                   button_type="primary", button_style="outline", css_classes=["last-used"],
                                   sizing_mode="stretch_width")

        async def resume(_: Any) -> None:
            button.visible = False
            await self.pick(last)

        button.on_click(resume)
        return button

    def start_polling(self) -> None:
        if self._callback is None:
            self._callback = pn.state.add_periodic_callback(self.refresh, period=self.poll_ms)

    def stop_polling(self, *_: Any) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _push(self) -> None:
        """Refresh at once on state changes from anywhere (other tabs, the API), not only on the poll."""
        def on_event(event: Event) -> None:
            if isinstance(event, StatusEvent | StageEvent) or is_terminal(event):
                self.refresh_soon()
        self._unsubscribe = self.backend.subscribe(on_event)

    def __panel__(self) -> pn.viewable.Viewable:
        self.start_polling()
        doc = pn.state.curdoc
        if doc is not None and doc.session_context is not None:
            self._doc, self._loop = doc, asyncio.get_event_loop()
            self._push()
            pn.state.on_session_destroyed(self.stop_polling)
        sidebar = pn.Column(self._welcome_back(), self.selector, self.confirm, self.gauge, width=360)
        tabs = pn.Tabs(("Chat", self.chat), ("Models", self.manager), ("Activity", self.activity),
                       sizing_mode="stretch_both", dynamic=False)
        main = pn.Column(self.banner, tabs, sizing_mode="stretch_both")
        header = pn.pane.HTML("<h2 style='margin:4px 0'>smartswitch</h2>", margin=(0, 10))
        return pn.Column(header, pn.Row(sidebar, main, sizing_mode="stretch_both"), sizing_mode="stretch_both",
                         min_height=700)


def create_app(backend: LocalBackend | RemoteBackend) -> Dashboard:
    """A fresh dashboard for this session over ``backend`` (what ``pn.serve`` calls for each page)."""
    return Dashboard(backend, user=pn.state.user)
