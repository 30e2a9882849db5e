"""Sensitivity analyses: first domino, single-layer and component sweeps, signal injection."""

import numpy as np
import pandas as pd
import pytest
import torch

import mechq
from mechq.analysis import sensitivity as sens
from mechq.quant.variants import swap
from mechq.analysis.recall import accuracy, evaluate_recall
from tests.conftest import assert_params_equal, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
COLS = ["fact_id", "correct", "target_prob", "target_rank"]



@pytest.fixture(scope="module")
def smol_w2(smol):
    return mechq.quantize(smol, "rtn", bits=2, group_size=128)


@pytest.fixture(scope="module")
def sub(facts):
    return facts.sample(24, seed=3)


@pytest.fixture(scope="module")
def ref(tiny, sub, tiny_w2):
    rec = evaluate_recall(tiny, sub, [tiny_w2], progress=False)
    return {v: g.set_index("fact_id") for v, g in rec.groupby("variant")}


def _same(df, ref_rows):
    """Rows of a sweep step against a plain evaluate_recall with the same weights. Both run the
    same batches (one batch of all facts) through the same kernels, and swaps are bit-exact, so
    the numbers are bit-equal on any CPU (measured 0 everywhere): exact correct/rank are safe
    and the 1e-5 on probabilities is only slack."""
    df = df.set_index("fact_id").loc[ref_rows.index]
    assert (df["correct"] == ref_rows["correct"]).all()
    assert np.abs(df["target_prob"] - ref_rows["target_prob"]).max() < 1e-5
    assert (df["target_rank"] == ref_rows["target_rank"]).all()


def test_first_domino_ends(tiny, sub, tiny_w2, ref):
    snap = snapshot(tiny)
    L = tiny.cfg.n_layers
    df = sens.first_domino(tiny, sub, tiny_w2, ks=[-1, 1, L - 1], progress=False)
    assert_params_equal(tiny, snap)
    assert sorted(df["k"].unique()) == [-1, 1, L - 1]
    assert len(df) == 3 * len(sub)
    _same(df[df.k == -1], ref["fp"])
    _same(df[df.k == L - 1], ref[tiny_w2.name])
    acc = accuracy(df, by=["k"])
    assert list(acc["k"]) == [-1, 1, L - 1]
    # k = 1 is exactly layers 0 and 1 quantized
    with swap(tiny, tiny_w2, layers=[0, 1]):
        mid = evaluate_recall(tiny, sub, include_fp=True, progress=False)
    _same(df[df.k == 1], mid.set_index("fact_id"))


def test_first_domino_swaps_one_layer_per_step(tiny, sub, tiny_w2, monkeypatch):
    calls = []
    real = sens.swap

    def counting(model, variant, layers=None, components="all"):
        calls.append(layers)
        return real(model, variant, layers=layers, components=components)

    monkeypatch.setattr(sens, "swap", counting)
    sens.first_domino(tiny, sub, tiny_w2, progress=False)
    assert calls == list(range(tiny.cfg.n_layers))


def _changed_params(model, variant, **kw):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with swap(model, variant, **kw):
        return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_single_layer_sweep(tiny, sub, tiny_w2, ref):
    snap = snapshot(tiny)
    df = sens.single_layer_sweep(tiny, sub, tiny_w2, progress=False)
    assert_params_equal(tiny, snap)
    assert sorted(df["layer"].unique()) == list(range(tiny.cfg.n_layers))
    for l in (0, tiny.cfg.n_layers - 1):
        changed = _changed_params(tiny, tiny_w2, layers=l)
        assert changed and all(n.startswith(f"blocks.{l}.") for n in changed)
        with swap(tiny, tiny_w2, layers=l):
            r = evaluate_recall(tiny, sub, progress=False).set_index("fact_id")
        _same(df[df.layer == l], r)
    # some single layer differs from FP (else the test says nothing): measured 0.16 (layer 0)
    fp = ref["fp"]["target_prob"]
    diffs = [np.abs(g.set_index("fact_id")["target_prob"].loc[fp.index] - fp).max()
             for _, g in df.groupby("layer")]
    assert max(diffs) > 1e-4


def test_component_sensitivity(tiny, sub, tiny_w2, ref):
    df = sens.component_sensitivity(tiny, sub, tiny_w2, progress=False)
    assert list(df["setting"].unique()) == list(sens.COMPONENT_SETTINGS)
    _same(df[df.setting == "All"], ref[tiny_w2.name])
    attn = _changed_params(tiny, tiny_w2, components=sens.COMPONENT_SETTINGS["Attn"])
    mlp = _changed_params(tiny, tiny_w2, components=sens.COMPONENT_SETTINGS["MLP"])
    gu = _changed_params(tiny, tiny_w2, components=sens.COMPONENT_SETTINGS["MLP gate+up"])
    assert attn and all(".attn.W_" in n for n in attn)
    assert {n.split(".")[-1] for n in attn} == {"W_Q", "W_K", "W_V", "W_O"}
    assert {n.split(".")[-1] for n in mlp} == {"W_in", "W_out"}  # GPT-2: no gate
    assert {n.split(".")[-1] for n in gu} == {"W_in"}
    assert not attn & mlp


