"""Turning samples into figures: pure summaries, the Markdown table, and PNG plots (Bokeh, drawn by Chromium)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import SwitchSample

ETA_MARKS = (25, 50, 75)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 100 values is the 99th smallest)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without floats
    return ordered[int(rank) - 1]


def eta_errors(sample: SwitchSample, marks: Sequence[int] = ETA_MARKS) -> dict[int, float]:
    """Signed error of the ETA shown when the bar first reached each mark, as a fraction of the real remainder.

    +0.10 means the ETA said 10 % more time than was really left.
    """
    errors: dict[int, float] = {}
    for mark in marks:
        for at, progress, eta in sample.progress:
            if progress >= mark and eta is not None:
                actual = sample.done - at
                if actual > 0:
                    errors[mark] = (eta - actual) / actual
                break
    return errors


def eta_curve(sample: SwitchSample) -> list[tuple[int, float]]:
    """(progress %, signed relative error) for every progress event with an ETA, for the plot."""
    return [(p, (eta - (sample.done - at)) / (sample.done - at)) for at, p, eta in sample.progress
            if eta is not None and sample.done - at > 0.05]


def median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt_s(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} s"


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.1f} ms"


def fmt_pct(value: float | None, signed: bool = False) -> str:
    return "n/a" if value is None else (f"{value * 100:+.1f} %" if signed else f"{value * 100:.1f} %")


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": f"{mem_gb:.0f} GiB",
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# Plots --------------------------------------------------------------------------------------------
def timeline_figure(runs: dict[str, list[SwitchSample]]) -> Any:
    """Each switch as a bar split into: unloading, before the spawn, the engine's start, readiness detection."""
    from bokeh.models import ColumnDataSource, Legend
    from bokeh.plotting import figure

    parts = [("unloading the previous model", "#9e9e9e"), ("orchestrator before spawn", "#ef6c00"),
             ("engine: spawn to /health 200", "#1565c0"), ("readiness detection", "#c62828")]
    labels, data = [], {name: [] for name, _ in parts}
    for engine, samples in runs.items():
        for i, s in enumerate(samples, 1):
            if s.spawned is None or s.healthy is None:
                continue
            gone = s.victim_gone or s.started
            labels.append(f"{engine} #{i} → {s.target}")
            for (name, _), value in zip(parts, (gone - s.started, s.spawned - gone, s.healthy - s.spawned,
                                                s.done - s.healthy), strict=True):
                data[name].append(max(value, 0.0))
    fig = figure(y_range=list(reversed(labels)), width=1100, height=90 + 24 * len(labels),
                 title="Switch timeline (seconds from the switch request)", x_axis_label="seconds",
                 toolbar_location=None)
    source = ColumnDataSource({"label": labels, **{f"p{i}": data[n] for i, (n, _) in enumerate(parts)}})
    bars = fig.hbar_stack([f"p{i}" for i in range(len(parts))], y="label", height=0.7, source=source,
                          color=[c for _, c in parts])
    fig.add_layout(Legend(items=[(name, [bar]) for (name, _), bar in zip(parts, bars, strict=True)]), "below")
    return fig


def eta_figure(runs: dict[str, list[SwitchSample]]) -> Any:
    from bokeh.models import BoxAnnotation
    from bokeh.plotting import figure

    fig = figure(width=1100, height=450, title="ETA error during loads with 3+ loads of history "
                 "(+ means the ETA said more time than was left)", x_axis_label="progress (%)",
                 y_axis_label="ETA error (% of the real remaining time)", toolbar_location=None)
    fig.add_layout(BoxAnnotation(bottom=-15, top=15, fill_alpha=0.1, fill_color="green"))
    colours = {"sim": "#1565c0", "vLLM CPU": "#c62828"}
    for engine, samples in runs.items():
        for i, s in enumerate(samples):
            curve = eta_curve(s)
            if curve:
                legend = {"legend_label": engine} if i == 0 else {}
                fig.line([p for p, _ in curve], [e * 100 for _, e in curve], color=colours.get(engine, "#555"),
                         alpha=0.7, **legend)
    fig.legend.location = "top_right"
    return fig


def save_png(figures: dict[Path, Any], chromium: str) -> None:
    """Render each Bokeh figure with inline resources (no network) and screenshot it with Chromium."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        for path, fig in figures.items():
            html = path.with_suffix(".html")
            html.write_text(file_html(fig, INLINE, title=path.stem))
            page = browser.new_page(viewport={"width": fig.width + 40, "height": fig.height + 40})
            page.goto(html.as_uri())
            page.locator("canvas").first.wait_for(timeout=30_000)
            page.wait_for_timeout(500)  # let the canvas paint
            page.screenshot(path=str(path), full_page=True)
            page.close()
            html.unlink()
        browser.close()


def vllm_version(python: str) -> str:
    try:
        return subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                              text=True, timeout=120).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace one benchmark's section of RESULTS.md (between its ``begin``/``end`` markers), or append it:
    each benchmark owns its section and leaves the others as they are."""
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
