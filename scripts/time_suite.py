"""How long the test suite takes from a clean clone: `make test-fast` and `make test`.

Clones this repository (HEAD) into a scratch folder with ../shared beside it, as CI does, and
times each whole command: first `make test` with an empty mechq cache (``MECHQ_CACHE``: no
converted GGUF, no quantized variant) and no venv, so the venv, the install, the Gemma wheels and
pytest all count; then `make test-fast` in the same clone, as the development loop runs it (venv
and cache warm). ``--threads 1`` sets ``OMP_NUM_THREADS=1`` as the release check does. Writes
benchmarks/results/suite.json (about 20 minutes on 2 cores).

    .venv/bin/python scripts/time_suite.py [--threads 1] [--targets test test-fast]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from mechq.engine.store import write_result

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "suite.json"


def run_target(repo: Path, target: str, env: dict) -> dict:
    """``make TARGET`` in ``repo``: minutes, exit code and pytest's summary line."""
    t0 = time.perf_counter()
    res = subprocess.run(["make", "-C", str(repo), target], env=env, capture_output=True,
                         text=True)
    minutes = (time.perf_counter() - t0) / 60
    # make test prints two pytest summaries (the tests', then the notebooks', which ran beside
    # them): both are kept, and the longer side is the pytest time
    summary = [l.strip("= ") for l in res.stdout.splitlines() if re.search(r"\d+ passed", l)]
    secs = [float(m.group(1)) for l in summary if (m := re.search(r"in ([\d.]+)s", l))]
    if res.returncode:
        (repo.parent / f"{target}.log").write_text(res.stdout + res.stderr)
    return dict(target=target, minutes=round(minutes, 2), returncode=res.returncode,
                summary=" | ".join(summary) if summary else res.stdout[-2000:],
                pytest_minutes=round(max(secs) / 60, 2) if secs else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs")
    ap.add_argument("--targets", nargs="+", default=["test", "test-fast"])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mechq-suite-"))
    repo = scratch / "mechq"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    shared = ROOT.parent / "shared"
    if shared.exists():
        (scratch / "shared").symlink_to(shared.resolve())
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, MECHQ_CACHE=str(scratch / "cache"), CI="true")
    env.pop("VIRTUAL_ENV", None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    runs = []
    for target in args.targets:
        print(f"make {target} …", flush=True)
        runs.append(run_target(repo, target, env))
        print(f"  {runs[-1]['minutes']} min: {runs[-1]['summary']}", flush=True)
    command = "python scripts/time_suite.py " + (f"--threads {args.threads} " if args.threads
                                                 else "") + "--targets " + " ".join(args.targets)
    write_result(args.out, dict(commit=commit, threads=args.threads, cold_cache=True,
                                runs=runs), command=command)
    if all(r["returncode"] == 0 for r in runs):
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"a target failed: its log and the clone are kept in {scratch}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
