"""examples/notebook.ipynb runs top to bottom: local Ray, a short run, a plot, sampled text."""

import ast
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_notebook_executes_and_plots(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nb = nbformat.read(os.path.join(EXAMPLES, "notebook.ipynb"), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += f"\nSTEPS = 4\nOUTPUT = {str(tmp_path / 'outputs')!r}\n"  # as papermill injects them
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": EXAMPLES}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot cell drew no image"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    run_dir = tmp_path / "outputs" / "llama3-debugmodel"
    assert f"run folder: {run_dir}\n" in text  # taken from the run's config, under OUTPUT
    assert "final checkpoint:" in text and "step-4" in text
    generated = {prompt: ast.literal_eval(continuation)
                 for prompt, continuation in re.findall(r"^'(The |In the morning)' -> (.+)$", text, re.M)}
    assert set(generated) == {"The ", "In the morning"}
    assert all(generated.values()), generated  # some tokens beyond each prompt
    assert os.path.isdir(run_dir / "checkpoint" / "step-4")
