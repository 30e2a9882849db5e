"""EoRA: the hooked inputs, the Grams, the low-rank fit and its variant, on the real tiny model."""

import dataclasses

import pytest
import torch

import mechq
from mechq.facts.calibration import Calibration, get_calibration
from mechq.repair.eora import (
    calibration_grams, eora, lowrank_factors, module_input_sites, module_inputs, weighted_error,
)
from mechq.quant import layout
from mechq.vocab import hook_name
from tests.conftest import assert_params_equal, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

# The hook each component's module writes, to check the inputs against (up: hook_pre_linear
# in a gated MLP, hook_pre without a gate).
OUTPUT_HOOK = {"q": "q", "k": "k", "v": "v", "o": "attn_out", "gate": "pre", "down": "mlp_out"}


@pytest.fixture(scope="module")
def w2(tiny):
    return mechq.quantize(tiny, "rtn", bits=2, group_size=128)


@pytest.fixture(scope="module")
def grams(tiny):
    return calibration_grams(tiny, progress=False)


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_hooked_inputs_times_the_hf_weight_give_the_module_outputs(which, request):
    """X Wᵀ + b, with X read where EoRA reads it and W the HF-layout weight, is what the
    model's output hooks hold: the inputs are exactly those that multiply the weights."""
    model = request.getfixturevalue(which)
    toks = model.to_tokens(["The capital of France is", "Water boils at one hundred"])
    xs = module_inputs(model, toks)
    _, cache = model.run_with_cache(toks, attention_mask=torch.ones_like(toks))
    params = dict(model.named_parameters())
    gated = model.cfg.gated_mlp
    for s in layout.sites(model.cfg):
        w = layout.module_weight(model, s.module)
        y = xs[s.module] @ w.T
        if s.part is not None:  # a fused module (GPT-2 c_attn): this site's third
            width = w.shape[0] // 3
            y = y[..., s.part * width:(s.part + 1) * width]
        hook = ("pre_linear" if s.component == "up" and gated
                else OUTPUT_HOOK.get(s.component, "pre"))
        want = cache[hook_name(hook, s.layer)]
        bias = params.get(s.param.replace("W_", "b_"))
        y = y.reshape(want.shape) + (bias if bias is not None else 0)
        # float32 sums of ≤ 1536 products in another order (TransformerLens's einsum/addmm vs
        # this matmul): differences of a few ulps of the largest output
        assert (y - want).abs().max() <= 2e-5 * want.abs().max(), s


def test_grams_are_the_mean_outer_product_of_the_unpadded_inputs(tiny):
    """Samples of different lengths, padded in batches of 4, give XᵀX/n of the real tokens."""
    base = get_calibration(tiny, n_samples=6, seq_len=32).tokens
    lens = [32, 12, 20, 32, 15, 25]
    calib = Calibration([t[:k] for t, k in zip(base, lens)], "test")
    got = calibration_grams(tiny, calib, batch_size=4, progress=False)
    n = sum(lens)
    want: dict[str, torch.Tensor] = {}
    for t in calib.tokens:
        for m, x in module_inputs(tiny, torch.tensor([t])).items():
            x = x[0].double()
            want[m] = want.get(m, 0) + x.T @ x / n
    assert set(got) == set(layout.modules(tiny.cfg))
    for m in got:
        # float32 activations of a batched vs a one-sample forward (other GEMM blocking) differ
        # in the last bits; float64 sums add ~1e-16 more
        assert torch.allclose(got[m], want[m], rtol=0, atol=1e-5 * want[m].abs().max()), m
    # modules that read the same input share one tensor (one eigendecomposition later)
    sites = module_input_sites(tiny)
    assert len({id(g) for g in got.values()}) == len(sites) == 4 * tiny.cfg.n_layers


