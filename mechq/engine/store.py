"""Resumable results: an append-only CSV of finished units of work.

A long analysis is a loop over *units* of work: a prompt of a patching sweep, a ``k`` of the
first-domino sweep, a component setting. A :class:`Store` appends each unit's rows to a CSV as
soon as they are computed (flushed and fsynced), so an interruption loses at most the unit being
written; a re-run reads the file back and skips the units already done.

- **Typed columns**: the store knows every column and its type (``int``, ``float``, ``bool`` or
  ``str``) and writes them in that order. The file is read as text and converted column by
  column; a row that does not convert is dropped.
- **Cut-off writes**: a last line without its newline was cut off mid-write and is dropped.
  Whatever is dropped on reading (also rows the caller's ``keep`` rule rejects, e.g. a prompt
  whose rows are not all there) is removed from the file too, by an atomic rewrite.
- **Runs**: one file may hold several runs (variants, fact sets, sweeps); ``where`` selects the
  rows of this run (column → value, or a collection of values).
- **Done units**: :meth:`Store.done` gives the units whose rows cover every item asked for
  (:func:`complete`).

Without a path the store only collects its frames in memory, so an analysis has one code path.

Results that are one record rather than rows (a measurement script's summary, a run's settings)
are JSON files written by :func:`write_result` and read by :func:`read_result`: the data plus a
``provenance`` record (the command, mechq's version, the date and the :func:`machine`), written
atomically (:func:`atomic_write`: a reader sees the old file or the new one, never a part).
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import platform
import secrets
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, NamedTuple

import pandas as pd
import torch

from mechq.vocab import CODE_PATH_VARIABLES

_DTYPES = {int: "int64", float: "float64", bool: bool}


def typed(df: pd.DataFrame, types: Mapping[str, type]) -> pd.DataFrame:
    """``df`` with its columns converted to ``types``; rows with a value that does not convert
    (text that is no number, a missing value) dropped. ``str`` columns are left as they are."""
    df = df.copy()
    checked = [c for c, t in types.items() if t in _DTYPES]
    for c in checked:
        if types[c] is bool:
            df[c] = df[c].map({True: True, False: False, "True": True, "False": False})
        else:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    df = df[df[checked].notna().all(axis=1)]
    return df.astype({c: _DTYPES[types[c]] for c in checked})


def complete(rows: pd.DataFrame, unit: Sequence[str], items: Sequence[str], n: int | str
             ) -> pd.Series:
    """Which rows belong to a complete unit: one whose rows hold ``n`` distinct ``items``.

    ``unit``: the columns naming a unit; ``items``: the columns naming its rows; ``n``: the
    number of items a complete unit has, or the column that says so on every row.
    """
    unit, items = list(unit), list(items)
    have = rows.drop_duplicates(unit + items).groupby(unit).size().rename("_have")
    got = rows.join(have, on=unit)["_have"]
    return got == (rows[n] if isinstance(n, str) else n)


class Store:
    """This run's rows of an append-only CSV (or of memory only, ``path=None``).

    ``types``: every column of the file, in order, with its type. ``keep``: the rows of the
    whole file worth keeping (called on the typed rows); ``where``: this run's rows.
    :attr:`rows` holds this run's rows read from disk, :meth:`add` appends a new frame.
    """

    def __init__(self, path: str | os.PathLike | None, types: Mapping[str, type], *,
                 where: Mapping[str, object] | None = None,
                 keep: Callable[[pd.DataFrame], pd.DataFrame] | None = None):
        self.path = Path(path) if path is not None else None
        if self.path is not None and self.path.suffix.lower() != ".csv":
            raise ValueError(f"out_path must be a .csv file, got {self.path}.")
        self.types = dict(types)
        self.added: list[pd.DataFrame] = []
        rows = self._read(keep) if self.path is not None else self._empty()
        for col, val in (where or {}).items():
            if isinstance(val, Collection) and not isinstance(val, str):
                rows = rows[rows[col].astype(str).isin([str(v) for v in val])]
            else:
                rows = rows[rows[col].astype(str) == str(val)]
        self.rows = rows

    def _empty(self) -> pd.DataFrame:
        return typed(pd.DataFrame(columns=list(self.types)), self.types)

    def _read(self, keep) -> pd.DataFrame:
        """Typed rows on disk; rewrites the file when anything was dropped."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return self._empty()
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]  # a line without its newline was cut off
        if not whole:
            raw = pd.DataFrame(columns=list(self.types))
        else:
            raw = pd.read_csv(io.BytesIO(whole), dtype=str, na_filter=False,
                              on_bad_lines="skip")
        missing = [c for c in self.types if c not in raw.columns]
        if missing:
            raise ValueError(f"{self.path} was not written by this analysis (no columns "
                             f"{missing[:4]}); give another out_path.")
        rows = typed(raw[list(self.types)], self.types)
        if keep is not None:
            rows = keep(rows)
        if len(rows) != len(raw) or len(whole) != len(data) or list(raw.columns) != list(
                self.types):
            with atomic_write(self.path, newline="") as fh:
                rows.to_csv(fh, index=False)
        return rows

    def done(self, unit: str, items: str | Sequence[str], n: int | str) -> set:
        """Values of the ``unit`` column whose rows on disk are complete (:func:`complete`)."""
        items = [items] if isinstance(items, str) else items
        return set(self.rows.loc[complete(self.rows, [unit], items, n), unit])

    def add(self, frame: pd.DataFrame) -> None:
        """Keep ``frame`` and append it to the file (flushed and fsynced)."""
        frame = frame[list(self.types)]
        self.added.append(frame)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            frame.to_csv(fh, index=False, header=header)
            fh.flush()
            os.fsync(fh.fileno())

    def frame(self) -> pd.DataFrame:
        """This run's rows: those read from disk, then those added."""
        parts = [f for f in [self.rows, *self.added] if len(f)]
        return pd.concat(parts, ignore_index=True) if parts else self._empty()


