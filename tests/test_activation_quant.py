"""Activation and KV-cache schemes as hooks: the fake quantizer against float64 arithmetic, the
emulation at norm sites, subsets through swap, composition with weight variants, calibration,
the bit-exact restore, and the analyses that take an activation variant unchanged."""

import pytest
import torch

import mechq
from mechq.quant import activation_quant as aq
from mechq.quant.variants import calibrated, swap, with_activations
from tests.conftest import assert_params_equal, snapshot

PROMPT = "The capital of France is Paris. The capital of Italy is"


def _reference_int(x, bits, axes, sym=True):
    """Independent float64 fake quantization (the definitions in activation_quant's docstring)."""
    x = x.double()
    if sym:
        qmax = 2 ** (bits - 1) - 1
        s = x.abs().amax(dim=axes, keepdim=True) / qmax
        return (torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s)
    lo = x.amin(dim=axes, keepdim=True).clamp(max=0)
    hi = x.amax(dim=axes, keepdim=True).clamp(min=0)
    s = (hi - lo) / (2 ** bits - 1)
    z = torch.round(-lo / s)
    return (torch.clamp(torch.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


@pytest.mark.parametrize("bits,gran,sym,axes", [(8, "token", True, (2,)), (4, "token", False, (2,)),
                                                 (8, "head", True, (3,)), (4, "head", False, (3,))])
def test_int_fake_quant_matches_float64(bits, gran, sym, axes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 16, generator=g) * 3
    if axes == (2,):
        x = x.flatten(2)
    got = aq.fake_quant(x, aq.Quantizer("int", bits, gran, sym=sym))
    want = _reference_int(x, bits, axes, sym)
    # float32 scale and product against float64: a few ulps of a value up to ~12 in magnitude
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-5)
    levels = torch.unique(torch.round((got[0, 0] if gran == "token" else got[0, 0, 0]) * 1e4))
    assert len(levels) <= 2 ** bits  # at most 2^b distinct values per scale group


def test_fp8_fake_quant_lands_on_e4m3_values_and_static_scales_clip():
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1)) * 50
    q = aq.Quantizer("fp8", 8, "token")
    y = aq.fake_quant(x, q)
    s = aq.scale_of(x, q)
    codes = y / s
    # every code is an e4m3 value (the cast is idempotent on them), the largest one is 448;
    # y / s re-divides a float32 product, so codes are e4m3 values up to a float32 ulp
    assert torch.allclose(codes.to(torch.float8_e4m3fn).float(), codes, rtol=1e-6, atol=0)
    assert torch.allclose(codes.abs().amax(-1), torch.full((3, 7), aq.FP8_MAX), rtol=1e-6)
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 away from the subnormals
    big = x.abs() > s * 2 ** -6
    assert ((y - x).abs()[big] <= x.abs()[big] * 2 ** -4 + 1e-6).all()
    # a static scale clips what exceeds it
    st = aq.Quantizer("fp8", 8, "tensor", dynamic=False)
    clipped = aq.fake_quant(torch.tensor([1000.0, -1000.0, 1.0]), st, 1.0)
    assert clipped.tolist() == [448.0, -448.0, 1.0]


def test_bad_schemes_raise_named_errors():
    with pytest.raises(aq.SchemeError, match="Unknown activation scheme"):
        aq.scheme("A3-foo")
    with pytest.raises(aq.SchemeError, match="8-bit"):
        aq.Quantizer("fp8", 4)
    with pytest.raises(aq.SchemeError, match="static"):
        aq.Quantizer("int", 8, "tensor", dynamic=True)
    with pytest.raises(aq.SchemeError, match="2–8 bits"):
        aq.Quantizer("int", 16)
    with pytest.raises(aq.SchemeError, match="at most one"):
        aq.scheme("A8-int-token", "A4-int-token")
    with pytest.raises(aq.SchemeError, match="quantizes nothing"):
        aq.ActScheme("none")
    with pytest.raises(aq.SchemeError, match="Unknown activation sites"):
        aq.scheme("A8-int-token").only("resid")


def _hooks(model):
    return sum(len(h.fwd_hooks) for h in model.hook_dict.values())


