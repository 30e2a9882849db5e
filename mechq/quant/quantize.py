"""Making and loading quantized variants, with an on-disk cache.

``quantize(model, ...)`` returns a :class:`~mechq.quant.variants.Variant`; ``quantize_many``
makes several, running the GPTQ ones in parallel child processes. Every variant is stored as a
GPTQ-layout checkpoint directory under ``<cache>/variants/<key>``, where ``key`` hashes (model,
its config, method, bits, group size, sym, desc_act, the calibration's token digest, mechq's
format version, and the per-module ``dynamic`` rules when there are any: a uniform variant's key
has no ``dynamic`` entry at all, so it is the key it had before per-module bits existed); asking
again for the same variant reads that directory instead of quantizing.
GPTQ and AWQ checkpoints are GPTQModel's own output (its log goes to ``<cache>/logs/``); RTN
variants are written by mechq in the GPTQ layout. All are read back by :func:`load_variant`,
i.e. by mechq's own readers (:mod:`mechq.quant.formats`).

AWQ (GEMM, 4 bits) needs a group size that divides every input width of the model: SmolLM2's
576-wide residual stream is not a multiple of 128, and GPTQModel refuses AWQ g128 for it.
:func:`default_group_size` picks the largest of 128, 64, 32, 16 that divides them all (64 on
SmolLM2); GPTQ and RTN default to 128 and allow a partial last group.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from transformer_lens import HookedTransformer

from mechq.models import load as models
from mechq.models.families import family_of
from mechq.facts.calibration import AWQ_N_SAMPLES, AWQ_SEQ_LEN, N_SAMPLES, SEQ_LEN, get_calibration
from mechq.quant import dynamic as dyn
from mechq.quant import layout
from mechq.quant.formats.common import META_FILE, check_architecture
from mechq.quant.formats.gptq import save_gptq_checkpoint
from mechq.quant.gptq import make_job, run_gptq_jobs
from mechq.quant.rtn import rtn_quantize_weight
from mechq.quant.activation_quant import ActScheme, split_spec
from mechq.quant.variants import Variant, calibrated, with_activations
from mechq.vocab import CODE_PATH_VARIABLES, SUPPORTED_BITS

METHODS = ("gptq", "rtn", "awq")
CALIBRATED = ("gptq", "awq")  # methods that run GPTQModel on calibration tokens
AWQ_GROUP_SIZES = (128, 64, 32, 16)


def calibration_size(method: str) -> tuple[int, int]:
    """``(n_samples, seq_len)`` a method uses by default."""
    return (AWQ_N_SAMPLES, AWQ_SEQ_LEN) if method == "awq" else (N_SAMPLES, SEQ_LEN)
CACHE_FORMAT = 3  # 3: keyed by the quantized weights' digest and the CPU code path too
NAME = re.compile(r"^(gptq|rtn|awq)-w(\d+)(?:g(-?\d+))?((?:-asym|-act|-det)*)(?:-s(\d+))?$")
#: The environment of a deterministic GPTQ / AWQ run: ATen, MKL and oneDNN all forced onto their
#: baseline x86 code paths, so that none of them picks kernels by the CPU's instruction set.
#: On one machine, this setting is what emulating other CPUs cannot move; whether two physical
#: CPUs then give identical codes was not checked (docs/calibration.md says what was).
DETERMINISTIC_ENV = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default",
                     "ONEDNN_MAX_CPU_ISA": "SSE41"}


def variant_name(method: str, bits: int, group_size: int, sym: bool = True,
                 desc_act: bool = False, seed: int = 0, dynamic: dyn.Dynamic | None = None,
                 deterministic: bool = False) -> str:
    """``gptq-w4g128``, with ``-asym`` / ``-act`` / ``-det`` suffixes for non-default choices,
    ``-dyn`` and the first 6 hex digits of :func:`mechq.quant.dynamic.digest` for per-module rules
    (``gptq-w4g128-dyn3f9a1c``), and ``-s1`` for calibration seed 1 (seed 0 is the default and
    has no suffix)."""
    g = "" if group_size in (-1, 0) else f"g{group_size}"
    return (f"{method}-w{bits}{g}" + ("" if sym else "-asym") + ("-act" if desc_act else "")
            + ("-det" if deterministic else "")
            + (f"-dyn{dyn.digest(dynamic)[:6]}" if dynamic else "")
            + (f"-s{seed}" if seed else ""))


@dataclass
class Request:
    """One variant to make: what :func:`quantize` takes, as data. ``dynamic``: per-module rules
    in GPTQModel's syntax (:mod:`mechq.quant.dynamic`), ``None`` for one setting everywhere.
    ``deterministic``: run GPTQ / AWQ on the baseline x86 code paths
    (:data:`DETERMINISTIC_ENV`), which no CPU-dependent kernel choice can move."""

    method: str = "gptq"
    bits: int = 4
    group_size: int | None = 128  # None: default_group_size(model, method), set by quantize_many
    sym: bool = True
    desc_act: bool = False
    calibration: str | Path | list[str] | None = None
    seed: int = 0
    n_samples: int | None = None  # None: the method's default (calibration_size)
    seq_len: int | None = None
    name: str | None = None
    dynamic: dict | None = None
    deterministic: bool = False

    @classmethod
    def parse(cls, name: str, **kw) -> Request:
        """The request a variant name stands for (as :func:`variant_name` writes it):
        ``gptq-w4g128-asym-s1`` is GPTQ, 4 bits, group size 128, asymmetric, calibration seed 1.
        Without ``gGROUP`` the group size is 128 for GPTQ / RTN and ``None`` (the model's
        default) for AWQ. ``kw``: the other fields (calibration, n_samples, seq_len ...).
        Raises ValueError for a name of another form."""
        m = NAME.match(name)
        if not m:
            raise ValueError(
                f"bad variant {name!r}: use METHOD-wBITS[gGROUP][-asym][-act][-sSEED], e.g. "
                "gptq-w4g128, gptq-w4g128-s1 (calibration seed 1) or awq-w4g64, or a path to a "
                "GPTQ, AWQ or compressed-tensors checkpoint directory")
        method, bits, gs, flags, seed = m.groups()
        group_size = int(gs) if gs else (None if method == "awq" else 128)
        return cls(method, int(bits), group_size, sym="-asym" not in flags,
                   desc_act="-act" in flags, seed=int(seed or 0),
                   deterministic="-det" in flags, **kw)

    def __post_init__(self) -> None:
        n, length = calibration_size(self.method)
        self.n_samples = n if self.n_samples is None else self.n_samples
        self.seq_len = length if self.seq_len is None else self.seq_len

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {METHODS}.")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}.")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(
                f"group_size must be positive or -1 (per-channel), got {self.group_size}.")
        if self.method == "rtn" and self.desc_act:
            raise ValueError(
                "desc_act (activation order) needs calibration: it applies to GPTQ only.")
        if self.method == "awq":
            if self.bits != 4:
                raise ValueError(f"AWQ (GEMM format) packs 4-bit codes only, got bits={self.bits}.")
            if self.desc_act:
                raise ValueError("desc_act (activation order) is GPTQ's; AWQ has no act-order.")
            if self.group_size == -1:
                raise ValueError("AWQ needs a group size (per-channel -1 is GPTQ / RTN only).")
            if self.dynamic and any(not str(k).startswith(dyn.SKIP) for k in self.dynamic):
                raise ValueError("GPTQModel's AWQ honours only '-:' (skip) dynamic rules; "
                                 f"got {list(self.dynamic)}.")
        self.dynamic = dyn.check(self.dynamic, dyn.RTN_KEYS if self.method == "rtn" else None)


def input_widths(model: HookedTransformer) -> set[int]:
    """The input widths of the model's quantizable linear modules."""
    return {int(layout.module_weight(model, m).shape[1]) for m in layout.modules(model.cfg)}


