"""examples/notebook.ipynb runs top to bottom: local Ray, a short run, more steps resumed from its
checkpoint (a resubmission, as the CLI does it), a plot, sampled text."""

import ast
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

import raytitan

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
    # Asked for 2 more steps, the same run resumed from its newest checkpoint: none redone, and
    # Ray's list of checkpoints naming step 2 (deleted by keep_latest_k = 1) did not trip it.
    assert re.search(r"resumed from \S+/step-4 ", text), text[-3000:]
    logged = [m["step"] for m in raytitan.read_metrics(str(run_dir)) if "loss" in m]
    assert logged == [1, 2, 3, 4, 5, 6]
    assert re.search(r"final checkpoint: \S+step-6\n", text)
    assert os.listdir(run_dir / "checkpoint") and sorted(os.listdir(run_dir / "checkpoint")) == ["step-6", "step-6-hf"]
    assert (run_dir / "checkpoint" / "step-6-hf" / "model.safetensors").is_file()
    generated = {prompt: ast.literal_eval(continuation)
                 for prompt, continuation in re.findall(r"^'(The |In the morning)' -> (.+)$", text, re.M)}
    assert set(generated) == {"The ", "In the morning"}
    assert all(generated.values()), generated  # some tokens beyond each prompt
