"""Per-module bits in GPTQModel's ``dynamic`` syntax: the resolver (checked against GPTQModel's
own), mixed-bit RTN and GPTQ variants, the swap of a module a rule skips, the reader's errors."""

import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import mechq
from mechq.models import load as models
from mechq.quant import dynamic as dyn
from mechq.quant import layout
from mechq.quant.formats.common import CheckpointError
from mechq.quant.formats.gptq import load_gptq_checkpoint
from mechq.quant.quantize import CACHE_FORMAT, Request
from tests.conftest import assert_params_equal, snapshot

BASE = {"bits": 4, "group_size": 128, "sym": True}
NAMES = [f"model.layers.{l}.{m}" for l in (0, 1, 2, 10, 11)
         for m in ("self_attn.q_proj", "mlp.down_proj", "mlp.gate_proj")] + ["lm_head"]
# Overlapping rules in an order that matters: the "-:" rule comes last but is tried first; of
# the two "+:" rules matching layer 1, the first one listed wins; ".*\.layers\.1\." ends at the
# dot, ".*\.layers\.1" would also take layers 10-19 (a match is anchored at the start only).
RULES = {
    r"+:.*\.layers\.(0|1)\..*": {"bits": 8},
    r".*\.layers\.1\..*": {"bits": 2, "group_size": 32},
    r".*\.layers\.1.*gate": {"bits": 3},
    r"+:.*mlp\.down_proj$": {"group_size": 64, "sym": False},
    r"-:.*lm_head": {},
    r"-:.*\.layers\.(0|11)\.mlp\.gate_proj": {},
}


def test_resolver_negative_first_then_first_match():
    r = lambda name: dyn.resolve(name, BASE, RULES)  # noqa: E731
    assert r("lm_head") is None
    assert r("model.layers.0.mlp.gate_proj") is None  # "-:" wins over the earlier "+:" rule
    assert r("model.layers.11.mlp.gate_proj") is None
    assert r("model.layers.0.self_attn.q_proj") == dict(BASE, bits=8)  # other keys: the base's
    assert r("model.layers.1.mlp.down_proj") == dict(BASE, bits=8)  # first of 3 matches wins
    assert r("model.layers.1.mlp.gate_proj") == dict(BASE, bits=8)
    assert r("model.layers.10.mlp.gate_proj") == dict(BASE, bits=3)  # "layers\.1.*" takes 10
    assert r("model.layers.2.mlp.down_proj") == dict(BASE, group_size=64, sym=False)
    assert r("model.layers.2.self_attn.q_proj") == BASE  # no rule matches
    assert dyn.rule_for("model.layers.0.mlp.gate_proj", RULES).startswith("-:")
    assert dyn.resolve("lm_head", BASE, None) == BASE
    assert not dyn.skipped("model.layers.2.mlp.gate_proj", RULES)
    # Two spellings that resolve alike share a canonical form (and a name and a cache key):
    # listing the "-:" rules first changes nothing; moving a "+:" rule does.
    keys = list(RULES)
    negatives_first = {k: RULES[k] for k in [*keys[4:], *keys[:4]]}
    assert dyn.canonical(negatives_first) == dyn.canonical(RULES)
    plus_moved = {k: RULES[k] for k in [*keys[1:], keys[0]]}
    assert dyn.canonical(plus_moved) != dyn.canonical(RULES)


def test_resolver_agrees_with_gptqmodel():
    """The same rules through GPTQModel's QuantizeConfig (which reorders them) and dynamic_get."""
    from gptqmodel import QuantizeConfig

    qcfg = QuantizeConfig(**BASE, dynamic=copy.deepcopy(RULES))
    for name in NAMES:
        ours = dyn.resolve(name, BASE, RULES)
        if qcfg.dynamic_get(name) is False:
            assert ours is None, name
        else:
            assert ours == {k: qcfg.dynamic_get(name, k, v) for k, v in BASE.items()}, name
    assert sum(dyn.resolve(n, BASE, RULES) is None for n in NAMES) == 3


def test_check_rejects_bad_rules():
    assert dyn.check({}) is None and dyn.check(None) is None
    with pytest.raises(ValueError, match="not a valid regex"):
        dyn.check({"+:layers.(0": {"bits": 8}})
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\), got 5"):
        dyn.check({".*q_proj": {"bits": 5}})
    with pytest.raises(ValueError, match="group_size"):
        dyn.check({".*q_proj": {"group_size": 0}})
    with pytest.raises(ValueError, match="mapping"):
        dyn.check({".*q_proj": 8})
    with pytest.raises(ValueError, match=r"\['desc_act'\] cannot be set per module"):
        Request("rtn", 4, dynamic={".*q_proj": {"desc_act": True}}).check()
    Request("gptq", 4, dynamic={".*q_proj": {"desc_act": True}}).check()  # GPTQModel's to apply