def default_group_size(model: HookedTransformer, method: str = "gptq") -> int:
    """128 for GPTQ and RTN; for AWQ the largest of :data:`AWQ_GROUP_SIZES` that divides every
    input width (AWQ's groups cannot be partial)."""
    if method != "awq":
        return 128
    widths = input_widths(model)
    for g in AWQ_GROUP_SIZES:
        if all(w % g == 0 for w in widths):
            return g
    raise ValueError(f"No AWQ group size in {AWQ_GROUP_SIZES} divides the input widths "
                     f"{sorted(widths)}.")


def quantize(
    model: HookedTransformer,
    method: str = "gptq",
    bits: int = 4,
    group_size: int | None = None,
    sym: bool = True,
    desc_act: bool = False,
    calibration: str | Path | list[str] | None = None,
    seed: int = 0,
    *,
    n_samples: int | None = None,
    seq_len: int | None = None,
    cache: bool = True,
    name: str | None = None,
    dynamic: dyn.Dynamic | None = None,
    deterministic: bool = False,
) -> Variant:
    """Quantize ``model``'s linear layers and return the variant (not swapped in).

    ``method="gptq"`` runs GPTQModel on the model's Hugging Face weights with ``calibration``
    (default: ``n_samples`` windows of ``seq_len`` tokens of mechq's bundled calibration text,
    chosen by ``seed``; see :mod:`mechq.facts.calibration`); ``method="rtn"`` is mechq's group-wise
    round-to-nearest, which needs no calibration; ``method="awq"`` runs GPTQModel's AWQ (4 bits,
    GEMM format, pure-torch backend on CPU, in bfloat16) on the same calibration.
    ``group_size=-1`` means one group per row (per-channel); ``None`` is
    :func:`default_group_size` (128, or for AWQ the largest that divides every input width).

    ``dynamic`` sets modules apart in GPTQModel's own syntax (:mod:`mechq.quant.dynamic`), e.g.
    ``{r"+:.*\\.layers\\.(0|1)\\..*": {"bits": 8}, r"-:.*lm_head": {}}``: the first two layers at
    8 bits, the rest at ``bits``, and modules a ``-:`` rule matches left in full precision. RTN
    honours ``bits``, ``group_size`` and ``sym`` per module; GPTQ hands the rules to GPTQModel.

    ``deterministic`` runs GPTQ / AWQ on the baseline x86 code paths
    (:data:`DETERMINISTIC_ENV`), which no CPU-dependent kernel choice can move.
    """
    if group_size is None:
        group_size = default_group_size(model, method)
    req = Request(method, bits, group_size, sym, desc_act, calibration, seed, n_samples, seq_len,
                  name, dict(dynamic) if dynamic else None, deterministic)
    return quantize_many(model, [req], cache=cache, progress=False)[0]