def test_scheme_applies_and_restores_bit_exactly(tiny, tiny_w2):
    toks = tiny.to_tokens(PROMPT)
    snap = snapshot(tiny)
    fp = tiny(toks)
    v = with_activations(tiny_w2, aq.scheme("A4-int-token", "KV4-int-head"))
    assert v.name == f"{tiny_w2.name}+A4-int-token+KV4-int-head" and v.modules is tiny_w2.modules
    with swap(tiny, v):
        assert _hooks(tiny) == tiny.cfg.n_layers * 6
        both = tiny(toks)
    with swap(tiny, tiny_w2):
        assert _hooks(tiny) == 0
        weights = tiny(toks)
    assert not torch.equal(both, weights) and not torch.equal(both, fp)
    with pytest.raises(RuntimeError, match="boom"):
        with swap(tiny, v):
            raise RuntimeError("boom")
    assert _hooks(tiny) == 0
    assert_params_equal(tiny, snap)
    assert torch.equal(tiny(toks), fp)


def test_user_hooks_survive_and_scheme_hooks_run_first(tiny):
    """A hook the user added before the swap stays after it, and sees the quantized tensor."""
    toks = tiny.to_tokens(PROMPT)
    seen = []
    tiny.add_hook("blocks.0.attn.hook_z", lambda z, hook: seen.append(z.clone()))
    try:
        v = with_activations(None, aq.scheme("A4-int-token"), tiny)
        with swap(tiny, v, layers=0, components="o"):
            tiny(toks)
        tiny(toks)
        assert len(tiny.hook_dict["blocks.0.attn.hook_z"].fwd_hooks) == 1
    finally:
        tiny.reset_hooks()
    quantized, plain = seen
    want = aq.fake_quant(plain, aq.Quantizer("int", 4, "token"))
    assert torch.equal(quantized, want)


def test_subsets_touch_only_the_chosen_sites(tiny):
    toks = tiny.to_tokens(PROMPT)
    _, fp = tiny.run_with_cache(toks)
    v = with_activations(None, aq.scheme("A4-int-token"), tiny)
    with swap(tiny, v, layers=[1], components=["down"]):
        hooked = [n for n, h in tiny.hook_dict.items() if h.fwd_hooks]
        _, got = tiny.run_with_cache(toks)
    assert hooked == ["blocks.1.mlp.hook_post"]
    assert torch.equal(got["blocks.1.hook_resid_mid"], fp["blocks.1.hook_resid_mid"])
    assert not torch.equal(got["blocks.1.hook_resid_post"], fp["blocks.1.hook_resid_post"])
    # q alone quantizes the shared q/k/v input; k also quantizes the key cache
    with swap(tiny, v, layers=[0], components=["q"]):
        assert [n for n, h in tiny.hook_dict.items() if h.fwd_hooks] == ["blocks.0.ln1.hook_normalized"]
    kv = with_activations(None, aq.scheme("KV8-int-token"), tiny)
    with swap(tiny, kv, layers=[0], components="attn"):
        assert [n for n, h in tiny.hook_dict.items() if h.fwd_hooks] == [
            "blocks.0.attn.hook_k", "blocks.0.attn.hook_v"]
    only = aq.scheme("A4-int-token").only("o_in")
    with swap(tiny, with_activations(None, only, tiny)):
        assert {n.split(".", 2)[2] for n, h in tiny.hook_dict.items() if h.fwd_hooks} == {
            "attn.hook_z"}


def test_norm_site_quantizes_the_linear_input(tiny):
    """At a norm site the linear layer receives Q(x·w + b), not the norm's pre-weight tensor."""
    toks = tiny.to_tokens(PROMPT)
    q = aq.Quantizer("int", 4, "token")
    outs = {}
    handle = tiny.blocks[0].ln1.register_forward_hook(lambda m, i, o: outs.setdefault("x", o))
    try:
        tiny(toks)
        plain = outs.pop("x")
        with swap(tiny, with_activations(None, aq.scheme("A4-int-token"), tiny), layers=0,
                  components="q"):
            tiny(toks)
        got = outs.pop("x")
    finally:
        handle.remove()
    want = aq.fake_quant(plain, q)
    # (Q(u) - b) / w, then · w + b: one float32 rounding each way on values of magnitude ~10
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)


