"""Forward time with and without an edit's additions, measured side by side.

On a shared CPU, absolute times drift by more than the overhead being measured; rounds that
alternate the two forwards see the same drift, and the ratio of their medians cancels it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch


@torch.no_grad()
def alternating(
    forward: Callable[[], Any], aside: Callable[[], AbstractContextManager[Any]], rounds: int
) -> tuple[float, float, Any]:
    """(median seconds of forward() as it is, median seconds inside `aside()`, the last output of
    forward() as it is), after one warm-up call, over `rounds` alternating rounds."""
    forward()  # warm-up
    kept: list[float] = []
    without: list[float] = []
    out: Any = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = forward()
        kept.append(time.perf_counter() - t0)
        with aside():
            t0 = time.perf_counter()
            forward()
            without.append(time.perf_counter() - t0)
    return statistics.median(kept), statistics.median(without), out
