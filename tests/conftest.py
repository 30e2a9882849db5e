"""Shared fixtures: real models, loaded once per test session."""

import contextlib
import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# every core, unless make test runs the notebooks beside the tests (then one thread each side)
torch.set_num_threads(int(os.environ.get("MECHQ_TEST_THREADS") or max(1, os.cpu_count() or 1)))


#: the cache the session's shared fixtures use, whatever a module's ``private_cache`` sets
#: while one of them is first made
SESSION_CACHE = os.environ.get("MECHQ_CACHE")


@contextlib.contextmanager
def session_cache():
    """``$MECHQ_CACHE`` as the session started with it, inside the block."""
    with pytest.MonkeyPatch.context() as mp:
        if SESSION_CACHE is None:
            mp.delenv("MECHQ_CACHE", raising=False)
        else:
            mp.setenv("MECHQ_CACHE", SESSION_CACHE)
        yield


@pytest.fixture(scope="session")
def tiny():
    """The GPT-2-architecture model mechq trained on the bundled facts."""
    import mechq

    return mechq.load_model("tiny-gpt2", device="cpu")


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (dequantized Q4_1) as a HookedTransformer, converted
    into (or read from) the session's cache even when a module with a private cache asks first."""
    import mechq

    with session_cache():
        return mechq.load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Many small forwards: one thread avoids oversubscribing shared cores (opt in per module
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """Variants made in this test module go to a cache of their own (opt in per module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MECHQ_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def tiny_w2(tiny):
    """An RTN 2-bit g128 variant of the tiny model (shared by several test modules)."""
    import mechq

    with session_cache():
        return mechq.quantize(tiny, "rtn", bits=2, group_size=128)


@pytest.fixture(scope="session")
def smol_gptq(smol):
    """GPTQ w4 / w2 g128 of SmolLM2 with the default calibration (seed 0): the demo's and the
    notebooks' checkpoints, made once (two GPTQ children side by side) or read from the cache.
    (GPTQ w8 is left to the demo: about 3 minutes more of the suite for a result RTN w8 and
    the tiny-model GPTQ tests already pin.)"""
    import mechq

    with session_cache():
        v4, v2 = mechq.quantize_many(smol, [mechq.Request("gptq", b) for b in (4, 2)],
                                     progress=False)
    return {4: v4, 2: v2}


@pytest.fixture(scope="session")
def facts():
    import mechq

    return mechq.bundled_facts()


def snapshot(model):
    """Clones of every parameter, to check bit-identical restores."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_equal(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), f"{n} differs from its snapshot"


#: fixtures that load the 135M-parameter models or run GPTQModel on them: a test that uses one is
#: ``slow`` (left out of ``make test-fast``, still run by ``make test``).
SLOW_FIXTURES = {"smol", "smol_gptq", "gemma", "gemma_model"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or "test_gemma" in item.nodeid
                or "[smol" in item.nodeid or "-smol" in item.nodeid):
            item.add_marker(pytest.mark.slow)


def edit_checkpoint(src, dst, config=None, tensors=None):
    """A copy of checkpoint folder ``src`` at ``dst`` with ``config(quantization_config)`` and
    ``tensors(dict)`` applied in place: the malformed files a reader must refuse."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        hf = json.loads((dst / "config.json").read_text())
        config(hf["quantization_config"])
        (dst / "config.json").write_text(json.dumps(hf))
    if tensors is not None:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file({k: x.contiguous() for k, x in t.items()}, dst / "model.safetensors")
    return dst
