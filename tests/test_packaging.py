"""A built wheel works outside the repository: bundled facts, calibration text and the CLI."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources, so that setuptools' build/ folder neither lands in the
    checkout nor carries stale files from an earlier build into this wheel."""
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "mechq", "data"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(src)], check=True,
                   capture_output=True)
    (whl,) = out.glob("mechq-*.whl")
    return whl


def test_wheel_ships_code_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("mechq/data/facts.csv", "mechq/data/relations.json",
              "mechq/assets/calibration/smollm2-samples.jsonl",
              "mechq/assets/tiny-gpt2/model.safetensors"):
        assert f in names, f
    code = {str(p.relative_to(ROOT)) for p in (ROOT / "mechq").rglob("*.py")}
    assert code <= names, sorted(code - names)  # every module, in every subpackage


@pytest.mark.slow
def test_installed_wheel_runs_the_report_outside_the_repo(wheel, tmp_path):
    """pip install (not editable) into a fresh venv, then `mechq report` from another folder.

    The fresh venv sees the test venv's dependencies through a path entry (so nothing is
    downloaded) but not its editable mechq: that path is added by a .pth file, which Python
    does not process for directories it reaches that way.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    purelib = Path(site.stdout.strip())
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(purelib), str(wheel)], check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, MECHQ_CACHE=str(tmp_path / "cache"), PYTHONPATH="")
    env.pop("MECHQ_DATA", None)
    probe = subprocess.run(
        [str(py), "-c", "import mechq, mechq.facts as f, mechq.facts.calibration as c; "
         "print(mechq.__file__); print(f.DATA_DIR); print(len(mechq.bundled_facts())); "
         "print(len(c.pool_texts()))"],
        cwd=work, env=env, check=True, capture_output=True, text=True)
    file, data_dir, n_facts, n_docs = probe.stdout.split()
    assert file.startswith(str(purelib)) and data_dir.startswith(str(purelib))
    assert int(n_facts) == 404 and int(n_docs) == 128
    run = subprocess.run(
        [str(py), "-m", "mechq.cli", "report", "--model", "tiny-gpt2", "--method", "rtn",
         "--bits", "4", "2", "--max-facts", "30", "--out", "out"],
        cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "out" / "report.html").exists() and (work / "out" / "summary.md").exists()
