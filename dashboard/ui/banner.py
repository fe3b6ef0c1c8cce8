"""The strip above the chat: the model in use when idle; a switch's steps, bar, ETA and Cancel; a failure
with what can be done about it. It always takes the same height: nothing below it jumps.

Every figure comes from the session's one ``DashboardState`` (the same percent and ETA as the picker and
the chat input). The text parts are pure functions of the state, tested without a browser.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from typing import Any

import panel as pn
import param

from dashboard.orchestrator.states import ModelStatus
from dashboard.ui.kit import SERVED, Kit
from dashboard.ui.live_html import LiveHTML
from dashboard.ui.state import DashboardState
from dashboard.ui.theme import format_bytes

S = ModelStatus
STAGE_TEXT = {"checking_memory": "Checking GPU memory", "unloading_models": "Unloading models",
              "loading_target": "Loading model", "rolling_back": "Restoring the previous models",
              "cancelling": "Cancelling"}
# The steps of a switch, and the load phases (or stages) each covers.
STEPS = (("Unload", ("checking_memory", "unloading_models")), ("Weights", ("starting", "loading_weights")),
         ("GPU init", ("initializing",)), ("Warm-up", ("warming_up",)))
LONG_S = 60.0  # past this ETA, or on a slow read, the banner says "this may take a while"
HEIGHT = 132


def current_step(stage: str, phase: str) -> int:
    """Index in STEPS of what a switch is doing now (from its stage, refined by the load's phase)."""
    if stage == "loading_target":
        for index, (_, phases) in enumerate(STEPS):
            if phase in phases:
                return index
        return 1
    return 0


def eta_text(eta_s: float | None) -> str:
    if eta_s is None:
        return "estimating time"
    if eta_s >= 90:
        return f"~{eta_s / 60:.0f} min left"
    return f"~{eta_s:.0f} s left"


def takes_a_while(state: DashboardState) -> bool:
    return state.slow or (state.eta_s is not None and state.eta_s > LONG_S)


def switch_html(s: DashboardState) -> str:
    """The banner during a switch, cancel or rollback."""
    e = html.escape
    target = e(s.name_of(s.switch_target))
    if s.stage in ("cancelling", "rolling_back"):
        # The message names what failed or was cancelled and what comes back: it is the headline.
        kind = "cancelling" if s.stage == "cancelling" else "rolling-back"
        head = e(s.stage_message or STAGE_TEXT[s.stage])
        steps = f"<div class='stage'>{STAGE_TEXT[s.stage]}</div>"
    else:
        kind = "switching"
        origin = f" from {e(s.name_of(s.switch_from))}" if s.switch_from else ""
        head = f"Switching{origin} to <b>{target}</b>..."
        now = current_step(s.stage, s.phase)
        items = []
        for index, (label, _) in enumerate(STEPS):
            cls = "done" if index < now else "now" if index == now else ""
            items.append(f"<li class='{cls}'><span>{index + 1}</span>{label}</li>")
        steps = f"<ol class='steps'>{''.join(items)}</ol><div class='stage'>{e(STAGE_TEXT.get(s.stage, s.stage))}"
        steps += f": {e(s.stage_message)}</div>" if s.stage_message else "</div>"
    size = (f" · <span class='bytes'>{format_bytes(s.bytes_loaded)} of {format_bytes(s.bytes_total)}</span>"
            if s.bytes_total else "")
    slow = ("<div class='slow'>This may take a while"
            + (": the checkpoint reads slower than usual." if s.slow else ".") + "</div>") if takes_a_while(s) else ""
    # Cancel is part of the text: a widget shown and hidden with each switch costs the page a new layout.
    cancel = ("<button class='cancel-switch' data-action='cancel' type='button'>Cancel</button>"
              if s.stage != "cancelling" else "")
    return (
        f"<div class='switch-banner {kind}' role='status'>"
        f"<div class='head'><span class='spinner'></span><span class='title'>{head}</span>{cancel}</div>{steps}"
        f"<div class='bar'><div class='fill' style='width:{s.progress}%'></div>"
        f"<span class='percent'>{s.progress}%</span></div>"
        f"<div class='numbers'><span class='eta'>{eta_text(s.eta_s)}</span>{size}</div>{slow}</div>")


def idle_html(s: DashboardState) -> str:
    """The banner's place when nothing switches: the chat's header, naming the model the chat goes to."""
    e = html.escape
    chosen = s.selected_model or s.active_model
    model = next((m for m in s.models if m["id"] == chosen), None)
    if model is None:
        # Pre-warmed or adopted after a restart: loaded, but nobody chose one to chat with yet.
        loaded = [e(m["name"]) for m in s.models if m["status"] in (S.RUNNING, S.SLEEPING)]
        title, sub = ("No model chosen", f"Loaded: {', '.join(loaded)}. Pick one in the header to chat.") if loaded \
            else ("No model loaded", "Pick one in the header to load it and chat.")
        return (f"<div class='chat-header empty'><span class='dot'></span><div><div class='title'>{title}</div>"
                f"<div class='sub'>{sub}</div></div></div>")
    if model["status"] == S.STOPPED:
        return (f"<div class='chat-header empty'><span class='dot'></span><div><div class='title'>"
                f"{e(model['name'])} is not loaded</div><div class='sub'>Pick it in the header to load it, or "
                "pick another.</div></div></div>")
    used = model.get("gpu_memory_used_gb")
    where = f"{used:g} GB of GPU memory" if used is not None else ""
    if len(s.devices) > 1 and model.get("gpus"):
        where += " on GPU " + ", ".join(str(g) for g in model["gpus"])
    status = str(model["status"])
    state = {S.RUNNING: "ready", S.SLEEPING: "asleep", S.FAILED: "failed"}.get(status, status)
    warm = " · pre-warmed" if model.get("warm") else ""
    return (f"<div class='chat-header status-{status}'><span class='dot'></span><div>"
            f"<div class='title'>{e(model['name'])} <span class='state'>{state}</span></div>"
            f"<div class='sub'>{where}{warm}</div></div></div>")


def error_text(s: DashboardState) -> tuple[str, str]:
    """(title, body) of the last failed switch."""
    error = s.error or {}
    target = s.name_of(error.get("target_model"))
    fits = [s.name_of(m) for m in error.get("suggestions") or []]
    hint = f" Models that fit now: {', '.join(fits)}." if fits else ""
    return f"Switch to {target} failed", f"{error.get('message', '')}{hint}"


CSS = f"""
:host {{ --fg: #1d2129; --muted: #687080; --line: #dfe3ea; --accent: #3f51b5; --track: #e8eaf6; display: block; }}
.wrap.dark {{ --fg: #e6e8ee; --muted: #a0a7b4; --line: #343a46; --accent: #8c9eff; --track: #2c3142; }}
.wrap {{ height: {HEIGHT}px; box-sizing: border-box; color: var(--fg); font: 14px/1.45 Roboto, system-ui, sans-serif; }}
.switch-banner {{ height: 100%; box-sizing: border-box; padding: 10px 14px; border: 1px solid var(--line);
  border-left: 4px solid var(--accent); border-radius: 10px; overflow: hidden; }}
.switch-banner.cancelling, .switch-banner.rolling-back {{ border-left-color: #ef6c00; }}
.head {{ display: flex; align-items: center; gap: 10px; }}
.cancel-switch {{ margin-left: auto; flex: none; padding: 4px 10px; font: 500 13px/1.6 Roboto, system-ui, sans-serif;
  color: #d32f2f; background: none; border: 1px solid #d32f2f80; border-radius: 4px; cursor: pointer; }}
.cancel-switch:hover {{ background: #d32f2f0d; border-color: #d32f2f; }}
.cancel-switch:disabled {{ opacity: 0.5; cursor: default; }}
.wrap.dark .cancel-switch {{ color: #f44336; border-color: #f4433680; }}
.title {{ overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }}
.spinner {{ flex: none; width: 14px; height: 14px; border-radius: 50%; border: 2px solid var(--track);
  border-top-color: var(--accent); animation: spin 0.8s linear infinite; }}
@keyframes spin {{ to {{ transform: rotate(360deg); }} }}
.steps {{ display: flex; gap: 6px; margin: 6px 0 2px; padding: 0; list-style: none; font-size: 12px;
  color: var(--muted); flex-wrap: wrap; }}
.steps li {{ display: flex; align-items: center; gap: 5px; }}
.steps li + li::before {{ content: ""; width: 16px; height: 1px; background: var(--line); margin-right: 2px; }}
.steps span {{ display: inline-grid; place-items: center; width: 17px; height: 17px; border-radius: 50%;
  font-size: 11px; border: 1px solid var(--line); }}
.steps li.done span {{ background: #2e7d32; border-color: #2e7d32; color: #fff; }}
.steps li.now {{ color: var(--fg); font-weight: 600; }}
.steps li.now span {{ background: var(--accent); border-color: var(--accent); color: #fff; }}
.stage {{ font-size: 12px; color: var(--muted); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }}
.bar {{ position: relative; height: 16px; margin: 5px 0 3px; border-radius: 8px; background: var(--track);
  overflow: hidden; }}
.fill {{ height: 100%; background: var(--accent); transition: width 0.3s ease; }}
.percent {{ position: absolute; inset: 0; text-align: center; font-size: 11px; line-height: 16px; font-weight: 600;
  color: var(--fg); mix-blend-mode: normal; }}
.numbers {{ font-size: 12px; color: var(--muted); }}
.slow {{ font-size: 12px; color: #ef6c00; font-weight: 500; }}
.chat-header {{ display: flex; align-items: center; gap: 12px; height: 100%; box-sizing: border-box; padding: 0 14px;
  border: 1px solid var(--line); border-radius: 10px; }}
.chat-header .title {{ font-size: 17px; font-weight: 600; }}
.chat-header .state {{ font-size: 12px; font-weight: 500; padding: 2px 8px; border-radius: 10px; margin-left: 6px;
  background: var(--track); color: var(--muted); vertical-align: middle; }}
.chat-header.status-running .state {{ background: #e8f5e9; color: #2e7d32; }}
.wrap.dark .chat-header.status-running .state {{ background: #1e3a22; color: #a5d6a7; }}
.chat-header .sub {{ font-size: 13px; color: var(--muted); }}
.chat-header .dot {{ flex: none; width: 12px; height: 12px; border-radius: 50%; background: #b0b6c2; }}
.chat-header.status-running .dot {{ background: #2e7d32; box-shadow: 0 0 0 4px rgb(46 125 50 / 0.18); }}
.chat-header.status-failed .dot {{ background: #d32f2f; }}
"""


class SwitchBanner(pn.viewable.Viewer):
    """The fixed strip above the chat (see the module's docstring)."""

    state = param.ClassSelector(class_=DashboardState)
    dark = param.Boolean(default=False)

    def __init__(self, on_cancel: Callable[[], Awaitable[None]], on_retry: Callable[[str], Awaitable[None]],
                 on_unpin: Callable[[str], Awaitable[None]], on_manage: Callable[[], None], kit: Kit = SERVED,
                 **params: Any) -> None:
        super().__init__(**params)
        self.kit = kit
        self._on_cancel = on_cancel
        self._retry = kit.button("Retry", "retry-switch")
        self._manage = kit.button("Open model manager", "open-manager", variant="outlined")
        self._unpin = kit.button("Unpin", "unpin-blocker", variant="outlined")
        self._dismiss = kit.button("Dismiss", "dismiss-error", variant="text", color="default")
        self.dismissed: str | None = None  # the switch id whose failure this session closed

        async def retry(_: Any) -> None:
            target = (self.state.error or {}).get("target_model")
            if target:
                await on_retry(target)

        async def unpin(_: Any) -> None:
            for model_id in (self.state.error or {}).get("unpinnable") or []:
                await on_unpin(model_id)

        def dismiss(_: Any) -> None:
            self.dismissed = (self.state.error or {}).get("switch_id")
            self.param.trigger("dark")  # re-evaluates what is shown

        self._retry.on_click(retry)
        self._unpin.on_click(unpin)
        self._manage.on_click(lambda _: on_manage())
        self._dismiss.on_click(dismiss)
        self._offer_unpin()

    @param.depends("state.switching", "state.switch_target", "state.switch_from", "state.stage",
                   "state.stage_message", "state.phase", "state.progress", "state.eta_s", "state.bytes_loaded",
                   "state.bytes_total", "state.slow", "state.active_model", "state.selected_model", "state.models",
                   "dark")
    def _text(self) -> str:
        s = self.state
        body = switch_html(s) if s.switching else idle_html(s)
        return f"<div class='wrap{' dark' if self.dark else ''}'>{body}</div>"

    async def _act(self, action: str) -> None:
        if action == "cancel":
            await self._on_cancel()

    def _failed(self) -> bool:
        error = self.state.error
        return bool(error) and not self.state.switching and error.get("switch_id") != self.dismissed

    @param.depends("state.error", "state.switching", "dark")
    def _error_visible(self) -> bool:
        return self._failed()

    @param.depends("state.error", "state.switching", "dark")
    def _strip_visible(self) -> bool:
        return not self._failed()

    @param.depends("state.error")
    def _error_title(self) -> str:
        return error_text(self.state)[0]

    @param.depends("state.error")
    def _error_body(self) -> str:
        return error_text(self.state)[1]

    @param.depends("state.error")
    def _error_message(self) -> str:
        """The alert's text: Material's alert has a title of its own; Panel's gets it in bold."""
        title, body = error_text(self.state)
        return body if self.kit.material else f"**{title}.** {body}"

    @param.depends("state.error", watch=True)
    def _offer_unpin(self) -> None:
        """Unpin only for models a person pinned (the catalog's preserve_models cannot be unpinned here)."""
        names = [self.state.name_of(m) for m in (self.state.error or {}).get("unpinnable") or []]
        self._unpin.label = f"Unpin {', '.join(names)}" if names else "Unpin"
        self._unpin.visible = bool(names)

    def __panel__(self) -> pn.viewable.Viewable:
        # Bound to a method, the text is updated in place: only the new text travels on each progress step.
        strip = LiveHTML(object=self._text, on_action=self._act, visible=self._strip_visible,
                         sizing_mode="stretch_width", height=HEIGHT, margin=(6, 10), stylesheets=[CSS])
        alert = self.kit.alert("switch-error", object=self._error_message, title=self._error_title, severity="error",
                               sizing_mode="stretch_width", margin=0)
        actions = pn.Row(self._retry, self._manage, self._unpin, self._dismiss, margin=(4, 0))
        # At least the strip's height (nothing jumps on a wide screen); taller where the reason wraps.
        error = pn.Column(alert, actions, visible=self._error_visible, sizing_mode="stretch_width",
                          min_height=HEIGHT, margin=(6, 10))
        return pn.Column(strip, error, sizing_mode="stretch_width", margin=0)


class ConfirmSwitch(pn.viewable.Viewer):
    """Shows the plan (what unloads, memory before/after, time) and waits for a yes before switching.

    A confirmation that replaces a running switch closes itself when that switch ends: its question no
    longer stands.
    """

    plan = param.Dict(default=None, allow_None=True, doc="The dry run awaiting confirmation.")
    state = param.ClassSelector(class_=DashboardState)

    def __init__(self, on_confirm: Callable[[str], Awaitable[None]], kit: Kit = SERVED, **params: Any) -> None:
        super().__init__(**params)
        self.kit = kit
        self._yes = kit.button("Switch", "confirm-switch")
        self._no = kit.button("Keep current", "reject-switch", variant="outlined")

        async def yes(_: Any) -> None:
            target = self.plan["target_model"] if self.plan else None
            self.plan = None
            if target:
                await on_confirm(target)

        self._yes.on_click(yes)
        self._no.on_click(lambda _: setattr(self, "plan", None))
        self.state.param.watch(self._close_when_stale, ["switching", "switch_target"])

    def _close_when_stale(self, *_: Any) -> None:
        p = self.plan
        if p and p.get("replaces") and (not self.state.switching or self.state.switch_target != p["replaces"]):
            self.plan = None

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
        extra = f"<div class='note'>{html.escape(p['note'])}</div>" if p.get("note") else ""
        name = html.escape(p.get("target_name", p["target_model"]))
        return (
            f"<div class='confirm-plan'><div class='q'>Switch to {name}?</div>{placement}"
            f"<div>Unloads: {html.escape(unload)}</div>"
            f"<div>GPU memory free: {p['available_gb']:.1f} GB now, {p['free_gb_after']:.1f} GB after</div>"
            f"<div>About {p['estimated_load_time_seconds']:.0f} s to load</div>{extra}</div>")

    def __panel__(self) -> pn.viewable.Viewable:
        css = (".confirm-plan { font: 14px/1.5 Roboto, system-ui, sans-serif; } "
               ".confirm-plan .q { font-weight: 600; font-size: 15px; margin-bottom: 4px; } "
               ".confirm-plan .note { margin-top: 4px; color: #ef6c00; }")
        return self.kit.card(pn.pane.HTML(self._body, sizing_mode="stretch_width", stylesheets=[css]),
                             pn.Row(self._yes, self._no), css="confirm-box", visible=self.param.plan.rx.bool(),
                             sizing_mode="stretch_width", margin=(6, 10))
