"""The committed notebooks are what ``scripts/build_notebooks.py`` writes, executed, and fit to
read on a code host (static figures, no errors, under 2 MB).

Fast: ``--check`` executes nothing. ``make test`` executes the notebooks themselves
(pytest --nbmake), so together they check that the committed notebooks are the script's output
and that they run.
"""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_notebooks.py"


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def copy(tmp_path):
    """A copy of the committed notebooks to tamper with."""
    folder = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder)
    return folder


def test_committed_notebooks_are_the_scripts_executed_output():
    run = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr or run.stdout


def test_every_notebook_is_built(builder):
    committed = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert committed == sorted(builder.NOTEBOOKS)


def _edit(folder, name, change):
    path = folder / name
    nb = nbformat.read(path, as_version=4)
    change(nb)
    nbformat.write(nb, path)


def test_check_fails_on_an_edited_cell(builder, copy):
    name = "01_knowledge_signal.ipynb"

    def change(nb):
        nb.cells[0].source += "\n\n4-bit keeps the answer at rank 2."

    _edit(copy, name, change)
    run = subprocess.run([sys.executable, str(SCRIPT), "--check", "--dir", str(copy), "01"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "cell sources differ" in run.stderr


def test_check_fails_on_missing_or_unrenderable_outputs(builder, copy):
    name = "02_components.ipynb"
    assert builder.check(copy, [name]) == []

    def strip(nb):
        for c in nb.cells:
            if c.cell_type == "code":
                c.outputs, c.execution_count = [], None

    _edit(copy, name, strip)
    found = builder.check(copy, [name])
    assert any("has no outputs" in p for p in found) and any("not executed" in p for p in found)

    shutil.copy(ROOT / "notebooks" / name, copy / name)

    def spoil(nb):
        cell = next(c for c in nb.cells if c.cell_type == "code")
        cell.outputs.append(nbformat.v4.new_output("error", ename="KeyError", evalue="'w4'",
                                                   traceback=[]))
        cell.outputs.append(nbformat.v4.new_output(
            "display_data", data={"application/vnd.plotly.v1+json": {}, "text/plain": "Figure"}))
        bar = "recall:  50%|#####     | 1/2 [00:01<00:01]\r"
        cell.outputs.append(nbformat.v4.new_output("stream", name="stderr", text=bar))
        cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}

    _edit(copy, name, spoil)
    found = "\n".join(builder.check(copy, [name]))
    for what in ("error output KeyError", "application/vnd.plotly.v1+json", "progress bar",
                 "execution timings"):
        assert what in found


def test_check_fails_on_a_notebook_over_the_size_limit(builder, copy, monkeypatch):
    name = "05_architectures.ipynb"
    monkeypatch.setattr(builder, "MAX_BYTES", (copy / name).stat().st_size - 1)
    assert any("over the" in p for p in builder.check(copy, [name]))