def test_static_scheme_needs_calibration_and_calibrates_to_the_maximum(tiny, tiny_w2):
    toks = tiny.to_tokens(PROMPT)
    v = with_activations(tiny_w2, aq.scheme("A8-int-tensor"))
    with pytest.raises(aq.SchemeError, match="calibrate"):
        with swap(tiny, v):
            pass
    seqs = [toks[0].tolist()]
    cal = calibrated(tiny, v, seqs)
    with swap(tiny, tiny_w2):
        _, cache = tiny.run_with_cache(toks)
    ln = tiny.blocks[1].ln2
    u = cache["blocks.1.ln2.hook_normalized"] * ln.w + ln.b
    assert cal.act.scales[("mlp_in", 1)] == pytest.approx(float(u.abs().max()) / 127, rel=1e-6)
    assert cal.act.scales[("down_in", 0)] == pytest.approx(
        float(cache["blocks.0.mlp.hook_post"].abs().max()) / 127, rel=1e-6)
    assert len(cal.act.scales) == 4 * tiny.cfg.n_layers and not v.act.scales
    with swap(tiny, cal):
        tiny(toks)


def test_patching_fp_activations_undoes_that_sites_quantization(tiny):
    """Analyses' hooks run after the scheme's: patching FP's hook_z everywhere into an
    O-input-quantized run gives FP's logits back exactly."""
    toks = tiny.to_tokens(PROMPT)
    fp, cache = tiny.run_with_cache(toks)
    v = with_activations(None, aq.scheme("A4-int-token").only("o_in"), tiny)
    patch = [(f"blocks.{l}.attn.hook_z", lambda z, hook: cache[hook.name])
             for l in range(tiny.cfg.n_layers)]
    with swap(tiny, v):
        broken = tiny(toks)
        fixed = tiny.run_with_hooks(toks, fwd_hooks=patch)
    assert not torch.equal(broken, fp)
    assert torch.equal(fixed, fp)


def test_rotary_gqa_model_quantizes_rotated_keys_per_kv_head(smol):
    toks = smol.to_tokens(PROMPT)
    v = with_activations(None, aq.scheme("KV4-int-head"), smol)
    grabbed = {}
    with swap(smol, v, layers=2):
        smol.run_with_hooks(toks, fwd_hooks=[
            ("blocks.2.attn.hook_rot_k", lambda k, hook: grabbed.setdefault("k", k.clone()))])
        assert len(smol.hook_dict["blocks.2.attn.hook_k"].fwd_hooks) == 0
    k = grabbed["k"]
    assert k.shape[2] == smol.cfg.n_key_value_heads
    # asymmetric 4-bit per (token, head): at most 16 levels in each head's vector
    assert max(len(torch.unique(k[0, p, h])) for p in range(k.shape[1])
               for h in range(k.shape[2])) <= 16


def test_analyses_take_activation_variants(smol, facts):
    """recall and the KLD statistics run an activation variant as they run a weight variant; the
    cheap KV8 cache barely moves the distribution and int4 inputs wreck it."""
    kv8 = with_activations(None, aq.scheme("KV8-int-token"), smol)
    a4 = with_activations(None, aq.scheme("A4-int-token"), smol)
    k = mechq.kld_stats(smol, [kv8, a4], max_tokens=256, progress=False).set_index("variant")
    # orders of magnitude apart on this text (about 0.002 against 8 nats when this was written)
    assert k.loc[kv8.name, "kld_mean"] < 0.05 < 2 < k.loc[a4.name, "kld_mean"]
    assert k.loc[kv8.name, "same_top1"] > 0.9
    rec = mechq.evaluate_recall(smol, facts.sample(24, seed=0), variants=[kv8, a4])
    acc = mechq.accuracy(rec).set_index("variant")["accuracy"]
    assert acc[a4.name] < acc["fp"] and abs(acc[kv8.name] - acc["fp"]) <= 2 / 24


def test_patch_sweep_takes_an_activation_variant_and_its_shortcuts_agree(tiny, facts):
    """The patching engine's KV reuse and identical-site skipping give the plain sweep's numbers
    on a run whose activations and KV cache are quantized (hooks on k and v included)."""
    v = with_activations(None, aq.scheme("A4-int-token", "KV4-int-head"), tiny)
    few = facts.sample(3, seed=1)
    fast = mechq.patch_sweep(tiny, few, v, positions="semantic", progress=False)
    slow = mechq.patch_sweep(tiny, few, v, positions="semantic", progress=False,
                             kv_reuse=False, skip_identical=False)
    num = [c for c in fast.columns if fast[c].dtype.kind == "f"]
    assert len(fast) == len(slow) and num
    # the shortcuts reorder float32 sums over the same values: 1e-4 on probabilities and logits
    for c in num:
        assert (fast[c] - slow[c]).abs().max() < 1e-4, c