def code_path(r: Request) -> dict[str, str]:
    """The CPU code-path settings a variant is made under (part of its cache key): for GPTQ and
    AWQ, :data:`DETERMINISTIC_ENV` when deterministic, else whichever of
    :data:`mechq.vocab.CODE_PATH_VARIABLES` the environment sets; RTN rounds the same anywhere."""
    if r.method not in CALIBRATED:
        return {}
    if r.deterministic:
        return dict(DETERMINISTIC_ENV)
    return {k: os.environ[k] for k in CODE_PATH_VARIABLES if os.environ.get(k)}


def quantize_many(
    model: HookedTransformer,
    requests: Sequence[Request],
    *,
    cache: bool = True,
    parallel: int | None = None,
    progress: bool = True,
    on_start: Callable[[int, str], None] | None = None,
    verbose: bool = False,
) -> list[Variant]:
    """Make (or read from the cache) several variants; GPTQ runs go ``parallel`` at a time.

    ``parallel`` defaults to ``$MECHQ_GPTQ_JOBS`` or, on CPU, the number of cores (each GPTQ
    child uses one thread, see :mod:`mechq.quant.gptq`); on a GPU to 1. ``on_start(n, log_dir)``
    is called before the first GPTQ run with the number of runs and the folder of their logs.
    GPTQModel's output goes to one log file per run there; ``verbose`` also echoes it to stderr.
    """

    for r in requests:
        if r.group_size is None:
            r.group_size = default_group_size(model, r.method)
        r.check()
        if r.method == "awq":
            why = family_of(model.cfg).awq_unsupported
            if why:
                raise ValueError(f"AWQ is not available for this model: {why}.")
            bad = sorted(w for w in input_widths(model) if w % r.group_size)
            if bad:
                raise ValueError(
                    f"AWQ group_size {r.group_size} does not divide the input widths {bad} of "
                    f"this model (AWQ groups cannot be partial); use group_size="
                    f"{default_group_size(model, 'awq')}.")
    src = models.source_of(model)
    device = str(model.cfg.device).split(":")[0]
    config_hash = hashlib.sha256((src.hf_dir / "config.json").read_bytes()).hexdigest()[:16]
    weights = models.weights_digest(model)
    if src.weights and weights != src.weights and any(r.method in CALIBRATED for r in requests):
        raise ValueError(
            f"the model's weights changed in memory since it was loaded, but GPTQModel quantizes "
            f"the weights in {src.hf_dir}: save the edited model as a Hugging Face directory and "
            "load that, or quantize with method='rtn' (which reads the weights in memory).")
    root = models.cache_dir() / "variants"
    root.mkdir(parents=True, exist_ok=True)

    plans = []  # (request, calibration, key fields, output dir, name)
    for r in requests:
        calib = (get_calibration(model, r.calibration, n_samples=r.n_samples,
                                 seq_len=r.seq_len, seed=r.seed) if r.method in CALIBRATED
                 else None)
        fields = dict(model=src.name, config=config_hash, weights=weights, method=r.method,
                      bits=r.bits, group_size=r.group_size, sym=r.sym, desc_act=r.desc_act,
                      calibration=calib.digest if calib else None, format=CACHE_FORMAT,
                      code_path=code_path(r))
        if r.dynamic:
            fields["dynamic"] = dyn.canonical(r.dynamic)
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
        name = r.name or variant_name(r.method, r.bits, r.group_size, r.sym, r.desc_act,
                                      r.seed if r.method in CALIBRATED else 0, r.dynamic,
                                      r.deterministic and r.method in CALIBRATED)
        plans.append((r, calib, fields, root / key, name))

    todo = [p for p in plans if not (cache and (p[3] / META_FILE).exists())]
    todo = list({str(p[3]): p for p in todo}.values())  # the same variant asked twice: make once
    with ExitStack() as locks:
        # Another process sharing the cache may be making some of them: wait for it (locks taken
        # in key order, so two processes never hold each other's), then make only what is left.
        for p in sorted(todo, key=lambda p: p[3].name):
            locks.enter_context(models.cache_lock(p[3]))
        todo = [p for p in todo if not (cache and (p[3] / META_FILE).exists())]
        _make(model, src.hf_dir, todo, root, device=device, parallel=parallel,
              on_start=on_start, progress=progress, verbose=verbose)
    return [load_variant(out, model=model, name=name) for _, _, _, out, name in plans]


