"""The notebook runs top to bottom in a real kernel, headless, and its kernel's shutdown stops its engines."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import sim_processes, wait_for

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "smart_switching.ipynb"


def text_of(cell: nbformat.NotebookNode) -> str:
    """What a cell printed and returned, as text."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(str(output.get("text", "")))
        parts.append(str(output.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def test_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits it: connect() makes its data dir under this test's folder, where engines are counted.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
        seen_running = sim_processes(tmp_path)  # while the kernel lives: nothing in the notebook closes the lab
    outputs = [text_of(cell) for cell in notebook.cells if cell.cell_type == "code"]
    every = "".join(outputs)
    for model in ("llama-3.1-8b-instruct", "gpt-oss-20b"):
        assert f"Done: {model} is ready (success" in every  # the progress output's last state
        assert f"status='success', target_model='{model}'" in every  # what lab.switch returned
    assert "gpt-oss-20b: [simulated reply from gpt-oss-20b]" in every
    assert "lab.close()" not in "".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert seen_running, "the notebook's engines should run until its kernel stops"
    wait_for(lambda: not sim_processes(tmp_path), timeout=15, message="the notebook's engines to stop with its kernel")
    # The lab closed itself at the kernel's exit, to the end: its temporary data dir is gone too.
    wait_for(lambda: not list(tmp_path.glob("smartswitch-lab-*")), timeout=15, message="the lab's data dir to go")
