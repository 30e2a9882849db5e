"""diagnose: weight signatures, format faults, the thresholds against their measurements, and
the verdicts on real variants."""

import json
from pathlib import Path

import pandas as pd
import pytest

import mechq
from mechq.diagnosis import verdict as D
from mechq.quant import faults
from mechq.analysis.signatures import weight_signatures

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
FAULTS = [faults.awq_order_as_gptq, faults.zero_point_off_by_one, faults.permuted_g_idx,
          faults.transposed_codes]


@pytest.fixture(scope="module")
def tiny_g32(tiny):
    # group size 32 gives the tiny model's 128-wide inputs 4 groups, so a permuted g_idx moves
    # channels between groups (with one group per row it would change nothing)
    return mechq.quantize(tiny, "rtn", bits=4, group_size=32)


def test_rounding_signatures_follow_their_definition(tiny, tiny_g32):
    w = weight_signatures(tiny, tiny_g32)
    assert len(w) == len(tiny_g32.modules)
    # round-to-nearest leaves an error uniform on [0, 0.5] steps: median 0.25; fp16 scales and
    # clipped extremes move each module's median by a few hundredths (measured 0.25-0.26)
    assert w["step_error"].between(0.2, 0.3).all()
    # a group's rounding errors average out: |mean| over 32 weights is ~0.29/sqrt(32) = 0.05 steps
    assert (w["step_bias"] < 0.1).all()
    assert (w["cosine"] > 0.98).all()  # 4-bit rounding keeps weights close (measured >= 0.99)
    assert D.suspect_modules(w).empty


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
def test_format_faults_put_modules_off_their_grid(tiny, tiny_g32, fault):
    broken = fault(tiny_g32)
    bad = D.suspect_modules(weight_signatures(tiny, broken))
    assert len(bad), f"{broken.name}: no module flagged"
    if fault is faults.transposed_codes:  # only square modules can be read transposed
        square = {m for m, p in tiny_g32.modules.items() if p.in_features == p.out_features}
        assert set(bad["module"]) <= square and square
    if fault in (faults.zero_point_off_by_one, faults.awq_order_as_gptq):  # every module
        assert len(bad) == len(tiny_g32.modules)


def test_diagnose_names_the_broken_module_and_shows_its_evidence(tiny, tiny_g32, facts):
    d = D.diagnose(tiny, faults.zero_point_off_by_one(tiny_g32), facts, n_facts=16)
    assert d.verdict == "format_bug"
    assert "transformer.h." in d.reason
    assert list(d.evidence.columns) == ["signature", "value", "fp_value", "threshold", "crossed",
                                        "supports", "section"]
    assert len(d.evidence) == 12 and d.evidence["supports"].isin(D.VERDICTS + ("(context)",)).all()
    shift = d.evidence.set_index("signature").loc["group shift in steps (worst module)"]
    assert shift["crossed"] and shift["value"] > 0.9  # one whole step, up to rounding of scales


def test_diagnose_calls_rtn_w8_healthy(tiny, facts):
    d = D.diagnose(tiny, mechq.quantize(tiny, "rtn", bits=8), facts, n_facts=16)
    assert d.verdict == "healthy", d


def test_bad_input(tiny):
    with pytest.raises(TypeError, match="Variant"):
        D.diagnose(tiny, "gptq-w4g128")
    with pytest.raises(ValueError, match="at least one fact"):
        D.diagnose(tiny, mechq.quantize(tiny, "rtn", bits=8), mechq.FactSet([], name="none"))


def test_thresholds_against_their_measurements():
    """The thresholds separate what scripts/measure_diagnose.py and measure_weight_signatures.py
    measured on SmolLM2 (the numbers the thresholds' docstrings cite)."""
    data = json.loads((RESULTS / "diagnose_signatures.json").read_text())
    no_weights = pd.DataFrame(columns=["module", "cosine", "step_error", "step_bias"])
    expected = {"gptq-w8g128": "healthy", "rtn-w8g128": "healthy",
                "gptq-w4g128": "signal_degradation", "gptq-w4g128-s1": "signal_degradation",
                "gptq-w4g128-s2": "signal_degradation", "rtn-w4g128": "signal_degradation",
                "gptq-w2g128": "computation_collapse", "rtn-w2g128": "computation_collapse"}
    for name, want in expected.items():
        got, _ = D.verdict(D.evidence_frame(data[name]), no_weights)
        assert got == want, (name, got)
    weights = json.loads((RESULTS / "weight_signatures.json").read_text())
    for name, row in weights.items():
        broken = any(s in name for s in ("awq-order", "zero-offset", "g-idx", "transposed"))
        flagged = (row["cosine"]["min"] < D.WEIGHT_COSINE or row["step_error"]["max"] > D.STEP_ERROR
                   or row["step_bias"]["max"] > D.STEP_BIAS)
        if name == "gptq-w2g128-g-idx":  # at 2 bits the groups' scales barely differ: harmless
            continue
        assert flagged == broken, name


def test_smollm2_format_faults_are_caught(smol, smol_gptq):
    for bits, v in smol_gptq.items():
        assert D.suspect_modules(weight_signatures(smol, v)).empty, v.name
    for fault in FAULTS:
        bad = D.suspect_modules(weight_signatures(smol, fault(smol_gptq[4])))
        assert len(bad), fault.__name__


def test_smollm2_verdicts(smol, smol_gptq, facts):
    # both widths on one shared sample: FP activations are measured once (diagnose_many)
    d4, d2 = D.diagnose_many(smol, [smol_gptq[4], smol_gptq[2]], facts)
    assert d4.verdict == "signal_degradation", d4
    assert d2.verdict == "computation_collapse", d2
