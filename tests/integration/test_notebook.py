"""The notebook runs top to bottom in a real kernel, headless."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.conftest import sim_processes, wait_for

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "smart_switching.ipynb"


def test_notebook_runs_top_to_bottom(tmp_path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    outputs = "".join(str(o.get("text", "")) for cell in notebook.cells for o in cell.get("outputs", []))
    assert "llama-3.1-8b-instruct complete success" in outputs
    assert "gpt-oss-20b complete success" in outputs
    wait_for(lambda: not sim_processes(), timeout=15, message="the notebook's engines to stop")
