"""The repair table on the tiny model: its cells follow from the recall rows behind them."""

import pandas as pd
import pytest

import mechq
from mechq.reports import plots
from mechq.repair.amplify import dev_heldout
from mechq.repair.table import REPAIRS, SUBSETS, repair_summary, repair_table


@pytest.fixture(scope="module")
def result(tiny, facts):
    # RTN 2-bit g128: no calibration run, and the tiny model loses a few facts there
    return repair_table(tiny, [mechq.Request("rtn", 2)], facts, ranks=(8, 16),
                        progress=False)


def test_table_has_every_cell(result):
    t = result.table
    assert set(t["repair"]) == {"baseline", "protection", "protection+amplification",
                                "eora-r8", "eora-r16"}
    assert len(t) == 5 * len(SUBSETS)
    assert (t["n"] > 0).all()   # every subset of the held-out half is populated
    assert t["accuracy"].between(0, 1).all()
    base = t[t["repair"] == "baseline"].set_index("subset")["accuracy"]
    # by definition the base gets every Robust fact right and every Failure fact wrong
    assert base["Robust"] == 1.0
    assert base["Failure"] == 0.0


def test_cells_are_the_held_out_recall(tiny, facts, result):
    held = {f.id for f in dev_heldout(facts)[1]}
    rec = result.recall
    assert set(rec["fact_id"]) <= held
    for (repair, subset), row in result.table.set_index(["repair", "subset"]).iterrows():
        if subset == "all":
            d = rec[(rec["repair"] == repair)]
            assert row["n"] == len(held)
            assert row["accuracy"] == pytest.approx(d["correct"].mean(), abs=1e-12)


def test_bits_order_the_repairs(result):
    bits = result.table.drop_duplicates("repair").set_index("repair")["avg_bits"]
    assert bits["protection"] > bits["baseline"]   # 8-bit early layers cost bits
    assert bits["eora-r16"] > bits["eora-r8"] > bits["baseline"]   # fp16 low-rank factors
    assert bits["protection+amplification"] == bits["protection"]  # a read-out, not weights


def test_wide_summary_and_pareto(result):
    wide = result.wide()
    assert len(wide) == 1 and "baseline · Failure" in wide.columns
    assert "protection · bits" in wide.columns
    assert "% of Failure back" in repair_summary(result.table)
    fig = plots.repair_pareto(result.table)
    assert len(fig.data) == 1 and len(fig.data[0].x) == 5


def test_repair_table_bad_input(tiny, facts):
    with pytest.raises(ValueError, match="at least one fact"):
        repair_table(tiny, [mechq.Request("rtn", 2)], facts.filter(ids=[]), progress=False)
    with pytest.raises(ValueError, match="uniform"):
        repair_table(tiny, [mechq.Request("rtn", 2, dynamic={".*c_fc": {"bits": 8}})], facts,
                     progress=False)
    assert REPAIRS[0] == "baseline"


@pytest.mark.slow  # slow: the diagnose --repair and recipe commands end to end (about 17 s)
def test_diagnose_repair_and_recipe_commands(tmp_path, capsys):
    from mechq import cli

    rc = cli.main(["diagnose", "rtn-w2g128", "--model", "tiny-gpt2", "--n-facts", "16",
                   "--repair", "--out", str(tmp_path)])
    assert rc == 0
    rep = pd.read_csv(tmp_path / "repairs.csv")
    assert {"eora-r32", "eora-r64", "protection"} <= set(rep["repair"])
    assert "Repairs" in (tmp_path / "diagnose.html").read_text()
    assert "% of Failure back" in capsys.readouterr().out
    rc = cli.main(["recipe", "rtn-w2g128", "--model", "tiny-gpt2", "--budget", "3.7",
                   "--out", str(tmp_path / "r")])
    assert rc == 0
    from mechq.repair.alternatives import RULES
    from mechq.repair.recipe import read_recipe

    assert read_recipe(tmp_path / "r" / "recipe.json")["avg_bits"] <= 3.7
    cands = pd.read_csv(tmp_path / "r" / "candidates.csv")
    assert set(RULES) <= set(cands["rule"]) and (cands["avg_bits"] <= 3.7).all()
    sens = pd.read_csv(tmp_path / "r" / "sensitivity.csv")
    assert set(sens["bits"]) == {2, 3, 4, 8} and (sens["fisher_error"] >= 0).all()
    assert "Sensitivity map" in (tmp_path / "r" / "recipe.html").read_text()


def test_commands_refuse_bad_input(tmp_path, tiny):
    from mechq import cli

    with pytest.raises(SystemExit, match="below uniform 2 bits"):
        cli.main(["recipe", "rtn-w4g128", "--model", "tiny-gpt2", "--budget", "2.0",
                  "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="bad variant 'gptq-w4-foo'"):
        cli.main(["recipe", "gptq-w4-foo", "--model", "tiny-gpt2", "--budget", "4.3"])
    ckpt = mechq.quantize(tiny, "rtn", bits=4).meta["path"]
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        cli.main(["diagnose", str(ckpt), "--repair", "--model", "tiny-gpt2",
                  "--out", str(tmp_path)])
    # a checkpoint of another model (GPT-2 family) given to SmolLM2 (Llama family)
    with pytest.raises(SystemExit, match="(?i)architecture|another model"):
        cli.main(["diagnose", str(ckpt), "--model", "smollm2-135m", "--out", str(tmp_path)])
