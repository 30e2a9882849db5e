"""README.md and docs/ are generated: regenerating them from their templates and the results
files gives exactly what is committed, and no template types a number into its prose."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import build_docs  # noqa: E402


def test_committed_pages_are_what_the_templates_and_results_give():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_docs.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]


def test_every_page_is_linked_and_short_enough():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"
    for png in ("cliff", "evidence", "patching"):
        assert f"figures/{png}.png" in readme and (ROOT / "figures" / f"{png}.png").exists()


def test_a_typed_number_is_caught_and_names_are_not():
    typed = build_docs.stray_numbers("GPTQ w4 keeps 48.0 % of the facts, 194 of them.")
    assert typed == ["48.0 %", "194"]
    names = ("Fig. 10 and §4.3 of arXiv 2604.19884: w4 g128, 2-bit, GPT-2, Gemma 3, P36, "
             "seed 0, `mechq cliff --bits 8 4`, {{ results.demo.run.minutes }} minutes.")
    assert build_docs.stray_numbers(names) == []


def test_number_filters():
    assert build_docs.pct(0.48019) == "48.0 %"
    assert build_docs.num(18698.0) == "18 698"
    assert build_docs.rank(21.5) == "21.5" and build_docs.rank(2.0) == "2"
    assert build_docs.pct(float("nan")) == "—"
