"""The switching banner above the chat: from/to, stage, progress %, ETA, bytes, Cancel; and errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import panel as pn
import param

from dashboard.ui.state import DashboardState
from dashboard.ui.theme import format_bytes

STAGE_TEXT = {"checking_memory": "Checking GPU memory", "unloading_models": "Unloading models",
              "loading_target": "Loading model", "rolling_back": "Restoring the previous models",
              "cancelling": "Cancelling"}


class SwitchBanner(pn.viewable.Viewer):
    state = param.ClassSelector(class_=DashboardState)

    def __init__(self, on_cancel: Callable[[], Awaitable[None]], **params: Any) -> None:
        super().__init__(**params)
        self._cancel = pn.widgets.Button(name="Cancel", button_type="danger", button_style="outline",
                                         width=90, css_classes=["cancel-switch"])

        async def cancel(_: Any) -> None:
            self._cancel.disabled = True
            try:
                await on_cancel()
            finally:
                self._cancel.disabled = False

        self._cancel.on_click(cancel)
        self._bar = pn.indicators.Progress(value=0, max=100, sizing_mode="stretch_width", bar_color="primary",
                                           height=18, margin=(4, 10))
        self.state.param.watch(lambda e: setattr(self._bar, "value", e.new), "progress")

    @param.depends("state.switching", "state.switch_target", "state.switch_from", "state.stage",
                   "state.stage_message", "state.progress", "state.eta_s", "state.bytes_loaded",
                   "state.bytes_total", "state.slow")
    def _text(self) -> str:
        s = self.state
        if not s.switching:
            return ""
        origin = f"from {s.name_of(s.switch_from)} " if s.switch_from else ""
        eta = f"~{s.eta_s:.0f} s remaining" if s.eta_s is not None else "estimating time"
        size = (f" · {format_bytes(s.bytes_loaded)} of {format_bytes(s.bytes_total)}"
                if s.bytes_total else "")
        slow = "<div class='slow'>This may take a while: the load is slower than usual.</div>" if s.slow else ""
        if s.stage in ("cancelling", "rolling_back"):
            # The message names what failed or was cancelled and what comes back: it is the headline.
            head, detail = s.stage_message, STAGE_TEXT.get(s.stage, s.stage)
        else:
            head = f"Switching {origin}to {s.name_of(s.switch_target)}..."
            detail = f"{STAGE_TEXT.get(s.stage, s.stage)}: {s.stage_message}"
        return (
            f"<div class='switch-banner'><b>{head}</b>"
            f"<div class='stage'>{detail}</div>"
            f"<div class='numbers'><span class='percent'>{s.progress}%</span> · "
            f"<span class='eta'>{eta}</span>{size}</div>{slow}</div>")

    @param.depends("state.error", "state.switching")
    def _has_error(self) -> bool:
        return bool(self.state.error) and not self.state.switching

    @param.depends("state.error", "state.switching")
    def _error(self) -> str:
        error = self.state.error
        if not error or self.state.switching:
            return ""
        fits = [self.state.name_of(m) for m in error.get("suggestions") or []]
        hint = f" Models that fit now: {', '.join(fits)}." if fits else ""
        return (f"**Switch to {self.state.name_of(error.get('target_model'))} failed.** "
                f"{error.get('message', '')}{hint}")

    def __panel__(self) -> pn.viewable.Viewable:
        # Panes bound to methods that return text are updated in place; a method returning a new pane
        # each time would replace it in every open page (and make Bokeh recompute the whole document).
        text = pn.pane.HTML(self._text, sizing_mode="stretch_width", margin=(0, 10))
        error = pn.pane.Alert(self._error, alert_type="danger", sizing_mode="stretch_width",
                              css_classes=["switch-error"], visible=self._has_error)
        running = pn.Row(pn.Column(text, self._bar, sizing_mode="stretch_width"), self._cancel,
                         visible=self.state.param.switching, sizing_mode="stretch_width",
                         styles={"border": "1px solid #90caf9", "border-radius": "6px", "background": "#e3f2fd"})
        return pn.Column(running, error, sizing_mode="stretch_width")


class ConfirmSwitch(pn.viewable.Viewer):
    """Shows the plan (what unloads, memory before/after, time) and waits for a yes before switching."""

    plan = param.Dict(default=None, allow_None=True, doc="The dry run awaiting confirmation.")

    def __init__(self, on_confirm: Callable[[str], Awaitable[None]], **params: Any) -> None:
        super().__init__(**params)
        self._yes = pn.widgets.Button(name="Switch", button_type="primary", css_classes=["confirm-switch"])
        self._no = pn.widgets.Button(name="Keep current", css_classes=["reject-switch"])

        async def yes(_: Any) -> None:
            target = self.plan["target_model"] if self.plan else None
            self.plan = None
            if target:
                await on_confirm(target)

        self._yes.on_click(yes)
        self._no.on_click(lambda _: setattr(self, "plan", None))

    @param.depends("plan")
    def _body(self) -> str:
        p = self.plan
        if not p:
            return ""
        names = dict(zip(p["unload"], p.get("unload_names") or p["unload"], strict=False))
        by_device = p.get("unload_by_device") or {}
        if p.get("device_count", 1) > 1 and p.get("gpus"):
            # On a box with several GPUs the plan names where the model goes and what leaves each device.
            where = ", ".join(f"GPU {i}" for i in p["gpus"])
            unload = "; ".join(f"GPU {d}: " + ", ".join(names.get(m, m) for m in ms)
                               for d, ms in sorted(by_device.items(), key=lambda kv: int(kv[0])) if ms) or "nothing"
            placement = f"<div>Goes on: {where}</div>"
        else:
            unload = ", ".join(names.values()) or "nothing"
            placement = ""
        extra = f"<div>{p['note']}</div>" if p.get("note") else ""
        return (
            f"<div class='confirm-plan'><b>Switch to {p.get('target_name', p['target_model'])}?</b>"
            f"{placement}<div>Unloads: {unload}</div>"
            f"<div>GPU memory free: {p['available_gb']:.1f} GB now, {p['free_gb_after']:.1f} GB after</div>"
            f"<div>About {p['estimated_load_time_seconds']:.0f} s to load</div>{extra}</div>")

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(pn.pane.HTML(self._body, sizing_mode="stretch_width"), pn.Row(self._yes, self._no),
                         visible=self.param.plan.rx.bool(),
                         sizing_mode="stretch_width",
                         styles={"border": "1px solid #ffb74d", "border-radius": "6px", "background": "#fff3e0"})