# --------------------------------------------------------------------------------------------
# RTN on the tiny GPT-2 model: layers 0-1 at 8 bits, the rest at 4, one module skipped

TINY_RULES = {r"+:.*\.h\.(0|1)\..*": {"bits": 8}, r"-:.*lm_head": {},
              r"-:.*\.h\.3\.mlp\.c_proj": {}}
SKIPPED = "transformer.h.3.mlp.c_proj"


@pytest.fixture(scope="module")
def tiny_mixed(tiny):
    return mechq.quantize(tiny, "rtn", bits=4, group_size=128, dynamic=TINY_RULES)


def _storage_bits(out_f: int, in_f: int, bits: int, group_size: int) -> int:
    """Packed storage of one module by the layout's definition: int32 words of codes along the
    input, int32 words of zero points along the output per group, one fp16 scale per group."""
    groups = -(-in_f // group_size)
    words = lambda n: -(-n * bits // 32)  # noqa: E731
    return 32 * words(in_f) * out_f + 32 * groups * words(out_f) + 16 * groups * out_f


def test_rtn_mixed_bits(tiny, tiny_mixed):
    v = tiny_mixed
    mods = layout.modules(tiny.cfg)
    assert "lm_head" not in mods  # tied: not a swappable module, so its rule matches nothing
    assert v.name.startswith("rtn-w4g128-dyn") and len(v.name) == len("rtn-w4g128-dyn") + 6
    assert v.bits == 4 and v.dynamic == TINY_RULES and v.meta["dynamic"] == TINY_RULES
    expect = {m: 16 if m == SKIPPED else 8 if ".h.0." in m or ".h.1." in m else 4 for m in mods}
    assert v.module_bits == expect
    assert SKIPPED not in v.modules and v.fp_modules == {SKIPPED: (128, 512)}
    assert v.skips(SKIPPED) and not v.skips("transformer.h.3.mlp.c_fc")

    err = {}
    for m in mods[:-1]:
        w = layout.module_weight(tiny, m)
        err[m] = ((v.weight(m) - w).norm() / w.norm()).item()
    e8 = max(e for m, e in err.items() if expect[m] == 8)
    e4 = min(e for m, e in err.items() if expect[m] == 4)
    # RTN's relative error scales with the step, 2^4 = 16x finer at 8 bits than at 4; the worst
    # 8-bit module must still sit 4x below the best 4-bit one (measured: 16x)
    assert e8 * 4 < e4, (e8, e4)

    shapes = {m: tuple(layout.module_weight(tiny, m).shape) for m in mods}
    total = sum(o * i for o, i in shapes.values())
    stored = sum(16 * o * i if expect[m] == 16 else _storage_bits(o, i, expect[m], 128)
                 for m, (o, i) in shapes.items())
    # Integer bit counts divided once: equal up to the last float64 bit
    assert v.avg_bits == pytest.approx(stored / total, rel=1e-12)
    assert v.n_weights == total


def test_cache_keys_of_uniform_and_dynamic_variants(tiny, tiny_mixed):
    """A uniform variant's directory is the hash of exactly its documented fields (the model,
    its config and its weights' digest, the quantizer's settings, the calibration, the CPU code
    path, the cache format); per-module rules add one field."""
    uniform = mechq.quantize(tiny, "rtn", bits=4, group_size=128)
    src = models.source_of(tiny)
    fields = dict(model=src.name,
                  config=hashlib.sha256((src.hf_dir / "config.json").read_bytes()).hexdigest()[:16],
                  weights=models.weights_digest(tiny),
                  method="rtn", bits=4, group_size=128, sym=True, desc_act=False,
                  calibration=None, format=CACHE_FORMAT, code_path={})

    def key(f):
        return hashlib.sha256(json.dumps(f, sort_keys=True).encode()).hexdigest()[:20]

    assert Path(uniform.meta["path"]).name == key(fields)
    assert uniform.dynamic is None and uniform.fp_modules == {} and uniform.name == "rtn-w4g128"
    assert Path(tiny_mixed.meta["path"]).name == key(
        dict(fields, dynamic=dyn.canonical(TINY_RULES)))
    again = mechq.load_variant(tiny_mixed.meta["path"])  # no model: skipped ones from meta
    assert again.module_bits == tiny_mixed.module_bits and again.avg_bits == tiny_mixed.avg_bits
    named = mechq.quantize(tiny, "rtn", bits=4, dynamic=TINY_RULES, name="mine")
    assert named.name == "mine" and named.meta["path"] == tiny_mixed.meta["path"]


def test_swap_leaves_skipped_module_fp_and_restores(tiny, tiny_mixed):
    snap = snapshot(tiny)
    skipped_param = next(s.param for s in layout.sites(tiny.cfg) if s.module == SKIPPED)
    with mechq.swap(tiny, tiny_mixed):
        params = dict(tiny.named_parameters())
        assert torch.equal(params[skipped_param], snap[skipped_param])
        for s in layout.sites(tiny.cfg):
            if s.module != SKIPPED:
                expect = layout.linear_to_hooked(tiny_mixed.weight(s.module), s, tiny.cfg)
                assert torch.equal(params[s.param], expect), s.param
    assert_params_equal(tiny, snap)
    # A module missing with no rule to skip it is still an error, not a silent FP module.
    lacking = replace(tiny_mixed, modules={m: p for m, p in tiny_mixed.modules.items()
                                           if m != "transformer.h.2.attn.c_proj"})
    with pytest.raises(ValueError, match=r"no weights for 'transformer\.h\.2\.attn\.c_proj'.*"
                                         r"another model"):
        with mechq.swap(tiny, lacking):
            pass
    assert_params_equal(tiny, snap)


# --------------------------------------------------------------------------------------------
# the reader: mixed-bit checkpoints and their errors


def _edit_config(path: Path, **changes) -> None:
    f = path / "quantize_config.json"
    f.write_text(json.dumps(dict(json.loads(f.read_text()), **changes)))


def test_reader_rejects_unsupported_bits_for_one_module(tiny_mixed, tmp_path):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_mixed.meta["path"], path)
    ckpt = load_gptq_checkpoint(path)
    assert ckpt.module_bits == {m: b for m, b in tiny_mixed.module_bits.items() if b != 16}
    rules = {r"+:.*\.h\.1\.attn\.c_proj": {"bits": 5}, **TINY_RULES}
    _edit_config(path, dynamic=rules)
    with pytest.raises(CheckpointError, match=r"quantize_config\.json: module "
                                              r"'transformer\.h\.1\.attn\.c_proj' \(dynamic rule "
                                              r".*\) has unsupported bits=5"):
        load_gptq_checkpoint(path)
    # A rule that skips a module whose packed tensors are there: the file and module are named.
    _edit_config(path, dynamic={r"-:.*\.h\.2\.mlp\.c_fc": {}, **TINY_RULES})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: module "
                                              r"'transformer\.h\.2\.mlp\.c_fc' is packed, but"):
        load_gptq_checkpoint(path)
    # A per-module format change stays unsupported.
    _edit_config(path, dynamic={r".*\.h\.2\..*": {"pack_dtype": "int16"}})
    with pytest.raises(CheckpointError, match=r"per-module 'dynamic' override.*int16"):
        load_gptq_checkpoint(path)