def test_component_names_on_gated_model(smol, smol_w2):
    v = smol_w2
    gu = _changed_params(smol, v, layers=0, components=sens.COMPONENT_SETTINGS["MLP gate+up"])
    qk = _changed_params(smol, v, layers=0, components=sens.COMPONENT_SETTINGS["Q+K"])
    assert {n.split(".")[-1] for n in gu} == {"W_gate", "W_in"}
    assert {n.split(".")[-1].lstrip("_") for n in qk} == {"W_Q", "W_K"}


def test_signal_injection(tiny, sub, tiny_w2, ref):
    L = tiny.cfg.n_layers
    snap = snapshot(tiny)
    df = sens.signal_injection(tiny, sub, None, tiny_w2, ks=[0, 2, L], progress=False)
    assert_params_equal(tiny, snap)
    assert len(df) == 3 * L * 3
    full = df[df.k == L]
    # k = L is FP: its activations are bit-equal to the reference run's, so only cos(x, x)'s own
    # float32 rounding remains (measured exactly 1; <= d·eps = 1.5e-5 in the worst case, which
    # the default rtol 1e-5 adds to atol 1e-5)
    assert np.allclose(full["cos_mean"], 1, atol=1e-5)
    rec = df.attrs["recall"]
    _same(rec[rec.k == L], ref["fp"])
    _same(rec[rec.k == 0], ref[tiny_w2.name])
    low = df[df.k == 0]
    assert low["cos_mean"].min() < 0.999  # all layers at 2 bits: measured 0.886
    # same forward as the reference (bit-equal), a float64 mean of the same booleans
    assert low["accuracy"].iloc[0] == pytest.approx(ref[tiny_w2.name]["correct"].mean())
    # k = 2: FP layers 0, 1 are exact (bit-equal activations: cosine 1 up to its own rounding,
    # as above), later layers are not (measured min 0.952)
    mid = df[df.k == 2]
    assert np.allclose(mid[mid.layer < 2]["cos_mean"], 1, atol=1e-5)
    assert mid[mid.layer >= 2]["cos_mean"].min() < 0.999


def test_resumable_first_domino(tiny, sub, tiny_w2, tmp_path, monkeypatch):
    path = tmp_path / "domino.csv"
    full = sens.first_domino(tiny, sub, tiny_w2, out_path=path, progress=False)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + tiny.cfg.n_layers * len(sub)
    path.write_text("\n".join(lines[: 1 + len(sub)]) + "\n")  # keep only step k = 0
    calls = []
    real = sens._evaluate
    monkeypatch.setattr(sens, "_evaluate", lambda m, p: calls.append(1) or real(m, p))
    again = sens.first_domino(tiny, sub, tiny_w2, out_path=path, progress=False)
    assert len(calls) == tiny.cfg.n_layers - 1
    # rows read back from CSV (repr of float64: exact) or recomputed by the same ops: measured
    # equal; assert_frame_equal's default rtol=1e-5 is only slack
    pd.testing.assert_frame_equal(again[full.columns], full, check_dtype=False)
    calls.clear()
    before = path.read_bytes()
    third = sens.first_domino(tiny, sub, tiny_w2, out_path=path, progress=False)
    assert calls == [] and path.read_bytes() == before  # every k done: nothing appended
    pd.testing.assert_frame_equal(third[full.columns], full, check_dtype=False)


def test_resumable_single_layer(tiny, sub, tiny_w2, tmp_path):
    path = tmp_path / "single.csv"
    a = sens.single_layer_sweep(tiny, sub, tiny_w2, layers=[0, 1], out_path=path, progress=False)
    b = sens.single_layer_sweep(tiny, sub, tiny_w2, out_path=path, progress=False)
    c = sens.single_layer_sweep(tiny, sub, tiny_w2, progress=False)
    # CSV round trip of float64 and the same ops again: exact (default rtol 1e-5 is slack)
    pd.testing.assert_frame_equal(b[c.columns], c, check_dtype=False)
    pd.testing.assert_frame_equal(b[b.layer <= 1].reset_index(drop=True)[a.columns], a,
                                  check_dtype=False)


def test_smol_first_domino_and_injection(smol, smol_w2, facts):
    sub = facts.sample(8, seed=0)
    v = smol_w2
    L = smol.cfg.n_layers
    df = sens.first_domino(smol, sub, v, ks=[-1, L - 1], progress=False)
    rec = evaluate_recall(smol, sub, [v], progress=False)
    _same(df[df.k == -1], rec[rec.variant == "fp"].set_index("fact_id"))
    _same(df[df.k == L - 1], rec[rec.variant == v.name].set_index("fact_id"))
    inj = sens.signal_injection(smol, sub, None, v, ks=[L], progress=False)
    # k = L is FP, bit-equal to the reference run: cos(x, x) in float32 over d = 576 is 1 within
    # d·eps = 7e-5 at worst (measured 1.2e-7)
    assert np.allclose(inj["cos_mean"], 1, atol=1e-4)