def test_full_rank_gives_back_the_fp_weight(tiny, w2, grams):
    full = min(tiny.cfg.d_model, tiny.cfg.d_mlp)
    for m in w2.modules:
        w = layout.module_weight(tiny, m).double()
        e = w - w2.weight(m).double()
        b, a = lowrank_factors(e, grams[m], full)
        # float64 factors: eigh/SVD round-off times the Λ^{-1/2} amplification of directions at
        # the eigenvalue floor (measured ≤ 1.5e-12 against |E| ≈ 0.05)
        assert (b @ a - e).abs().max() < 1e-9, m
    v32 = eora(tiny, w2, full, grams=grams, dtype=torch.float32, progress=False)
    v16 = eora(tiny, w2, full, grams=grams, progress=False)
    for m in w2.modules:
        w = layout.module_weight(tiny, m)
        # float32 factors and arithmetic: ulps of |W| ≤ 0.5 plus a 128-term matmul of factors of
        # size ≤ 0.25 (measured 4e-9)
        assert (v32.weight(m) - w).abs().max() < 1e-6, m
        # float16 factors: each entry is off by ≤ 2^-11 of itself, or ≤ 2^-25 (half the spacing)
        # when subnormal, so each product entry by ≤ 2^-10·(|B| @ |A|) + 2^-25·(row sum of |B|
        # + column sum of |A|), to first order (5 % slack for the second; 1e-6: float32 as above)
        b, a = (t.float().abs() for t in v16.lowrank[m])
        bound = 1.05 * (2.0 ** -10 * (b @ a) + 2.0 ** -25 * (b.sum(1, keepdim=True)
                                                             + a.sum(0, keepdim=True))) + 1e-6
        assert ((v16.weight(m) - w).abs() <= bound).all(), m
        assert v16.lowrank[m][0].dtype == torch.float16


def test_calibration_error_falls_with_rank_and_beats_the_plain_svd(tiny, w2, grams):
    """‖(W − W_eora) Xᵀ‖_F falls as the rank grows and, at every rank, is below what the
    unweighted truncated SVD of the error leaves."""
    ranks = (1, 2, 4, 8, 16, 32, 64)
    variants = {r: eora(tiny, w2, r, grams=grams, dtype=torch.float32, progress=False)
                for r in ranks}
    for m in w2.modules:
        w = layout.module_weight(tiny, m).double()
        e = w - w2.weight(m).double()
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        errs = [weighted_error(e, grams[m])]
        for r in ranks:
            errs.append(weighted_error(w - variants[r].weight(m).double(), grams[m]))
            plain = weighted_error(e - (u[:, :r] * s[:r]) @ vh[:r], grams[m])
            # measured ratio ≤ 0.68 at rank 1, ≤ 0.06 at rank 64: a wide margin over 0.9
            assert errs[-1] < 0.9 * plain, (m, r)
        assert all(a > b for a, b in zip(errs, errs[1:])), (m, errs)


def _final_kl(model, variant, prompts) -> float:
    """Mean KL(FP ‖ variant) of the next-token distributions at the prompts' last tokens."""
    kls = []
    for p in prompts:
        t = model.to_tokens(p)
        lp = model(t)[0, -1].log_softmax(-1)
        with mechq.swap(model, variant):
            lq = model(t)[0, -1].log_softmax(-1)
        kls.append(float((lp.exp() * (lp - lq)).sum()))
    return sum(kls) / len(kls)


def test_shared_eigendecompositions_give_the_same_factors(tiny, w2, grams):
    """``eigs`` carries the Grams' eigendecompositions from one call to the next (one per
    shared Gram) and changes nothing in the result."""
    eigs = {}
    first = eora(tiny, w2, 4, grams=grams, eigs=eigs, progress=False)
    assert len(eigs) == len({id(grams[m]) for m in w2.modules})
    again = eora(tiny, w2, 4, grams=grams, eigs=eigs, progress=False)
    alone = eora(tiny, w2, 4, grams=grams, progress=False)
    for m in w2.modules:
        for x, y, z in zip(first.lowrank[m], again.lowrank[m], alone.lowrank[m]):
            assert torch.equal(x, y) and torch.equal(x, z)


