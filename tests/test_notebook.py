"""notebooks/analysis.ipynb executed headlessly (nbclient, a real ipykernel)
on the committed results, so the notebook cannot rot: every plot drawn, the
`minifs bench --cli` one too when results/ holds such a file, none left out."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from minifs_bench.results import CLI_SCHEMA

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "analysis.ipynb"


def test_analysis_notebook_runs_and_draws_every_plot():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": NOTEBOOK.parent}}
    )
    client.execute()  # raises CellExecutionError on any failing cell; shuts the kernel down
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    results = NOTEBOOK.parent.parent / "results"
    cli = any(json.loads(p.read_text()).get("schema") == CLI_SCHEMA for p in results.glob("*.json"))
    assert len(images) == 5 + cli, [o.get("output_type") for o in outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "left out" not in text, text
    assert "[measured]" in text