# --------------------------------------------------------------------------------------------
# GPTQ through GPTQModel with per-module rules, read against GPTQModel's own dequantization

GPTQ_RULES = {r"+:.*\.h\.0\..*": {"bits": 8}, r"-:.*\.h\.2\.attn\.c_proj": {}}


@pytest.mark.slow
def test_mixed_bit_gptq_matches_gptqmodel(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHQ_CACHE", str(tmp_path))
    v = mechq.quantize(tiny, "gptq", bits=4, dynamic=GPTQ_RULES, n_samples=8, seq_len=24)
    skipped = "transformer.h.2.attn.c_proj"
    expect = {m: 16 if m == skipped else 8 if ".h.0." in m else 4
              for m in layout.modules(tiny.cfg)}
    assert v.module_bits == expect and v.fp_modules == {skipped: (128, 128)}
    ckpt = load_gptq_checkpoint(v.meta["path"])
    assert ckpt.module_bits == {m: b for m, b in expect.items() if b != 16}
    assert f"{skipped}.weight" in ckpt.other  # GPTQModel keeps the skipped module's weight

    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    ref = GPTQModel.load(v.meta["path"], backend=BACKEND.TORCH, device="cpu",
                         dtype=torch.float16)
    theirs = {n: m for n, m in ref.model.named_modules() if isinstance(m, TorchLinear)}
    assert {n: m.bits for n, m in theirs.items()} == ckpt.module_bits  # GPTQModel reads the same
    for name, mod in theirs.items():
        # The class function, not the torch.compile wrapper post_init installed: same arithmetic.
        w_ref = TorchLinear.dequantize_weight(mod).detach()
        ours = v.modules[name].dequantize()
        # Exact on any CPU: both compute scale * (code - zero) elementwise from the same file,
        # and a correctly rounded fp16 product has one answer.
        assert torch.equal(ours, w_ref), (name, (ours - w_ref).abs().max())
        assert torch.equal(v.weight(name, torch.float16), w_ref.T)
    del ref