def test_eora_variant_swaps_restores_and_moves_towards_fp(tiny, w2, grams, facts):
    v = eora(tiny, w2, 8, grams=grams, progress=False)
    assert v.name == "rtn-w2g128-eora8" and v.modules is w2.modules
    assert set(v.lowrank) == set(w2.modules) and not w2.lowrank
    assert "lowrank rank=8" in repr(v)
    snap = snapshot(tiny)
    params = dict(tiny.named_parameters())
    with mechq.swap(tiny, v):
        for s in layout.sites(tiny.cfg):
            want = layout.linear_to_hooked(v.weight(s.module), s, tiny.cfg)
            assert torch.equal(params[s.param], want), s
    assert_params_equal(tiny, snap)
    prompts = [f.prompt for f in list(facts)[:24]]
    plain, comp = _final_kl(tiny, w2, prompts), _final_kl(tiny, v, prompts)
    # measured on 64 facts: KL 0.19 plain, 0.11 at rank 4, 0.008 at rank 16; rank 8 must at
    # least halve it
    assert comp < 0.5 * plain, (plain, comp)


def test_avg_bits_counts_16_bits_per_lowrank_entry(tiny, w2, grams):
    r = 8
    v = eora(tiny, w2, r, grams=grams, progress=False)
    shapes = {m: layout.module_weight(tiny, m).shape for m in w2.modules}
    n = sum(o * i for o, i in shapes.values())
    extra = sum(16 * r * (o + i) for o, i in shapes.values())
    assert v.avg_bits == pytest.approx(w2.avg_bits + extra / n, rel=1e-12)
    # float16 factors: 2 bytes per entry on top of the packed tensors
    assert v.nbytes == w2.nbytes + sum(2 * r * (o + i) for o, i in shapes.values())
    assert v.module_bits == w2.module_bits and v.n_weights == w2.n_weights


def test_a_variant_that_keeps_modules_fp_gets_no_correction_for_them(tiny, grams):
    rules = {r"-:.*\.h\.0\.mlp\..*": {}}
    v = mechq.quantize(tiny, "rtn", bits=4, group_size=128, dynamic=rules)
    c = eora(tiny, v, 4, grams=grams, progress=False)
    assert set(c.lowrank) == set(v.modules) and set(c.fp_modules) == set(v.fp_modules) != set()
    before = {m: layout.module_weight(tiny, m) for m in c.fp_modules}
    with mechq.swap(tiny, c):  # the FP modules keep the model's own weights
        for m, w in before.items():
            assert torch.equal(layout.module_weight(tiny, m), w), m


def test_bad_rank_and_foreign_variants_are_refused(tiny, w2, grams):
    full = min(tiny.cfg.d_model, tiny.cfg.d_mlp)
    for bad in (0, -1, full + 1):
        with pytest.raises(ValueError, match="rank must lie in 1"):
            eora(tiny, w2, bad, grams=grams, progress=False)
    with pytest.raises(TypeError, match="rank must be an int"):
        eora(tiny, w2, 4.0, grams=grams, progress=False)
    m0, p0 = next(iter(w2.modules.items()))
    renamed = dataclasses.replace(w2, modules={"model.layers.0.self_attn.q_proj": p0})
    with pytest.raises(ValueError, match="another model"):
        eora(tiny, renamed, 4, grams=grams, progress=False)
    other = next(m for m, p in w2.modules.items()
                 if (p.out_features, p.in_features) != (p0.out_features, p0.in_features))
    reshaped = dataclasses.replace(w2, modules={**w2.modules, other: p0})
    with pytest.raises(ValueError, match="another model"):
        eora(tiny, reshaped, 4, grams=grams, progress=False)
    with pytest.raises(ValueError, match="grams has no entry"):
        eora(tiny, w2, 4, grams={}, progress=False)
    once = eora(tiny, w2, 4, grams=grams, progress=False)
    with pytest.raises(ValueError, match="already has a low-rank"):
        eora(tiny, once, 4, grams=grams, progress=False)
