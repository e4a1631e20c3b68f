"""The course notebook (notebooks/prime_step_by_step.ipynb) runs from top to bottom, headless.

It is executed the way Jupyter opens it, with the kernel's working directory in notebooks/, so
its first cell's own path check (a checkout, or a Colab clone) is what gets it to the repository
root, whichever folder pytest was started from. Any cell that raises fails the test."""
import os
import time

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "prime_step_by_step.ipynb")
BUDGET_S = 120  # the notebook is meant to run in well under two minutes on a CPU


def test_the_step_by_step_notebook_runs_headless_without_a_cell_error():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    t = time.time()
    client.execute()  # raises CellExecutionError, naming the cell, on the first cell that fails
    took = time.time() - t
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], "a cell error"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"repository: {ROOT}" in text, "the first cell found the repository root from notebooks/"
    for name in ("prompt_ids", "resp", "logp_ref", "q", "A", "logp_old"):  # the README table's names
        assert f"\n{name} " in "\n" + text, f"the notebook prints the shape of {name}"
    assert any("image/png" in o.get("data", {}) for o in outputs), "the advantages plot is drawn"
    assert any("<iframe srcdoc=" in o.get("data", {}).get("text/html", "") for o in outputs), "the token table"
    assert took < BUDGET_S, f"the notebook took {took:.0f} s, more than {BUDGET_S} s"
