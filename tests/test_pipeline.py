"""mechq.report as a list of named stages: its "[i/n]" lines count the stages that run (tiny model,
RTN: no GPTQ run)."""

from __future__ import annotations

import re

import pytest

import mechq

pytestmark = pytest.mark.usefixtures("one_thread")  # many small forwards of the tiny model


@pytest.mark.parametrize("diagnose, compare, stages", [
    (True, False, ["model", "quantize", "recall", "diagnose", "figures", "wrote"]),
    (False, False, ["model", "quantize", "recall", "figures", "wrote"]),
    (False, True, ["model", "quantize", "recall", "figures", "architecture", "wrote"]),
])
def test_stage_numbers_are_consecutive(tiny, tmp_path, diagnose, compare, stages):
    lines = []
    res = mechq.report(tiny, max_facts=12, out=tmp_path, method="rtn",
                       bits=(3, 2) if compare else (4, 2), diagnose=diagnose,
                       compare_with={"again": tiny} if compare else None, progress=False,
                       echo=lines.append)
    numbered = [m.groups() for m in map(re.compile(r"\[(\d+)/(\d+)\] (\w+)").match, lines) if m]
    n = len(stages)
    assert numbered == [(str(i), str(n), s) for i, s in enumerate(stages, 1)]
    assert (tmp_path / "report.html").exists() and "Run took" in res.summary
    assert ("verdicts" in res.frames) is diagnose
    assert ("architectures_contrast" in res.frames) is compare