def _make(model: HookedTransformer, hf_dir: Path, todo: list, root: Path, *, device: str,
          parallel: int | None, on_start, progress: bool, verbose: bool) -> None:
    """Quantize the planned variants ``todo`` (GPTQ/AWQ children side by side, RTN here) and
    move each, complete with its metadata, into its cache directory."""
    gptq = [p for p in todo if p[0].method in CALIBRATED]
    if parallel is None:
        parallel = int(os.environ.get("MECHQ_GPTQ_JOBS", 0)) or (
            os.cpu_count() or 1 if device == "cpu" else 1)
    logs = models.cache_dir() / "logs"
    if gptq and on_start is not None:
        on_start(len(gptq), str(logs))
    bar = tqdm(total=len(todo), desc="quantize", unit="variant", disable=not progress or not todo)

    tmps: dict[str, Path] = {}
    try:
        jobs = []
        for r, calib, fields, out, name in gptq:
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{out.name}.tmp"))
            tmps[str(out)] = tmp
            jobs.append(make_job(hf_dir, tmp, calib, bits=r.bits, group_size=r.group_size,
                                 sym=r.sym, desc_act=r.desc_act, device=device,
                                 dynamic=r.dynamic, log=logs / f"{name}-{out.name}.log",
                                 method=r.method, env=code_path(r)))
        finished = {}

        def done(job, seconds):
            finished[job.out_dir] = seconds
            bar.update(1)

        if jobs:
            run_gptq_jobs(jobs, parallel=min(parallel, len(jobs)), on_done=done, verbose=verbose)
        for r, calib, fields, out, name in todo:
            t0 = time.perf_counter()
            if r.method in CALIBRATED:
                tmp = tmps[str(out)]
                (tmp / "calibration.json").write_text(json.dumps(
                    {"source": calib.source, "digest": calib.digest, "tokens": calib.tokens}))
                seconds = finished[str(tmp)]
            else:
                tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{out.name}.tmp"))
                tmps[str(out)] = tmp
                _write_rtn(model, tmp, r)
                seconds = time.perf_counter() - t0
                bar.update(1)
            meta = dict(fields, name=name, seed=r.seed if calib else None,
                        seconds=round(seconds, 2),
                        calibration_source=calib.source if calib else None,
                        calibration_tokens=calib.n_tokens if calib else 0,
                        calibration_digest=calib.digest if calib else None)
            if r.dynamic:
                meta.update(dynamic=r.dynamic, fp_modules=_fp_modules(model, r.dynamic))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
    finally:
        bar.close()
        for tmp in tmps.values():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _write_rtn(model: HookedTransformer, out: Path, r: Request) -> None:
    """RTN of every linear module with its own settings (base ones updated by ``r.dynamic``);
    modules a ``-:`` rule skips are not written."""
    base = dict(bits=r.bits, group_size=r.group_size, sym=r.sym)
    packed = {}
    for m in layout.modules(model.cfg):
        c = dyn.resolve(m, base, r.dynamic)
        if c is not None:
            packed[m] = rtn_quantize_weight(layout.module_weight(model, m), c["bits"],
                                            c["group_size"], c["sym"])
    if not packed:
        raise ValueError(f"dynamic {r.dynamic} skips every linear module: nothing to quantize.")
    qc = dict(base, desc_act=False, quant_method="gptq", checkpoint_format="gptq_v2",
              meta={"quantizer": ["mechq-rtn"]})
    if r.dynamic:
        qc["dynamic"] = r.dynamic
    save_gptq_checkpoint(out, packed, qc)


