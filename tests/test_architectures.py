"""The architecture contrast (mechq.reports.architectures, `mechq compare-architectures`) end to end on
the tiny GPT-2 under two names, with RTN (GPTQ would add eight GPTQModel child processes: the
fixture took 175 s with GPTQ and 11 s with RTN here, for a path that differs only in the Request's method; GPTQ with `dynamic` rules is
tested in test_dynamic and test_recipe): the frames, their depth axis, the protections'
budgets, the winner and the recommendations. (The SmolLM2 vs Gemma numbers come from `mechq
compare-architectures`, as the README says; too slow for the suite.)"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mechq.reports.architectures import (PROTECTIONS, Comparison, check_settings, compare_one,
                                 contrast_table, protection_requests, protection_winner,
                                 recommendation)
from mechq.cli import main
from mechq.repair.protect import estimated_bits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tiny, private_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("arch")
    # the same model twice: two "families" whose frames must then agree row for row
    assert main(["compare-architectures", "--models", "tiny-gpt2", str(_tiny_dir()),
                 "--out", str(out), "--bits", "4", "2", "--sweep-bits", "2",
                 "--protect-bits", "4", "--n-facts", "16", "--method", "rtn"]) == 0
    return {k: pd.read_csv(out / f"architectures_{k}.csv")
            for k in ("cliff", "domino", "single", "components", "protection", "verdicts",
                      "contrast")}, out


def _tiny_dir():
    from mechq.models import load as models

    return models.resolve_hf_dir(models.TINY).hf_dir


def test_frames_cover_both_models(run):
    frames, out = run
    names = ["tiny-gpt2", str(_tiny_dir())]
    for key, f in frames.items():
        assert list(dict.fromkeys(f["model"])) == names, key
    assert (out / "architectures.html").stat().st_size > 10_000
    record = json.loads((out / "architectures_run.json").read_text())
    assert record["command"] == "mechq compare-architectures"
    assert record["settings"]["n_facts"] == 16 and "GFLOP/s" in record["machine"]
    cliff = frames["cliff"]
    assert sorted(cliff.loc[cliff.model == "tiny-gpt2", "variant"]) == [
        "fp", "rtn-w2g128", "rtn-w4g128"]
    a, b = (frames["cliff"][frames["cliff"].model == n].reset_index(drop=True) for n in names)
    assert a.drop(columns="model").equals(b.drop(columns="model"))  # same model: same numbers


def test_depth_axis(run, tiny):
    dom = run[0]["domino"]
    L = tiny.cfg.n_layers
    one = dom[dom.model == "tiny-gpt2"].sort_values("k")
    assert one["k"].tolist() == list(range(-1, L))
    assert one["depth"].tolist() == [(k + 1) / L for k in range(-1, L)]
    # k = -1 is the FP model on facts chosen because FP gets them right
    assert one["accuracy"].iloc[0] == 1.0
    single = run[0]["single"]
    assert sorted(single.loc[single.model == "tiny-gpt2", "layer"]) == list(range(L))


def test_protections_share_a_budget(run, tiny):
    prot = run[0]["protection"]
    one = prot[prot.model == "tiny-gpt2"].set_index("protection")
    assert list(one.index) == list(PROTECTIONS)
    base, early, kurt = (one.loc[k, "avg_bits"] for k in PROTECTIONS)
    # kurtosis fills at most the early-layer rule's budget (estimated exactly as avg_bits
    # measures), and protects something
    assert base < kurt <= early + 1e-9
    reqs = protection_requests(tiny, 4)
    assert reqs["kurtosis"].dynamic and reqs["early-layers"].dynamic
    assert estimated_bits(tiny, 4, 128) == pytest.approx(base, abs=1e-9)


def test_winner_and_recommendations(run):
    frames = run[0]
    prot = frames["protection"][frames["protection"].model == "tiny-gpt2"]
    winner = protection_winner(prot)
    right = prot.set_index("protection")["fp_known_correct"]
    if winner is not None:  # it beats both the other protection and the baseline
        assert all(right[winner] > right[k] for k in PROTECTIONS if k != winner)
    contrast = frames["contrast"].set_index("model")
    assert contrast.loc["tiny-gpt2", "protection winner"] == (winner or "neither")
    for _, r in frames["verdicts"].iterrows():
        assert r["recommendation"] == recommendation(r["verdict"], winner)


def test_protection_winner_needs_to_beat_the_baseline():
    def frame(base, early, kurt):
        return pd.DataFrame(dict(protection=list(PROTECTIONS), fp_known_correct=[base, early,
                                                                                 kurt]))

    assert protection_winner(frame(9, 33, 40)) == "kurtosis"
    assert protection_winner(frame(9, 40, 33)) == "early-layers"
    assert protection_winner(frame(31, 19, 27)) is None   # the baseline beats both
    assert protection_winner(frame(9, 33, 33)) is None    # a tie


def test_recommendation_follows_the_verdict():
    assert recommendation("healthy", "kurtosis") == "none needed"
    assert "first 2 layers" in recommendation("signal_degradation", "early-layers")
    assert "kurtosis" in recommendation("signal_degradation", "kurtosis")
    assert "neither protection beat" in recommendation("signal_degradation", None)
    assert recommendation("computation_collapse", "kurtosis").startswith("no training-free")
    assert "reader" in recommendation("format_bug", None)


def test_saved_comparison_reads_back(run):
    frames, out = run
    c = Comparison.load(out)
    for key, frame in c.frames().items():
        pd.testing.assert_frame_equal(frame, frames[key])
    # the winners come back from the protection frame; the contrast table is rebuilt from them
    table = contrast_table(c)
    assert table["protection winner"].tolist() == frames["contrast"]["protection winner"].tolist()
    (out / "architectures_single.csv").rename(out / "single.csv")
    try:
        with pytest.raises(FileNotFoundError, match="architectures_{single}"):
            Comparison.load(out)
    finally:
        (out / "single.csv").rename(out / "architectures_single.csv")


def test_settings_are_checked_before_any_work():
    check_settings((4, 3, 2), 2, 3)
    with pytest.raises(ValueError, match="among the cliff's bits"):
        check_settings((4, 2), 2, 3)
    with pytest.raises(ValueError, match="below the 8 bits"):
        check_settings((8, 2), 2, 8)
    with pytest.raises(ValueError, match="gptq or rtn"):
        check_settings((4, 3, 2), 2, 3, method="awq")
    with pytest.raises(ValueError, match="RTN takes no calibration"):
        compare_one("tiny", None, bits=(4, 3, 2), method="rtn", n_samples=8)
    with pytest.raises(SystemExit, match="among the cliff's bits") as e:
        main(["compare-architectures", "--models", "no-such-model", "--bits", "4", "2",
              "--protect-bits", "3"])  # refused before the (unknown) model is looked for
    assert "compare-architectures" in str(e.value)


@pytest.mark.slow  # slow: the whole report pipeline, twice (about 13 s)
def test_report_section_with_rtn(tiny, tmp_path):
    """`mechq report --compare-with`: the same contrast as a section of the main report; here
    RTN (no calibration) on the tiny model and itself under a second name."""
    import mechq

    with pytest.raises(ValueError, match="own model"):
        mechq.report(tiny, max_facts=8, out=tmp_path, method="rtn", bits=(3, 2),
                     compare_with={"tiny-gpt2": tiny}, progress=False)
    res = mechq.report("tiny-gpt2", max_facts=40, out=tmp_path, method="rtn", bits=(4, 3, 2),
                       compare_with={"again": tiny}, progress=False, echo=lambda s: None)
    contrast = res.frames["architectures_contrast"]
    assert contrast["model"].tolist() == ["tiny-gpt2", "again"]
    assert contrast.drop(columns="model").iloc[0].equals(contrast.drop(columns="model").iloc[1])
    html = (tmp_path / "report.html").read_text()
    assert html.index("Logit lens") < html.index("The architecture contrast, measured")
    assert "RTN g128 (no calibration)" in html
    c = Comparison.load(tmp_path)
    assert set(c.cliff["variant"]) == {"fp", "rtn-w4g128", "rtn-w3g128", "rtn-w2g128"}
    # the section's cliff is the report's own cliff, measured again on the same facts
    acc = pd.read_csv(tmp_path / "accuracy.csv").set_index("variant")["accuracy"]
    mine = c.cliff[c.cliff.model == "tiny-gpt2"].set_index("variant")["accuracy"]
    assert mine.to_dict() == pytest.approx(acc.to_dict(), abs=1e-12)  # same floats