# --------------------------------------------------------------------------------------------
# One-record results: JSON with its provenance
# --------------------------------------------------------------------------------------------



@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kw) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on leaving the block it is flushed,
    fsynced and renamed onto ``path`` (``os.replace``, atomic on one file system). If the block
    raises, the temporary file is removed and ``path`` keeps its old content (or stays absent).
    ``mode`` is ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "w":
        open_kw.setdefault("encoding", "utf-8")
    # a fresh name in the same folder (same file system), created like any file (umask)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **open_kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def machine() -> dict[str, Any]:
    """The machine a result was computed on: ``cpu`` (the model name in ``/proc/cpuinfo``, else
    what ``platform`` says), ``cores``, ``torch_threads``, ``torch`` and ``python`` versions,
    ``gpu`` (only with CUDA) and each of :data:`CODE_PATH_VARIABLES` that is set."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    out.update({k: os.environ[k] for k in CODE_PATH_VARIABLES if os.environ.get(k)})
    return out


def machine_text(m: Mapping[str, Any] | None = None) -> str:
    """One line for a :func:`machine` record (default: this machine), e.g. ``"AMD EPYC, 2 cores,
    2 torch threads; torch 2.13.0+cpu, Python 3.11.7"``."""
    m = machine() if m is None else m
    extra = "".join(f", {k}={m[k]}" for k in CODE_PATH_VARIABLES if k in m)
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    threads = f"{m['torch_threads']} torch thread" + ("" if m["torch_threads"] == 1 else "s")
    return (f"{m['cpu']}, {m['cores']} cores, {threads}{gpu}{extra}; "
            f"torch {m['torch']}, Python {m['python']}")


def _mechq_version() -> str:
    root = sys.modules.get("mechq")  # not imported here: the package root sits above every layer
    if getattr(root, "__version__", None):
        return root.__version__
    try:
        return importlib.metadata.version("mechq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def provenance(command: str) -> dict[str, Any]:
    """Where a result comes from: ``command`` (what to run to make it again), ``mechq`` (the
    version), ``date`` (UTC, ISO 8601) and ``machine`` (:func:`machine`)."""
    return {"command": command, "mechq": _mechq_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine()}


class Result(NamedTuple):
    """A result file read back: its ``data`` and its ``provenance`` (None for a file written
    without one)."""

    data: dict[str, Any]
    provenance: dict[str, Any] | None


def write_result(path: str | os.PathLike, data: Mapping[str, Any], *, command: str) -> Path:
    """Write ``data`` (a JSON object; values JSON cannot hold are written as ``str``) to
    ``path`` with a ``provenance`` key (:func:`provenance` of ``command``), atomically
    (:func:`atomic_write`). Returns the path. ``data`` may not have a ``provenance`` key."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a result is a mapping (a JSON object), got {type(data).__name__}.")
    if "provenance" in data:
        raise ValueError("'provenance' is written by write_result; rename that key of data.")
    text = json.dumps({**data, "provenance": provenance(command)}, indent=1, default=str)
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write(text + "\n")
    return path


def read_result(path: str | os.PathLike) -> Result:
    """Read a JSON result: ``Result(data, provenance)``, ``data`` being what
    :func:`write_result` was given (keys in their order)."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds no JSON object, so no mechq result.")  # noqa: TRY004
    prov = record.pop("provenance", None)
    return Result(record, prov)
