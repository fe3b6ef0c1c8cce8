"""The dashboard: header model picker, switching strip, locked chat, manager, activity and GPU gauge.

One ``Dashboard`` per session (a browser tab or a notebook cell) over a backend; a tab's is made once its page
has loaded (``served_page``), so a page view no browser follows costs little. It holds no copy of the
orchestrator's data beyond the session's ``DashboardState``, which the orchestrator's events refresh
(pushed: a switch shows in every tab as soon as it starts); a slow heartbeat only feeds the memory plot.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
from dataclasses import dataclass
from typing import Any

import panel as pn
import panel_material_ui as pmui
import param
from panel_material_ui.theme import MaterialDesign

from dashboard.client import ApiError
from dashboard.errors import SmartswitchError
from dashboard.events import Event, ProgressEvent, StageEvent, StatusEvent, is_terminal
from dashboard.orchestrator.states import ModelStatus
from dashboard.ui.activity import ActivityLog
from dashboard.ui.backend import LocalBackend, RemoteBackend
from dashboard.ui.banner import ConfirmSwitch, SwitchBanner
from dashboard.ui.chat import ChatPanel
from dashboard.ui.gauge import GpuGauge
from dashboard.ui.kit import INLINE, SERVED
from dashboard.ui.manager import ModelManager
from dashboard.ui.picker import ModelPicker, picker_rows
from dashboard.ui.session import SoonInSession, forget_session
from dashboard.ui.state import DashboardState

log = logging.getLogger(__name__)
HEARTBEAT_MS = 2000  # the memory plot's sampling when events do the rest
REMOTE_POLL_MS = 500  # a remote server's sessions have no events: they poll
CONFIRM_PAST = 50  # a switch this far along asks before it is replaced
GATHER_S = 0.01  # the orchestrator's steps this close together reach a page in one refresh
NOTEBOOK_HEIGHT = 760  # inline: the chat shows without an inner scroll
TABS = ("Chat", "Models", "Activity")


class Dashboard(pn.viewable.Viewer):
    """One session's dashboard over a backend; the same object serves a tab or a notebook cell."""

    state = param.ClassSelector(class_=DashboardState)
    poll_ms = param.Integer(default=None, allow_None=True, bounds=(100, None),
                            doc="Refresh period (default: a heartbeat with events, a poll without).")

    def __init__(self, backend: LocalBackend | RemoteBackend, user: str | None = None,
                 gauge: GpuGauge | None = None, **params: Any) -> None:
        # A served page's gauge is made before the dashboard (see ``served_page``): its state is this one's.
        super().__init__(state=gauge.state if gauge is not None else DashboardState(), **params)
        self.kit = SERVED if served() else INLINE  # Material UI in a page, Panel's own inline in a notebook
        self.backend = backend
        self.user = user or "anonymous"
        self.actor = f"dashboard:{self.user}"
        self.state.apply(backend.status())
        self.confirm = ConfirmSwitch(state=self.state, on_confirm=self.start_switch, kit=self.kit)
        self.picker = ModelPicker(on_pick=self.pick, css_classes=["picker"])
        self.banner = SwitchBanner(state=self.state, on_cancel=self.cancel, on_retry=self.pick,
                                   on_unpin=lambda model_id: self.act("unpin", model_id),
                                   on_manage=self.open_manager, kit=self.kit)
        self.chat = ChatPanel(state=self.state, target=backend.chat, actor=self.actor, store=backend.conversations,
                              user=self.user, kit=self.kit)
        self.manager = ModelManager(state=self.state, act=self.act, load_history=backend.load_history, kit=self.kit)
        self.activity = ActivityLog(state=self.state, audit_log=backend.audit_log)
        self.gauge = gauge or GpuGauge(state=self.state)
        self.tabs = self.kit.tabs(*zip(TABS, (self.chat, self.manager, self.activity), strict=True),
                                  sizing_mode="stretch_both", dynamic=False, css_classes=["main-tabs"])
        self.tabs.param.watch(self._tab_opened, "active")
        self.state.param.watch(self._show_picker, ["models", "selected_model", "active_model", "switching",
                                                   "switch_target", "progress"])
        self._show_picker()
        self._callback: Any = None
        self._unsubscribe: Any = None
        self._refresh_in_session = SoonInSession(self.refresh, gather_s=GATHER_S)

    # State -> views ---------------------------------------------------------------------------
    def _show_picker(self, *_: Any) -> None:
        s = self.state
        target = s.switch_target if s.switching else None
        self.picker.rows = picker_rows(s.models, s.selected_model, target, s.progress)
        if s.switching:
            label, status = f"{s.name_of(s.switch_target)} · {s.progress}%", ModelStatus.LOADING
        elif s.selected_model:
            model = next((m for m in s.models if m["id"] == s.selected_model), None)
            status = model["status"] if model else ModelStatus.STOPPED
            label = s.name_of(s.selected_model)
        else:
            label, status = "Pick a model", ModelStatus.STOPPED
        self.picker.param.update(label=label, label_status=str(status))

    def _tab_opened(self, *_: Any) -> None:
        self.manager.shown = self.tabs.active == TABS.index("Models")
        self.activity.shown = self.tabs.active == TABS.index("Activity")

    def open_manager(self) -> None:
        self.tabs.active = TABS.index("Models")

    # Actions ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        try:
            self.state.apply(self.backend.status())
        except Exception:  # a remote server may blink; the next poll tries again
            log.exception("status refresh failed")

    def refresh_soon(self) -> None:
        """Refresh in this page's session, from any thread (outside a session: now)."""
        if self._refresh_in_session.doc is None:
            self.refresh()
        else:
            self._refresh_in_session()

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
                    plan["replaces"] = s.switch_target  # the question stands only while that switch runs
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

    # Life of a session ------------------------------------------------------------------------
    def start_polling(self) -> None:
        if self._callback is None:
            pushed = self._unsubscribe is not None
            period = self.poll_ms or (HEARTBEAT_MS if pushed else REMOTE_POLL_MS)
            self._callback = pn.state.add_periodic_callback(self.refresh, period=period)

    def stop_polling(self, *_: Any) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _push(self) -> None:
        """Refresh at once on state changes from anywhere (other tabs, the API), progress included."""
        def on_event(event: Event) -> None:
            if isinstance(event, StatusEvent | StageEvent | ProgressEvent) or is_terminal(event):
                self.refresh_soon()
        self._unsubscribe = self.backend.subscribe(on_event)

    # Layout -----------------------------------------------------------------------------------
    def _welcome_back(self) -> pn.viewable.Viewable:
        last = self.backend.last_used(self.actor)
        if not last or last == self.state.active_model or last not in self.state.names():
            return pn.Spacer(height=0)
        button = self.kit.button(f"Continue with {self.state.name_of(last)} (your last model)", "last-used",
                                 variant="outlined", sizing_mode="stretch_width")

        async def resume(_: Any) -> None:
            button.visible = False
            await self.pick(last)

        button.on_click(resume)
        return button

    def _user_badge(self) -> pn.viewable.Viewable:
        logout = " · <a href='/logout' style='color:inherit'>Sign out</a>" if pn.state.user else ""
        return pn.pane.HTML(f"<span class='user' style='color:#fff;font:14px Roboto,sans-serif'>{self.user}"
                            f"{logout}</span>", margin=(0, 10), align="center")

    def __panel__(self) -> pn.viewable.Viewable:
        if self.kit.material:
            light = LightPage.around(self.gauge)
            self.fill(light)
            return light.page
        # Inline (a notebook cell): a fixed height that shows the chat without an inner scroll.
        self.start_polling()
        header = pn.Row(pn.pane.HTML("<b style='font:600 17px Roboto,sans-serif'>smartswitch</b>",
                                     align="center"), self.picker, sizing_mode="stretch_width",
                        styles={"background": "#3f51b5", "border-radius": "8px", "padding": "4px 10px"})
        side = pn.Column(self._welcome_back(), self.gauge, width=300)
        main = pn.Column(self.banner, self.confirm, self.tabs, sizing_mode="stretch_both", margin=0)
        return pn.Column(header, pn.Row(main, side, sizing_mode="stretch_both"),
                         height=NOTEBOOK_HEIGHT, sizing_mode="stretch_width")

    def fill(self, light: LightPage) -> None:
        """Show this dashboard in its session's page (``LightPage``), pushed by the orchestrator's events."""
        page = light.page
        self._refresh_in_session.doc = pn.state.curdoc
        self._push()
        pn.state.on_session_destroyed(self.stop_polling)
        self.start_polling()
        # Below 900 px (Material's "md") the sidebar is a drawer, closed: the chat gets the width.
        narrow, wide = pn.Spacer(width=0, height=0), pn.Spacer(width=0, height=0)
        width = pmui.BreakpointSwitcher(breakpoint="md", small=narrow, large=wide, width=0, height=0)

        def fit(event: Any) -> None:
            small = event.new is narrow
            # Changes made while the page still loads never reach it: after the load, then.
            pn.state.onload(lambda: page.param.update(sidebar_variant="temporary" if small else "persistent",
                                                      sidebar_open=not small))

        width.param.watch(fit, "current")
        page.param.watch(lambda event: self._follow_theme(event.new), "dark_theme")
        self._follow_theme(page.dark_theme)
        light.greeting.objects = [self._welcome_back()]
        light.header.objects = [self.picker, pn.HSpacer(), self._user_badge(), width]
        light.main.objects = [self.banner, self.confirm, self.tabs]
        pn.state.onload(self._resend)

    def _resend(self) -> None:
        """Once the page has loaded, send it the state again: Panel drops what changed while it was loading
        (a switch that began meanwhile would leave an open chat input under a running switch)."""
        self.refresh()
        self.state.param.trigger("switching", "models", "error", "chat_locked", "lock_reason", "progress")
        self.picker.param.trigger("rows", "label", "label_status")
        self.chat.resend()

    def _follow_theme(self, dark: bool) -> None:
        for view in (self.picker, self.banner):
            view.dark = dark


