"""The architecture contrast (mechq.architectures, `mechq compare-architectures`) end to end on
the tiny GPT-2 under two names, with a small GPTQ calibration: the frames, their depth axis, the
protections' budgets, the winner and the recommendations. (The SmolLM2 vs Gemma numbers come
from `mechq compare-architectures`, as the README says; too slow for the suite.)"""

from __future__ import annotations

import pandas as pd
import pytest

from mechq.architectures import (PROTECTIONS, protection_requests, protection_winner,
                                 recommendation)
from mechq.cli import main
from mechq.protect import estimated_bits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tiny, private_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("arch")
    # the same model twice: two "families" whose frames must then agree row for row
    assert main(["compare-architectures", "--models", "tiny-gpt2", str(_tiny_dir()),
                 "--out", str(out), "--bits", "4", "2", "--sweep-bits", "2",
                 "--protect-bits", "4", "--n-facts", "16", "--calib-samples", "8",
                 "--calib-len", "24"]) == 0
    return {k: pd.read_csv(out / f"architectures_{k}.csv")
            for k in ("cliff", "domino", "single", "components", "protection", "verdicts",
                      "contrast")}, out


def _tiny_dir():
    from mechq import models

    return models.resolve_hf_dir(models.TINY).hf_dir


def test_frames_cover_both_models(run):
    frames, out = run
    names = ["tiny-gpt2", str(_tiny_dir())]
    for key, f in frames.items():
        assert list(dict.fromkeys(f["model"])) == names, key
    assert (out / "architectures.html").stat().st_size > 10_000
    cliff = frames["cliff"]
    assert sorted(cliff.loc[cliff.model == "tiny-gpt2", "variant"]) == [
        "fp", "gptq-w2g128", "gptq-w4g128"]
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
