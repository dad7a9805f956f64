"""Every notebook runs top to bottom offline on the embedded models, and the experiment scripts and
notebooks are what notebooks/generate.py writes (so they cannot drift apart)."""

from __future__ import annotations

import os
import pathlib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    os.environ["HF_HUB_OFFLINE"] = "1"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    # the figures were produced (plotly mime bundles) and the provenance names the embedded model
    assert sum("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs) >= 2
    assert "tiny-" in str(outputs[-1]["data"]["text/plain"])


def test_generated_files_are_current(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", ROOT / "notebooks" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for d in ("experiments", "notebooks"):
        (tmp_path / d).mkdir()
    generate.main(tmp_path)
    for sub, pattern in (("experiments", "*.py"), ("notebooks", "*.ipynb")):
        generated = {p.name: p.read_text() for p in (tmp_path / sub).glob(pattern)}
        committed = {p.name: p.read_text() for p in (ROOT / sub).glob(pattern)}
        assert generated == committed, "run python notebooks/generate.py and commit the result"