def served() -> bool:
    """Whether the dashboard is being made for a served page (a browser session), not a notebook cell."""
    doc = pn.state.curdoc
    return doc is not None and doc.session_context is not None


@dataclass
class LightPage:
    """A session's page before its dashboard: the GPU gauge in the sidebar, a spinner in the main area, and
    the places the dashboard fills (``fill``). The page's own lists never change after it is drawn, only
    these places' contents: Material's page draws all its parts anew when one of its lists changes, and a
    Bokeh plot drawn anew fails to lay out ("reading 'top_panel'")."""

    page: pmui.Page
    header: pn.Row
    greeting: pn.Column
    main: pn.Column

    @classmethod
    def around(cls, gauge: GpuGauge) -> LightPage:
        header = pn.Row(sizing_mode="stretch_width", margin=0)
        greeting = pn.Column(sizing_mode="stretch_width", margin=0)
        main = pn.Column(pmui.LoadingSpinner(value=True, size=40, margin=40), sizing_mode="stretch_both", margin=0)
        page = pmui.Page(title="smartswitch", header=[header], main=[main], sidebar_width=330, theme_toggle=True,
                         sidebar=[pn.Column(greeting, gauge, sizing_mode="stretch_width")])
        pn.state.on_session_destroyed(forget_session(page))
        return cls(page, header, greeting, main)


def served_page(backend: LocalBackend | RemoteBackend, user: str) -> pmui.Page:
    """A browser session's page. It leaves light (the header, the GPU gauge, a spinner); the dashboard is made
    and fills it once the browser has loaded it. A page view no browser follows (a link preview, a scanner)
    builds no dashboard, and the status the API answers meanwhile waits less."""
    gauge = GpuGauge(state=DashboardState())
    gauge.state.apply(backend.status())
    light = LightPage.around(gauge)
    pn.state.onload(lambda: Dashboard(backend, user=user, gauge=gauge).fill(light))
    return light.page


def create_app(backend: LocalBackend | RemoteBackend) -> pmui.Page:
    """This session's page over ``backend`` (what ``pn.serve`` calls for each page load): the logged-in
    user's dashboard, or on an open loopback server that of the account that runs it (the only one who can
    reach it)."""
    pn.config.notifications = True  # refusals (switches per minute) show as a toast
    pn.config.design = MaterialDesign  # this session's Panel widgets (tables, panes) in Material's look
    pn.extension("tabulator")  # the manager's table comes after the page: its code must be in it already
    return served_page(backend, pn.state.user or local_user())


def local_user() -> str:
    return getpass.getuser()
