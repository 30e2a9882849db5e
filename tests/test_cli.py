"""The mechq CLI end to end on the tiny model (RTN variants: no GPTQ run)."""

import argparse
import re

import pandas as pd
import pytest

from mechq import cli


def _self_contained(path):
    html = path.read_text()
    assert "plotly" in html.lower()
    # plotly.js is inlined: no script is fetched from the network
    assert not re.search(r"<script[^>]+src=\"https?://", html)
    return html


def test_cliff_writes_table_and_figures(tmp_path, capsys):
    rc = cli.main(["cliff", "--model", "tiny-gpt2", "--method", "rtn", "--bits", "8", "2",
                   "--max-facts", "60", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "rtn-w8g128" in out and "rtn-w2g128" in out
    acc = pd.read_csv(tmp_path / "accuracy.csv")
    assert list(acc["variant"]) == ["fp", "rtn-w8g128", "rtn-w2g128"]
    assert (acc["n"] == 60).all()
    assert len(pd.read_csv(tmp_path / "recall.csv")) == 180
    _self_contained(tmp_path / "performance_cliff.html")
    _self_contained(tmp_path / "answer_rank.html")


def test_recall_and_lens_commands(tmp_path, capsys):
    args = ["--model", "tiny-gpt2", "--variants", "rtn-w4g128", "rtn-w2g32",
            "--max-facts", "40", "--out", str(tmp_path)]
    assert cli.main(["recall", *args]) == 0
    assert "subsets (reference rtn-w4g128)" in capsys.readouterr().out
    sizes = pd.read_csv(tmp_path / "subsets.csv")
    total = sizes[sizes.relation == "all"].iloc[0]
    assert total.robust + total.failure == total.fp_correct
    _self_contained(tmp_path / "top_predictions.html")
    assert cli.main(["lens", *args]) == 0
    lens = pd.read_csv(tmp_path / "lens.csv.gz")
    assert set(lens["layer"]) == set(range(5))  # embeddings + 4 blocks
    assert len(lens) == 3 * 40 * 5
    _self_contained(tmp_path / "logit_lens.html")


def test_variant_names_parse():
    assert cli.parse_variant("gptq-w4g128") == dict(method="gptq", bits=4, group_size=128,
                                                    sym=True, desc_act=False)
    assert cli.parse_variant("rtn-w2-asym") == dict(method="rtn", bits=2, group_size=128,
                                                    sym=False, desc_act=False)
    assert cli.parse_variant("gptq-w3g64-act")["desc_act"] is True
    with pytest.raises(argparse.ArgumentTypeError, match="METHOD-wBITS"):
        cli.parse_variant("awq-4bit")


def test_report_is_one_offline_file(tmp_path):
    rc = cli.main(["report", "--model", "tiny-gpt2", "--method", "rtn", "--bits", "4", "2",
                   "--max-facts", "40", "--out", str(tmp_path)])
    assert rc == 0
    html = _self_contained(tmp_path / "report.html")
    assert html.count("* plotly.js v") == 1  # the library is inlined once for all figures
    for heading in ("Performance cliff", "Answer rank", "Logit lens"):
        assert heading in html
    assert (tmp_path / "lens_summary.csv").exists()


def test_components_and_representation_commands(tmp_path, capsys):
    args = ["--model", "tiny-gpt2", "--variants", "rtn-w2g32", "--max-facts", "24",
            "--out", str(tmp_path)]
    assert cli.main(["components", *args]) == 0
    summ = pd.read_csv(tmp_path / "components_summary.csv")
    fp_cos = summ[(summ.variant == "fp") & (summ.metric == "value_cosine")]["mean"]
    assert (fp_cos - 1).abs().max() < 1e-5
    _self_contained(tmp_path / "components.html")
    assert cli.main(["representation", *args]) == 0
    cka = pd.read_csv(tmp_path / "cka.csv.gz")
    diag = cka[(cka.variant == "fp") & (cka.layer_fp == cka.layer_q)]["cka"]
    assert (diag - 1).abs().max() < 1e-4
    _self_contained(tmp_path / "representation.html")
