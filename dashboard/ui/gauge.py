"""The GPU memory gauge: used / total with each model's share, free memory, source, and history."""

from __future__ import annotations

from typing import Any

import panel as pn
import param
from bokeh.models import ColumnDataSource
from bokeh.plotting import figure

from dashboard.ui.bokeh_update import update_bokeh
from dashboard.ui.live_html import LiveHTML
from dashboard.ui.state import DashboardState
from dashboard.ui.theme import model_colour, time_axis


class GpuGauge(pn.viewable.Viewer):
    state = param.ClassSelector(class_=DashboardState)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        history = self.state.memory_history
        self._source = ColumnDataSource({"t": [t * 1000 for t, _ in history], "used": [u for _, u in history]})
        self._plot = figure(height=140, sizing_mode="stretch_width", x_axis_type="datetime", toolbar_location=None,
                            y_range=(0, max(self.state.gpu_total_gb, 1.0)), title="GPU memory used (GB)")
        self._plot.line("t", "used", source=self._source, line_width=2, color="#1565c0")
        time_axis(self._plot)
        self._plot.title.text_font_size = "11px"
        self.state.param.watch(self._stream, "memory_history")

    def _stream(self, event: param.parameterized.Event) -> None:
        if not event.new:
            return
        t, used = event.new[-1]

        def update() -> None:
            self._source.stream({"t": [t * 1000], "used": [used]}, rollover=600)
            self._plot.y_range.end = max(self.state.gpu_total_gb, 1.0)

        update_bokeh(self._plot, update)

    @param.depends("state.gpu_used_gb", "state.gpu_total_gb", "state.per_model_gb", "state.gpu_source",
                   "state.models", "state.devices")
    def _bar(self) -> str:
        s = self.state
        ids = [m["id"] for m in sorted(s.models, key=lambda m: m["id"])]
        free = max(s.gpu_total_gb - s.gpu_used_gb, 0.0)
        source = "NVML" if s.gpu_source == "nvml" else "virtual GPU (configured size)"
        name = f" · {s.gpu_name}" if s.gpu_name and s.gpu_source == "nvml" else ""
        if len(s.devices) > 1:  # one compact bar per device, each model's share on the device it occupies
            bars = "".join(self._device_row(ids, d) for d in s.devices)
            shown = {mid for d in s.devices for mid in d.get("models", {})}
        else:
            bars = f"<div class='gauge'>{self._shares(ids, s.per_model_gb, s.gpu_used_gb, s.gpu_total_gb)}</div>"
            shown = set(s.per_model_gb)
        legend = "".join(
            f"<div><span class='dot' style='background:{model_colour(ids, mid)}'></span>"
            f"{s.name_of(mid)} <b>{s.per_model_gb.get(mid, 0.0):.1f} GB</b></div>" for mid in sorted(shown))
        other = max(s.gpu_used_gb - sum(s.per_model_gb.values()), 0.0)
        if other > 0.05:
            legend += f"<div><span class='dot' style='background:#bdbdbd'></span>Other processes {other:.1f} GB</div>"
        count = f" on {len(s.devices)} GPUs" if len(s.devices) > 1 else ""
        return f"""
<style>
.gauge {{ display:flex; height:22px; border:1px solid #999; border-radius:4px; overflow:hidden; background:#f5f5f5 }}
.device .gauge {{ height:14px; flex:1 }} .device {{ display:flex; align-items:center; gap:6px; font-size:11px;
  margin:2px 0 }} .device .label {{ width:38px; color:#444 }} .device .figures {{ width:92px; text-align:right }}
.share {{ height:100% }} .dot {{ display:inline-block; width:10px; height:10px; border-radius:5px; margin-right:5px }}
.gpu-legend {{ font-size: 12px; margin-top: 4px }}
</style>
<div class='gpu-gauge'>
<div class='gpu-figures'><b>{s.gpu_used_gb:.1f} / {s.gpu_total_gb:.1f} GB</b> used{count} · {free:.1f} GB free</div>
{bars}
<div class='gpu-legend'>{legend}</div>
<div class='gpu-source' style='font-size:11px;color:#666'>Source: {source}{name}</div>
</div>"""

    def _shares(self, ids: list[str], per_model: dict[str, float], used: float, total: float) -> str:
        total = total or 1.0
        segments = "".join(
            f"<div class='share' title='{self.state.name_of(mid)}: {gb:.1f} GB' style='width:{100 * gb / total:.2f}%;"
            f"background:{model_colour(ids, mid)}'></div>" for mid, gb in per_model.items())
        other = max(used - sum(per_model.values()), 0.0)
        if other > 0.05:  # memory no model of ours accounts for: other processes, or held after a stop
            segments += (f"<div class='share' title='Other processes: {other:.1f} GB' "
                         f"style='width:{100 * other / total:.2f}%;background:#bdbdbd'></div>")
        return segments

    def _device_row(self, ids: list[str], device: dict[str, Any]) -> str:
        shares = self._shares(ids, device.get("models", {}), device["used_gb"], device["total_gb"])
        return (f"<div class='device' data-index='{device['index']}' title='{device.get('name', '')}'>"
                f"<span class='label'>GPU {device['index']}</span><div class='gauge'>{shares}</div>"
                f"<span class='figures'>{device['used_gb']:.0f} / {device['total_gb']:.0f} GB</span></div>")

    def __panel__(self) -> pn.viewable.Viewable:
        # Bound to a method, the figures are updated in place: only the new text travels.
        return pn.Column(pn.pane.Markdown("#### GPU memory", margin=(0, 5)),
                         LiveHTML(object=self._bar, sizing_mode="stretch_width", margin=(5, 10)),
                         pn.pane.Bokeh(self._plot, sizing_mode="stretch_width"), sizing_mode="stretch_width")
