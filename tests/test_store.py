"""The results store's JSON side: write_result / read_result round trip, provenance, atomicity."""

import json
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import torch

import mechq
from mechq.engine import store
from mechq.engine.store import Store, atomic_write, machine, read_result, write_result

DATA = {"model": "tiny-gpt2", "accuracy": 0.4801, "n": 404, "ok": True, "missing": None,
        "bits": [8, 4, 3, 2], "settings": {"group_size": 128, "seeds": [0, 1]}}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_keeps_data_and_adds_provenance(tmp_path):
    path = write_result(tmp_path / "sub" / "r.json", DATA, command="python scripts/x.py --n 1")
    assert path == tmp_path / "sub" / "r.json"
    got = read_result(path)
    assert got.data == DATA
    assert list(got.data) == list(DATA)  # keys keep their order
    prov = got.provenance
    assert prov["command"] == "python scripts/x.py --n 1"
    assert prov["mechq"] == mechq.__version__
    assert datetime.fromisoformat(prov["date"]).tzinfo is not None
    assert prov["machine"] == machine()
    # the file is plain JSON: data at the top level, provenance beside it
    raw = json.loads(path.read_text())
    assert raw["accuracy"] == 0.4801 and "provenance" in raw
    assert leftovers(path.parent) == []


def test_values_json_cannot_hold_are_written_as_text(tmp_path):
    path = write_result(tmp_path / "r.json", {"out": Path("/a/b")}, command="c")
    assert read_result(path).data == {"out": "/a/b"}


def test_bad_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="provenance"):
        write_result(tmp_path / "r.json", {"provenance": 1}, command="c")
    with pytest.raises(TypeError, match="mapping"):
        write_result(tmp_path / "r.json", [1, 2], command="c")
    assert not (tmp_path / "r.json").exists()


def test_a_file_without_provenance_reads_with_none(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"a": 1}))
    assert read_result(tmp_path / "old.json") == ({"a": 1}, None)
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="no JSON object"):
        read_result(tmp_path / "list.json")


def test_machine_records_cpu_threads_versions_and_code_path_variables(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    m = machine()
    assert m["cores"] >= 1 and m["torch_threads"] == torch.get_num_threads()
    assert m["torch"] == torch.__version__ and m["cpu"]
    assert m["MKL_CBWR"] == "AVX2" and "ATEN_CPU_CAPABILITY" not in m
    line = store.machine_text(m)
    threads = "1 torch thread," if m["torch_threads"] == 1 else f"{m['torch_threads']} torch threads"
    assert line.startswith(f"{m['cpu']}, {m['cores']} cores, {threads}")
    assert "MKL_CBWR=AVX2" in line
    assert ", 1 torch thread, " in store.machine_text({**m, "torch_threads": 1})
    assert ", 3 torch threads, " in store.machine_text({**m, "torch_threads": 3})


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = write_result(tmp_path / "r.json", DATA, command="first")
    before = path.read_bytes()
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):  # fails while serialising
        write_result(path, {"x": circular}, command="second")
    assert path.read_bytes() == before

    def no_rename(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(store.os, "replace", no_rename)  # fails at the very last step
    with pytest.raises(OSError, match="disk gone"):
        write_result(path, {"other": 1}, command="third")
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_atomic_write_is_all_or_nothing(tmp_path):
    path = tmp_path / "f.txt"
    with pytest.raises(RuntimeError):
        with atomic_write(path) as fh:
            fh.write("half")
            raise RuntimeError("interrupted")
    assert not path.exists() and leftovers(tmp_path) == []
    with atomic_write(path) as fh:
        fh.write("whole")
        assert not path.exists()  # nothing visible until the block ends
    assert path.read_text() == "whole"
    with atomic_write(path, "wb") as fh:
        fh.write(b"bytes")
    assert path.read_bytes() == b"bytes"
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(path, "a"):
            pass
    assert leftovers(tmp_path) == []


def test_store_rewrites_a_cut_off_file_atomically(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("unit,value\n1,0.5\n2,0.25\n3,0.1")  # the last line was cut off
    s = Store(path, {"unit": int, "value": float})
    assert s.rows["unit"].tolist() == [1, 2]
    assert path.read_text() == "unit,value\n1,0.5\n2,0.25\n"
    assert leftovers(tmp_path) == []
    s.add(pd.DataFrame({"unit": [3], "value": [0.125]}))
    assert Store(path, {"unit": int, "value": float}).rows["unit"].tolist() == [1, 2, 3]