def _fp_modules(model: HookedTransformer, dynamic: dyn.Dynamic | None) -> dict[str, list[int]]:
    """The model's linear modules that ``dynamic`` keeps in full precision, with (out, in)."""
    return {m: list(layout.module_weight(model, m).shape) for m in layout.modules(model.cfg)
            if dyn.skipped(m, dynamic)}


def parse_spec(spec: str, **kw) -> tuple[Request | Path | str, ActScheme | None]:
    """What one variant argument names, and its activation scheme (``None`` without one):
    a checkpoint directory (a Path), a variant name (a :class:`Request`; ``kw``: its other
    fields), or ``"fp"`` for FP weights, which needs a scheme. A scheme follows ``+``, as
    :func:`~mechq.quant.variants.with_activations` names the variant: ``gptq-w4g128+A8-int-token``,
    ``fp+KV4-int-head`` (:func:`~mechq.quant.activation_quant.split_spec`)."""
    if Path(spec).is_dir():
        return Path(spec), None
    base, act = split_spec(spec)
    if base == "fp" and act is None:
        raise ValueError("'fp' alone is the reference model; give fp+SCHEME for FP weights with "
                         "an activation scheme (e.g. fp+A8-int-token).")
    item = Path(base) if Path(base).is_dir() else base if base == "fp" else \
        Request.parse(base, **kw)
    return item, act


def make_specs(model: HookedTransformer, items: Sequence[tuple], **kw) -> list[Variant]:
    """The variants of :func:`parse_spec`'s items, in order: names made by one
    :func:`quantize_many` call (``kw``: its options) or read from the cache, directories read,
    each with its activation scheme, calibrated where static (:func:`calibrated`)."""
    made = iter(quantize_many(model, [r for r, _ in items if isinstance(r, Request)], **kw))
    out = []
    for item, act in items:
        v = None if isinstance(item, str) else next(made) if isinstance(item, Request) else \
            load_variant(item, model=model)
        out.append(v if act is None else calibrated(model, with_activations(v, act, model)))
    return out


