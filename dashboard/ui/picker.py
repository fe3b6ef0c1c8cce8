"""The model picker in the header: the model in use, and a menu of every model grouped by status.

A small ``JSComponent`` (plain DOM, its code and style shipped inline: nothing is fetched) because a
menu row here carries more than a menu item can: a status badge with a spinner while loading, the size
as a muted badge, a pin, the load percent, the failure reason on hover. Rows keep their order while
the pointer is over the menu, so a status change never moves a row under a click.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, ClassVar

import panel as pn
import param
from panel.custom import JSComponent

from dashboard.orchestrator.states import ModelStatus

S = ModelStatus
# Group of each status: stable headings, in this order.
GROUPS = (("Running", (S.RUNNING, S.LOADING, S.UNLOADING)), ("Sleeping", (S.SLEEPING,)),
          ("Available", (S.STOPPED, S.FAILED)))


def picker_rows(models: list[dict[str, Any]], selected: str | None, switch_target: str | None,
                progress: int) -> list[dict[str, Any]]:
    """What the menu shows, in catalog order, each row with its group (pure: the state's rows in)."""
    group_of = {status: name for name, statuses in GROUPS for status in statuses}
    rows = []
    for model in sorted(models, key=lambda m: m.get("order", 0)):
        status = str(model["status"])
        loading = status == S.LOADING
        rows.append({
            "id": model["id"], "name": model["name"], "status": status, "group": group_of.get(status, "Available"),
            "size": f"{model['size_gb']:g} GB", "pinned": bool(model.get("pinned")), "warm": bool(model.get("warm")),
            # One number everywhere: the switch's own percent for its target, the model's otherwise.
            "percent": (progress if model["id"] == switch_target else model.get("load_progress", 0)) if loading
            else None,
            "error": model.get("error") or "", "selected": model["id"] == selected,
        })
    return rows


class ModelPicker(JSComponent):
    """Header button naming the model in use; its menu picks another (``on_pick(model_id)``)."""

    rows = param.List(default=[], doc="picker_rows(...): the menu's content.")
    label = param.String(default="Pick a model", doc="The button's text: the model in use and its state.")
    label_status = param.String(default="stopped", doc="Status shown by the button's badge.")
    dark = param.Boolean(default=False)

    _esm = """
const GROUPS = ["Running", "Sleeping", "Available"];
const PIN = '<svg viewBox="0 0 24 24" width="14" height="14" aria-label="pinned">' +
  '<path fill="currentColor" d="M16 3l5 5-2 1-3 3v4l-2 2-4-4-5 5H4v-1l5-5-4-4 2-2h4l3-3 1-2z"/></svg>';
const STATUS_TEXT = {running: "ready", loading: "loading", unloading: "unloading", sleeping: "asleep",
                     failed: "failed", stopped: ""};

function badge(status) {
  const b = document.createElement("span");
  b.className = `badge badge-${status}`;
  if (status === "loading" || status === "unloading") {
    b.classList.add("spinner");
    b.setAttribute("role", "progressbar");
  }
  return b;
}

export function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "model-picker";
  const trigger = document.createElement("button");
  trigger.className = "picker-trigger";
  trigger.setAttribute("aria-haspopup", "listbox");
  const menu = document.createElement("div");
  menu.className = "picker-menu";
  menu.setAttribute("role", "listbox");
  menu.hidden = true;
  root.append(trigger, menu);

  let hovered = false;
  let order = null;  // row ids in the order shown while the pointer is over the menu

  function drawTrigger() {
    trigger.replaceChildren(badge(model.label_status));
    const text = document.createElement("span");
    text.className = "picker-label";
    text.textContent = model.label;
    const caret = document.createElement("span");
    caret.className = "caret";
    caret.textContent = "\u25BE";
    trigger.append(text, caret);
    root.classList.toggle("dark", model.dark);
  }

  const rowEls = {};  // model id -> its row: kept and updated, so a click never lands on a replaced node
  const headEls = {};

  function fillRow(row, r) {
    row.className = `model-option status-${r.status}` + (r.selected ? " selected" : "");
    row.setAttribute("aria-selected", r.selected ? "true" : "false");
    row.title = r.error || "";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = r.name;
    const meta = document.createElement("span");
    meta.className = "meta";
    const state = STATUS_TEXT[r.status] + (r.percent !== null && r.percent !== undefined ? ` ${r.percent}%` : "");
    if (state) {
      const s = document.createElement("span");
      s.className = "state";
      s.textContent = state;
      meta.append(s);
    }
    if (r.warm) {
      const w = document.createElement("span");
      w.className = "chip warm";
      w.textContent = "pre-warmed";
      meta.append(w);
    }
    const size = document.createElement("span");
    size.className = "chip";
    size.textContent = r.size;
    meta.append(size);
    if (r.pinned) {
      const pin = document.createElement("span");
      pin.className = "pin";
      pin.title = "Pinned: never unloaded to make room";
      pin.innerHTML = PIN;
      meta.append(pin);
    }
    const check = document.createElement("span");
    check.className = "check";
    check.textContent = r.selected ? "\u2713" : "";
    row.replaceChildren(check, badge(r.status), name, meta);
  }

  function rowFor(r) {
    let row = rowEls[r.id];
    if (!row) {
      row = rowEls[r.id] = document.createElement("button");
      row.dataset.model = r.id;
      row.setAttribute("role", "option");
      row.addEventListener("click", (e) => {
        e.stopPropagation();
        menu.hidden = true;
        model.send_msg({pick: r.id});
      });
    }
    fillRow(row, r);
    return row;
  }

  function headFor(group) {
    let h = headEls[group];
    if (!h) {
      h = headEls[group] = document.createElement("div");
      h.className = "picker-group";
      h.textContent = group;
    }
    return h;
  }

  function drawMenu() {
    let rows = model.rows;
    const frozen = hovered && order;
    if (frozen) {  // the pointer is over the menu: same rows, same places, updated in place
      const byId = Object.fromEntries(rows.map(r => [r.id, r]));
      rows = order.map(id => byId[id]).filter(Boolean);
    }
    const parts = [];
    for (const group of frozen ? [null] : GROUPS) {
      const members = group === null ? rows : rows.filter(r => r.group === group);
      if (!members.length) continue;
      if (group !== null) parts.push(headFor(group));
      for (const r of members) parts.push(rowFor(r));
    }
    if (frozen) {
      return;  // rows were updated in place; headings and order stay until the pointer leaves
    }
    const current = Array.from(menu.children);
    if (current.length !== parts.length || current.some((el, i) => el !== parts[i])) {
      menu.replaceChildren(...parts);
    }
  }

  trigger.addEventListener("click", (e) => {
    e.stopPropagation();
    menu.hidden = !menu.hidden;
    if (!menu.hidden) drawMenu();
  });
  document.addEventListener("click", () => { menu.hidden = true; });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") menu.hidden = true; });
  menu.addEventListener("mouseenter", () => {
    hovered = true;
    order = Array.from(menu.querySelectorAll(".model-option")).map(el => el.dataset.model);
  });
  menu.addEventListener("mouseleave", () => { hovered = false; order = null; drawMenu(); });

  model.on(["rows"], drawMenu);
  model.on(["label", "label_status", "dark"], drawTrigger);
  drawTrigger();
  drawMenu();
  return root;
}
"""

    _stylesheets: ClassVar[list[str]] = ["""
:host { --fg: #1d2129; --muted: #687080; --bg: #fff; --hover: #f1f3f8; --line: #e2e5ec; --accent: #3f51b5;
        --chip: #eef0f5; display: block; }
.model-picker.dark { --fg: #e6e8ee; --muted: #a0a7b4; --bg: #1f232b; --hover: #2a2f39; --line: #343a46;
        --accent: #8c9eff; --chip: #2c313b; }
.model-picker { position: relative; font: 14px/1.4 Roboto, system-ui, sans-serif; color: var(--fg); }
.picker-trigger { display: flex; align-items: center; gap: 8px; max-width: 100%; padding: 6px 12px;
        font: inherit; font-weight: 500; color: inherit; background: rgb(255 255 255 / 0.14);
        border: 1px solid rgb(255 255 255 / 0.35); border-radius: 8px; cursor: pointer; }
.picker-trigger:hover { background: rgb(255 255 255 / 0.24); }
.picker-label { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.caret { opacity: 0.8; }
.picker-menu { position: absolute; z-index: 2000; top: calc(100% + 6px); left: 0; width: min(440px, 92vw);
        max-height: 70vh; overflow-y: auto; padding: 6px; background: var(--bg); color: var(--fg);
        border: 1px solid var(--line); border-radius: 10px; box-shadow: 0 10px 30px rgb(0 0 0 / 0.2); }
.picker-group { padding: 8px 10px 4px; font-size: 11px; font-weight: 600; letter-spacing: 0.06em;
        text-transform: uppercase; color: var(--muted); }
.model-option { display: flex; align-items: center; gap: 8px; width: 100%; padding: 8px 10px; font: inherit;
        color: inherit; text-align: left; background: none; border: 0; border-radius: 6px; cursor: pointer; }
.model-option:hover { background: var(--hover); }
.model-option.selected { background: color-mix(in srgb, var(--accent) 12%, transparent); }
.model-option .name { flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.model-option .meta { display: flex; align-items: center; gap: 6px; color: var(--muted); font-size: 12px; }
.check { width: 14px; color: var(--accent); font-weight: 700; }
.chip { padding: 1px 7px; border-radius: 10px; background: var(--chip); white-space: nowrap; }
.chip.warm { color: #00796b; }
.pin { display: inline-flex; color: var(--accent); }
.status-failed .state { color: #d32f2f; }
.badge { flex: none; width: 10px; height: 10px; border-radius: 50%; background: #b0b6c2; }
.badge-running { background: #2e7d32; box-shadow: 0 0 0 3px rgb(46 125 50 / 0.18); }
.badge-sleeping { background: #8d6e63; }
.badge-failed { background: #d32f2f; }
.badge.spinner { background: none; border: 2px solid color-mix(in srgb, var(--accent) 25%, transparent);
        border-top-color: var(--accent); width: 8px; height: 8px; animation: spin 0.8s linear infinite; }
.picker-trigger .badge.spinner { border-color: rgb(255 255 255 / 0.35); border-top-color: #fff; }
@keyframes spin { to { transform: rotate(360deg); } }
@media (max-width: 600px) { .picker-menu { position: fixed; left: 4vw; top: 56px; width: 92vw; } }
"""]

    def __init__(self, on_pick: Callable[[str], Awaitable[None]], **params: Any) -> None:
        super().__init__(**params)
        self._on_pick = on_pick

    def _handle_msg(self, msg: Any) -> None:
        if isinstance(msg, dict) and isinstance(msg.get("pick"), str):
            pn.state.execute(partial(self._on_pick, msg["pick"]))
