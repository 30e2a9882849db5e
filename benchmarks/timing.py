"""What the benchmarks share: wall-clock timing of one call."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()``'s result and its wall-clock seconds, rounded to a tenth."""
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 1)
