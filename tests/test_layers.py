"""The package's layers, enforced: imports only go down, and no package has an import cycle.

The contracts live in pyproject.toml (``[tool.importlinter]``); these tests run import-linter
on mechq as it is, and on a copy with one bad import added, to show the contracts can fail.
"""

import os
import shutil
import subprocess
import sys

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the mechq package under ``root`` with ``root``'s pyproject.toml."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(LINT), str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True)


def copy_of_mechq(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "mechq", tmp_path / "mechq",
                    ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_layers_are_the_subpackages_top_to_bottom():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in cfg["contracts"] if c["type"] == "layers"]
    assert layers == ["mechq.cli", "mechq.reports", "mechq.repair", "mechq.diagnosis",
                      "mechq.analysis", "mechq.engine", "mechq.quant", "mechq.facts",
                      "mechq.models", "mechq.vocab"]
    # every module of mechq belongs to a layer (the root package only re-exports)
    top = {p.stem if p.is_file() else p.name for p in (ROOT / "mechq").iterdir()
           if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__init__.py"}
    assert top == {name.split(".")[1] for name in layers}


def test_mechq_keeps_its_import_contracts():
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken." in res.stdout


@pytest.mark.parametrize("module,bad,broken", [
    # a low layer reaching up: the vocabulary importing the CLI
    ("vocab.py", "from mechq.cli import main", "mechq.vocab is not allowed to import mechq.cli"),
    # analysis reaching up into repair (the cycle recall -> amplify once was)
    ("analysis/recall.py", "from mechq.repair.amplify import Amplified",
     "mechq.analysis is not allowed to import mechq.repair"),
    # a cycle inside one layer: the Pararel loader importing the module that imports it
    ("facts/pararel.py", "from mechq.facts.sources import load_fact_source",
     "No cycles are allowed in mechq.facts"),
])
def test_an_upward_import_or_a_cycle_breaks_a_contract(tmp_path, module, bad, broken):
    root = copy_of_mechq(tmp_path)
    path = root / "mechq" / module
    path.write_text(path.read_text() + f"\n{bad}  # added by the test\n")
    res = lint(root)
    assert res.returncode == 1, res.stdout + res.stderr
    # an upward import breaks the layers and makes a cycle among mechq's subpackages too
    assert "0 broken" not in res.stdout
    # the broken contract is explained under "Broken contracts", naming what breaks it
    report = res.stdout.split("Broken contracts", 1)[1]
    assert broken in report, res.stdout