def load_variant(
    path: str | Path, model: HookedTransformer | None = None, name: str | None = None
) -> Variant:
    """Read a quantized checkpoint directory into a :class:`Variant` with mechq's own readers.

    The format (GPTQ, AWQ or compressed-tensors) is detected from ``quantize_config.json`` or
    ``config.json``'s ``quantization_config`` (:mod:`mechq.quant.formats`). With ``model``, the
    checkpoint's quantized modules are checked against the model's architecture (a clear error
    names modules that do not belong to it or have other shapes), and the linear modules its
    ``dynamic`` rules skip are listed in :attr:`Variant.fp_modules` (without ``model``, they come
    from mechq's metadata file when there is one). An AWQ variant carries the norms AWQ rewrote
    (:attr:`Variant.norms`); they must all be present. A compressed-tensors checkpoint that
    quantizes input activations or the KV cache (W8A8 int8, FP8) carries that scheme as
    :attr:`Variant.act` (:func:`mechq.quant.formats.compressed.act_scheme`: static scales placed
    by ``model``'s layers, or by those its ``config.json`` describes), and is named
    ``"<weights>+<scheme>"`` as :func:`~mechq.quant.variants.with_activations` names one; FP8
    weights read from one have the method ``ct-fp8``.
    """
    from mechq.quant.formats import METHOD_OF, compressed, read_checkpoint

    ckpt = read_checkpoint(path)
    if model is not None:
        shapes = {m: tuple(layout.module_weight(model, m).shape) for m in layout.modules(model.cfg)}
        check_architecture(ckpt, shapes)
    qc = ckpt.quant_config
    fmt = qc["format_family"]
    meta_path = Path(path) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    quantizer = (qc.get("meta") or {}).get("quantizer") or []
    method = meta.get("method") or (
        "rtn" if any("rtn" in str(q) for q in quantizer) else METHOD_OF[fmt])
    bits, gs = int(qc["bits"]), int(qc.get("group_size", -1))
    sym, act = bool(qc.get("sym", True)), bool(qc.get("desc_act", False))
    rules = meta.get("dynamic") or qc.get("dynamic") or None
    if model is None:
        fp = meta.get("fp_modules") or {}
    else:
        fp = {m: s for m, s in _fp_modules(model, rules).items() if m not in ckpt.modules}
    norms = _awq_norms(ckpt, model) if fmt == "awq" else {}
    scheme = None
    if fmt == "compressed-tensors":
        if qc["format"] == compressed.FLOAT_QUANTIZED and not meta.get("method"):
            method = "ct-fp8"
        inputs, kv = compressed.declared_quantizers(qc["raw"], str(path))
        if inputs is not None or kv is not None:
            sites = (layout.sites(model.cfg) if model is not None
                     else compressed.config_sites(ckpt.hf_config))
            scheme = compressed.act_scheme(ckpt, sites, name=meta.get("act"))
    default = variant_name(method, bits, gs, sym, act, dynamic=rules)
    if scheme is not None:
        default = f"{default}+{scheme.name}"
    return Variant(
        name=name or meta.get("name") or default,
        method=method,
        bits=bits,
        group_size=gs,
        sym=sym,
        desc_act=act,
        modules=ckpt.modules,
        meta=dict(meta, path=str(path), quantize_config=qc, dynamic=rules, format=fmt),
        dynamic=rules,
        fp_modules={m: tuple(s) for m, s in fp.items()},
        norms=norms,
        act=scheme,
    )


def _awq_norms(ckpt, model: HookedTransformer | None) -> dict:
    """The norms an AWQ checkpoint rewrote (every norm before a quantized module). Without a
    model, every ``*norm*`` / ``ln_*`` tensor of a layer is taken."""
    from mechq.quant.formats.common import CheckpointError

    if model is None:
        return {k: v for k, v in ckpt.other.items() if ".layers." in k or ".h." in k
                if "norm" in k or ".ln_" in k}
    wanted = [n.tensor for n in layout.norm_sites(model.cfg)]
    missing = [t for t in wanted if t not in ckpt.other]
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: AWQ folds its scales into the norms before the quantized modules, "
            f"but {len(missing)} of them are not in the checkpoint, e.g. {missing[:3]}")
    return {t: ckpt.other[t] for t in wanted}
