"""The weight swap: exact placement, bit-identical restore, hook names, mixed precision."""

import pytest
import torch

import mechq
from mechq.quant import layout
from tests.conftest import assert_params_equal, snapshot


@pytest.fixture(scope="module")
def tiny_w4(tiny):
    return mechq.quantize(tiny, "rtn", bits=4, group_size=128)



@pytest.fixture(scope="module")
def smol_w3(smol):
    return mechq.quantize(smol, "rtn", bits=3, group_size=128)


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_layout_round_trip_is_exact(which, request):
    """module_weight (HookedTransformer -> HF orientation) inverts linear_to_hooked."""
    model = request.getfixturevalue(which)
    params = dict(model.named_parameters())
    for s in layout.sites(model.cfg):
        w = layout.module_weight(model, s.module)
        assert torch.equal(layout.linear_to_hooked(w, s, model.cfg), params[s.param]), s


def test_layout_matches_hugging_face_modules(smol):
    hf, _, _ = mechq.models.load_hf("smollm2-135m")
    hf_params = dict(hf.named_parameters())
    for m in layout.modules(smol.cfg)[:14]:
        assert torch.equal(layout.module_weight(smol, m), hf_params[m + ".weight"]), m


@pytest.mark.parametrize("which,variant", [("tiny", "tiny_w4"), ("smol", "smol_w3")])
def test_swap_places_dequantized_weights_and_restores_bit_identically(which, variant, request):
    model = request.getfixturevalue(which)
    v = request.getfixturevalue(variant)
    snap = snapshot(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    toks = model.to_tokens("The capital of France is")
    fp_logits = model(toks)
    with mechq.swap(model, v) as m:
        assert m is model
        for s in layout.sites(model.cfg):
            expect = layout.linear_to_hooked(v.weight(s.module), s, model.cfg)
            assert torch.equal(dict(model.named_parameters())[s.param], expect), s.param
        q_logits = model(toks)
    # the variant changes the output: logits move by up to 0.93 (tiny w4) and 24 (SmolLM2 w3)
    # here, not within allclose's rtol 1e-5 / atol 1e-8 noise band
    assert not torch.allclose(fp_logits, q_logits)
    assert_params_equal(model, snap)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    # restored bit for bit, same forward again: equal bits on any CPU
    assert torch.equal(model(toks), fp_logits)


def test_restore_when_the_body_raises(tiny, tiny_w2):
    snap = snapshot(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with mechq.swap(tiny, tiny_w2):
            raise RuntimeError("boom")
    assert_params_equal(tiny, snap)


def test_only_chosen_layers_and_components_change(smol, smol_w3):
    snap = snapshot(smol)
    with mechq.swap(smol, smol_w3, layers=[2, 5], components=["mlp", "q"]):
        changed = {n for n, p in smol.named_parameters() if not torch.equal(p, snap[n])}
    expect = {f"blocks.{l}.{p}" for l in (2, 5)
              for p in ("mlp.W_gate", "mlp.W_in", "mlp.W_out", "attn.W_Q")}
    assert changed == expect
    assert_params_equal(smol, snap)


def test_component_groups():
    assert layout.expand_components("attn") == ("q", "k", "v", "o")
    assert layout.expand_components(["mlp", "q"]) == ("gate", "up", "down", "q")
    with pytest.raises(ValueError, match="Unknown component 'ffn'"):
        layout.expand_components("ffn")


def test_gpt2_has_no_gate_and_fused_qkv(tiny, tiny_w4):
    snap = snapshot(tiny)
    with mechq.swap(tiny, tiny_w4, layers=1, components="k"):
        changed = {n for n, p in tiny.named_parameters() if not torch.equal(p, snap[n])}
    assert changed == {"blocks.1.attn.W_K"}
    assert not [s for s in layout.sites(tiny.cfg) if s.component == "gate"]


def test_hook_names_are_the_same_whatever_is_swapped(tiny, tiny_w2):
    toks = tiny.to_tokens("The capital of France is")
    _, fp_cache = tiny.run_with_cache(toks)
    with mechq.swap(tiny, tiny_w2, components="attn"):
        _, q_cache = tiny.run_with_cache(toks)
    assert list(fp_cache.keys()) == list(q_cache.keys())
    # 2-bit attention moves attn_out by up to 0.19 (of |values| <= 0.92): far outside allclose
    assert not torch.allclose(fp_cache["blocks.0.hook_attn_out"], q_cache["blocks.0.hook_attn_out"])


def test_mixed_precision_mapping(tiny, tiny_w4, tiny_w2):
    snap = snapshot(tiny)
    with mechq.swap(tiny, {0: tiny_w2, 2: tiny_w4, 3: None}):
        params = dict(tiny.named_parameters())
        s0 = next(s for s in layout.sites(tiny.cfg) if s.layer == 0 and s.component == "up")
        s2 = next(s for s in layout.sites(tiny.cfg) if s.layer == 2 and s.component == "up")
        assert torch.equal(params[s0.param], layout.linear_to_hooked(tiny_w2.weight(s0.module), s0, tiny.cfg))
        assert torch.equal(params[s2.param], layout.linear_to_hooked(tiny_w4.weight(s2.module), s2, tiny.cfg))
        assert torch.equal(params["blocks.1.mlp.W_in"], snap["blocks.1.mlp.W_in"])
        assert torch.equal(params["blocks.3.mlp.W_in"], snap["blocks.3.mlp.W_in"])
    assert_params_equal(tiny, snap)


def test_nested_swaps_restore_in_order(tiny, tiny_w4, tiny_w2):
    snap = snapshot(tiny)
    with mechq.swap(tiny, tiny_w4):
        inner_before = snapshot(tiny)
        with mechq.swap(tiny, tiny_w2, layers=0):
            pass
        assert_params_equal(tiny, inner_before)
    assert_params_equal(tiny, snap)


def test_bad_requests_raise_clear_errors(tiny, smol, tiny_w4):
    with pytest.raises(ValueError, match="out of range"):
        with mechq.swap(tiny, tiny_w4, layers=[7]):
            pass
    with pytest.raises(ValueError, match="was it made for another model"):
        with mechq.swap(smol, tiny_w4):
            pass
    with pytest.raises(TypeError):
        with mechq.swap(tiny, {0: "w4"}):
            pass


def test_weight_device_argument_moves_packed_tensors_only(tiny_w2):
    """``Variant.weight(device=...)`` dequantizes where it is asked to (swap uses the model's
    device); on the device the packed tensors already occupy it changes nothing."""
    for name, packed in list(tiny_w2.modules.items())[:4]:
        assert packed.to("cpu") is packed
        assert torch.equal(tiny_w2.weight(name, device="cpu"), tiny_w2.weight(name))
        assert tiny_w2.weight(name, torch.float16, device=torch.device("cpu")).dtype == \
            torch.float16
    if torch.cuda.is_available():  # exercised on GPU machines only (not in CI)
        name, packed = next(iter(tiny_w2.modules.items()))
        on_gpu = tiny_w2.weight(name, device="cuda")
        assert on_gpu.device.type == "cuda" and packed.qweight.device.type == "cpu"
        assert torch.equal(on_gpu.cpu(), tiny_w2.weight(name))