def test_plots(tiny, sub, tiny_w2):
    from mechq.reports import plots

    df = sens.first_domino(tiny, sub, tiny_w2, ks=[-1, 0, 3], progress=False)
    fig = plots.first_domino_curve(accuracy(df, by=["k"]))
    assert list(fig.data[0].x) == [-1, 0, 3]
    inj = sens.signal_injection(tiny, sub, None, tiny_w2, ks=[0, 4], progress=False)
    fig = plots.injection_curves(inj)
    assert len(fig.data) == 2 * 3
    # the last trace is k = 4 = L (FP): cos(x, x), 1 up to float32 rounding (measured exact)
    assert np.allclose(fig.data[-1].y, 1, atol=1e-5)


def test_sweep_file_shared_by_variants_and_fact_sets(tiny, sub, tiny_w2, tmp_path):
    """One CSV may hold several variants and fact sets: each run sees only its own rows."""
    path = tmp_path / "domino.csv"
    w4 = mechq.quantize(tiny, "rtn", bits=4, group_size=128)
    a = sens.first_domino(tiny, sub, tiny_w2, ks=[0, 1], out_path=path, progress=False)
    b = sens.first_domino(tiny, sub, w4, ks=[0, 1], out_path=path, progress=False)
    assert set(b["variant"]) == {w4.name} and len(b) == 2 * len(sub)
    fresh = sens.first_domino(tiny, sub, w4, ks=[0, 1], progress=False)
    # same ops, same batches: exact; the default rtol is slack (also below)
    pd.testing.assert_frame_equal(b[fresh.columns], fresh, check_dtype=False)
    more = sub.facts + [f for f in mechq.bundled_facts() if f.id not in {g.id for g in sub}][:4]
    c = sens.first_domino(tiny, mechq.FactSet(more), tiny_w2, ks=[0, 1], out_path=path,
                          progress=False)  # the 4 new facts make both steps incomplete
    assert len(c) == 2 * len(more) and set(c["variant"]) == {tiny_w2.name}
    pd.testing.assert_frame_equal(
        c[c.fact_id.isin(a.fact_id)].reset_index(drop=True)[a.columns], a, check_dtype=False)
    with pytest.raises(ValueError, match="csv"):
        sens.first_domino(tiny, sub, w4, out_path=tmp_path / "x.parquet", progress=False)


def test_resumable_components_and_injection(tiny, sub, tiny_w2, tmp_path, monkeypatch):
    L = tiny.cfg.n_layers
    comp_path, inj_path = tmp_path / "comp.csv", tmp_path / "inj.csv"
    comp = sens.component_sensitivity(tiny, sub, tiny_w2, out_path=comp_path, progress=False)
    inj = sens.signal_injection(tiny, sub, None, tiny_w2, ks=[0, 2, L], out_path=inj_path,
                                progress=False)
    assert len(inj.attrs["recall"]) == 3 * len(sub)
    assert {f"cos_resid_post_{L - 1}", "cos_mlp_out_0"} <= set(inj.attrs["recall"].columns)
    for path in (comp_path, inj_path):  # as if interrupted after the first step
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines[: 1 + len(sub)]) + "\n")
    calls = []
    real_eval, real_acts = sens._evaluate, sens._last_acts
    monkeypatch.setattr(sens, "_evaluate", lambda m, p: calls.append("e") or real_eval(m, p))
    monkeypatch.setattr(sens, "_last_acts", lambda m, p: calls.append("a") or real_acts(m, p))
    comp2 = sens.component_sensitivity(tiny, sub, tiny_w2, out_path=comp_path, progress=False)
    inj2 = sens.signal_injection(tiny, sub, None, tiny_w2, ks=[0, 2, L], out_path=inj_path,
                                 progress=False)
    # 7 component settings left; injection: the FP reference run and ks 2 and L
    assert calls.count("e") == len(sens.COMPONENT_SETTINGS) - 1 and calls.count("a") == 3
    pd.testing.assert_frame_equal(comp2[comp.columns], comp, check_dtype=False)  # exact, as above
    # cos_mean: the fresh run averages float32 cosines, the resumed one float64 ones read from
    # the CSV; float32 summation of <= 24 terms <= 1 is off by <= 23·6e-8 = 1.4e-6 at worst
    # (measured 8.7e-8), inside atol 1e-6 + rtol 1e-5·|cos|.
    pd.testing.assert_frame_equal(inj2, inj, check_dtype=False, check_exact=False, atol=1e-6)
    calls.clear()
    sens.signal_injection(tiny, sub, None, tiny_w2, ks=[0, L], out_path=inj_path,
                          progress=False)
    assert calls == []  # everything on disk: not even the FP reference run
    with pytest.raises(ValueError, match="not written by this analysis"):
        sens.signal_injection(tiny, sub, None, tiny_w2, ks=[0], out_path=comp_path,
                              progress=False)
