"""GPTQ through GPTQModel, the implementation the paper used, in a child process.

mechq does not re-implement GPTQ: it hands the model's Hugging Face directory and the calibration
tokens to GPTQModel, lets it quantize layer by layer and save a standard GPTQ checkpoint, and then
reads that checkpoint back with its *own* dequantizer (:mod:`mechq.quant.formats.gptq`).

Each run is a child process (``python gptq_child.py JOB.json``), for three reasons:

- **the same checkpoint under any thread count.** GPTQ's error feedback turns one flipped
  rounding into many: the same calibration quantized with 1 and with 2 torch threads gave
  different 4-bit codes for 13.6 % of SmolLM2's weights (float sums in another order flip a code at
  a rounding boundary, and each later column of that row absorbs a different error). The child
  always runs with ``threads`` torch threads (default 1), whatever the parent uses;
- **parallel variants.** Much of GPTQModel's CPU time is a Python loop over weight columns, so
  two one-thread runs on two cores finish about twice as fast as one after the other
  (:func:`run_gptq_jobs`);
- **a quiet parent.** GPTQModel prints tens of thousands of lines; the child's stdout and stderr
  go to a log file, its environment variables and its ``./logs`` stay in the child.

On CPU the model is loaded in float32 (GPTQModel's CPU default is bfloat16, which rounds every
weight before quantizing it and is emulated, slowly, on CPUs without bf16 instructions).
GPTQModel JIT-compiles a C++ packer into ``~/.cache/gptqmodel`` on its first run (~30 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mechq.facts.calibration import Calibration


CHILD = Path(__file__).with_name("gptq_child.py")


class GPTQError(RuntimeError):
    """GPTQModel failed; the message names the log file and quotes its end."""


@dataclass
class GPTQJob:
    """One GPTQModel run: source weights, output directory, settings and calibration tokens.
    ``dynamic`` (per-module rules, :mod:`mechq.quant.dynamic`) goes to GPTQModel's
    ``QuantizeConfig(dynamic=...)`` as it is; GPTQModel applies it and saves it in the
    checkpoint's ``quantize_config.json``, where mechq's reader finds it."""

    hf_dir: str
    out_dir: str
    tokens: list[list[int]]
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    batch_size: int = 16
    dynamic: dict | None = None
    log: str = ""
    extra: dict = field(default_factory=dict)
    method: str = "gptq"
    env: dict = field(default_factory=dict)  # environment variables set in the child


def make_job(hf_dir: str | Path, out_dir: str | Path, calibration: Calibration, *, bits: int,
             group_size: int, sym: bool, desc_act: bool, device: str = "cpu",
             threads: int = 1, dynamic: dict | None = None, log: str | Path = "",
             method: str = "gptq", env: dict | None = None) -> GPTQJob:
    out_dir = Path(out_dir)
    return GPTQJob(str(hf_dir), str(out_dir), calibration.tokens, bits, group_size, sym, desc_act,
                   device=device, dtype=_dtype(method, device), threads=threads,
                   dynamic=dynamic, log=str(log or out_dir.with_suffix(".log")), method=method,
                   env=dict(env or {}))


def _dtype(method: str, device: str) -> str:
    """GPTQ on CPU in float32 (see the module docstring). AWQ in bfloat16: GPTQModel 7.6 packs
    AWQ modules only from float16 / bfloat16 weights ("AwqTorchLinear only supports
    [torch.float16, torch.bfloat16]"), and float16 overflows on CPU more easily."""
    if method == "awq":
        return "bfloat16" if device == "cpu" else "auto"
    return "float32" if device == "cpu" else "auto"


def run_gptq(job: GPTQJob, verbose: bool = False) -> Path:
    """Run one job in a child process; raise :class:`GPTQError` (with the log's end) on failure.
    The child's output goes to ``job.log``; with ``verbose`` it is also echoed to stderr, live."""
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = Path(job.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    spec = out / "gptq_job.json"
    spec.write_text(json.dumps(asdict(job)))
    work = log.parent / "gptqmodel"  # GPTQModel writes ./logs/ into its working directory
    work.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(job.threads), MKL_NUM_THREADS=str(job.threads),
        # GPTQModel's loader asks its CPU pool for 2 workers and refuses a pool of 1.
        GPTQMODEL_CPU_WORKERS=str(max(2, job.threads)),
        TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **job.env,
    )
    cmd = [sys.executable, str(CHILD), str(spec)]
    with log.open("w") as fh:
        if verbose:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env, cwd=work, text=True, errors="replace")
            for line in proc.stdout:
                fh.write(line)
                sys.stderr.write(line)
            rc = proc.wait()
        else:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                cwd=work).returncode
    spec.unlink(missing_ok=True)
    if rc != 0:
        tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-15:]
        raise GPTQError(f"GPTQModel exited with code {rc}; full log: {log}\n"
                        + "\n".join(tail))
    return out


def run_gptq_jobs(jobs: Sequence[GPTQJob], parallel: int = 1,
                  on_done: Callable[[GPTQJob, float], None] | None = None,
                  verbose: bool = False) -> list[Path]:
    """Run jobs, ``parallel`` at a time (each a child process); results in input order.
    ``on_done(job, seconds)`` is called as each one finishes."""
    def one(job: GPTQJob) -> Path:
        t0 = time.perf_counter()
        path = run_gptq(job, verbose=verbose)
        if on_done is not None:
            on_done(job, time.perf_counter() - t0)
        return path

    if parallel <= 1 or len(jobs) <= 1:
        return [one(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, jobs))
