"""mechq.reports.attention: the patterns are TransformerLens's, the page carries circuitsvis once."""

import re

import pytest
import torch

from mechq.reports.attention import attention_patterns, attention_view, circuitsvis_script
from mechq.reports.html import Report
from mechq.quant.variants import swap
from mechq.vocab import FP, hook_name
from tests.conftest import assert_params_equal, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The capital of France is"
BUNDLE_MARK = "var CircuitsVis="  # the bundle's first statement: once per page


def test_patterns_are_causal_softmaxes_and_match_a_plain_cache(tiny, tiny_w2):
    snap = snapshot(tiny)
    pats = attention_patterns(tiny, PROMPT, [None, tiny_w2], layer=1)
    assert_params_equal(tiny, snap)  # the swap restored every weight
    n = len(pats.tokens)
    assert pats.pattern.shape == (2, tiny.cfg.n_heads, n, n)
    assert pats.variants == [FP, tiny_w2.name]
    # a float32 softmax over ≤ 8 keys sums to 1 within a few ulp of 1.0 (1.2e-7 each)
    assert torch.allclose(pats.pattern.sum(-1), torch.ones(2, tiny.cfg.n_heads, n), atol=1e-5)
    # masked keys get exp(-inf) = 0 exactly
    assert torch.equal(torch.triu(pats.pattern, diagonal=1), torch.zeros_like(pats.pattern))
    name = hook_name("pattern", 1)
    toks = tiny.to_tokens(PROMPT, prepend_bos=tiny.cfg.default_prepend_bos)
    _, fp = tiny.run_with_cache(toks, names_filter=name)
    with swap(tiny, tiny_w2):
        _, q = tiny.run_with_cache(toks, names_filter=name)
    # the same forward on the same weights: identical, not merely close
    assert torch.equal(pats.pattern[0], fp[name][0])
    assert torch.equal(pats.pattern[1], q[name][0])
    # 2-bit RTN moves the tiny model's attention visibly (measured max |Δ| ≈ 0.1–0.5)
    assert (pats.pattern[1] - pats.pattern[0]).abs().max() > 0.01


def test_view_inlines_the_bundle_once_and_fetches_nothing(tiny, tiny_w2):
    view = attention_view(tiny, PROMPT, [None, tiny_w2])
    page = view.html()
    assert page.count(BUNDLE_MARK) == 1
    assert page.count("CircuitsVis.render(") == 2  # one panel per variant
    assert not re.search(r"<script[^>]*\bsrc=", page)  # nothing loaded from anywhere
    assert "unpkg.com" not in page
    frags = view.fragments()
    assert len(frags) == 2 and all(BUNDLE_MARK not in f for f in frags)
    assert len(page) - sum(map(len, frags)) > 1_000_000  # the ≈1.3 MB bundle is the rest
    assert view.html(include_script=False).count(BUNDLE_MARK) == 0
    assert view._repr_html_() .count(BUNDLE_MARK) == 1
    # every panel's div is closed, and its script runs in page order after the bundle
    for f in frags:
        div = re.search(r'<div id="(circuits-vis-[^"]+)"[^>]*></div>', f)
        assert div and f'"{div.group(1)}"' in f.split("<script>", 1)[1]
    assert circuitsvis_script().startswith("<script>") and "</script>" not in \
        circuitsvis_script()[len("<script>"):-len("</script>")]


def test_report_carries_the_bundle_once_for_many_views(tiny, tiny_w2, tmp_path):
    rep = Report("t")
    for layer in (0, 1):
        rep.attention(attention_view(tiny, PROMPT, [None, tiny_w2], layer=layer))
    html = rep.write(tmp_path / "r.html").read_text()
    assert html.count(BUNDLE_MARK) == 1
    assert html.count("CircuitsVis.render(") == 4
    assert html.index(BUNDLE_MARK) < html.index("CircuitsVis.render(")


def test_default_layer_is_the_middle_one(tiny):
    assert attention_patterns(tiny, PROMPT, [None]).layer == tiny.cfg.n_layers // 2


@pytest.mark.parametrize("kw, match", [
    (dict(layer=99), "layer must be an int in 0..3"),
    (dict(layer=-1), "layer must be an int"),
    (dict(variants=[]), "at least one variant"),
    (dict(prompt=""), "non-empty prompt"),
])
def test_bad_input(tiny, kw, match):
    args = dict(prompt=PROMPT, variants=[None]) | kw
    with pytest.raises(ValueError, match=match):
        attention_patterns(tiny, **args)
