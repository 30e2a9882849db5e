"""Processes sharing one cache make each entry once: the lock orders them, and two processes
quantizing the same variant at once both get it, from one cache directory."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mechq
from mechq.models.load import cache_lock
from mechq.quant.formats.common import META_FILE

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_lock_orders_two_processes(tmp_path):
    log = tmp_path / "log"
    entry = tmp_path / "entry"
    holder = _python(f"""
        import time
        from pathlib import Path
        from mechq.models.load import cache_lock
        log = Path({str(log)!r})
        with cache_lock(Path({str(entry)!r})):
            log.write_text("A-start\\n")
            time.sleep(1.0)
            with log.open("a") as fh:
                fh.write("A-end\\n")
        """, dict(os.environ))
    for _ in range(600):  # until the other process holds the lock (its import takes seconds)
        if log.exists() or holder.poll() is not None:
            break
        time.sleep(0.05)
    assert log.exists(), holder.communicate()[0]
    with cache_lock(entry):
        with log.open("a") as fh:
            fh.write("B\n")
    assert holder.wait(60) == 0
    # B could only write once A had released the lock, so A's end comes before B
    assert log.read_text().splitlines() == ["A-start", "A-end", "B"]


def test_two_processes_quantizing_one_variant_share_one_entry(tmp_path):
    env = dict(os.environ, MECHQ_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    code = """
        import json, mechq
        m = mechq.load_model("tiny-gpt2", device="cpu")
        v = mechq.quantize(m, "rtn", bits=3, group_size=32)
        print(json.dumps(dict(path=str(v.meta["path"]), bits=v.avg_bits)))
        """
    procs = [_python(code, env) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    got = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert got[0] == got[1]
    made = [d for d in (tmp_path / "cache" / "variants").iterdir() if d.is_dir()]
    assert [d.name for d in made] == [Path(got[0]["path"]).name]  # one entry, no leftovers
    assert (made[0] / META_FILE).exists()
    tiny = mechq.load_model("tiny-gpt2", device="cpu")
    again = mechq.load_variant(made[0], model=tiny)
    assert again.avg_bits == got[0]["bits"]
