"""Where a sparse layer's inference forward sends each row's chosen blocks, decided without waiting for the device.

A long forward without autograd at a small group takes the chosen blocks block-major (by_block.py)
or over union tiles, by how much neighbouring tokens' lists differ (parallel.lists_spread). The
spread is measured on the device; reading it back at once would make the host wait in the middle
of a chunked prefill, and every such wait leaves the GPU idle until the host has queued work again
(H100, benchmarks/notes-long-context.md run 41: 0.37 s of a 256K prefill of the 8B hybrid, one
wait per sparse layer and chunk). A Router, one per sparse layer, sends each measurement to the
host without waiting and routes by the newest one that has arrived: in a chunked prefill, the
previous chunk's. Its first call has none yet and waits for its own.
"""
from __future__ import annotations

from typing import Callable

import torch


class Router:
    """One sparse layer's spread measurements on their way to the host (module docstring)."""

    def __init__(self):
        self.spread: float | None = None  # the newest measurement on the host
        self._pending: torch.cuda.Event | None = None  # marks the copy of a measurement on its way
        self._host: torch.Tensor | None = None  # pinned, where it lands (allocating it may wait)

    def __getstate__(self):  # a copy (deepcopy of a model, pickling) starts afresh: events do not copy
        return {}

    def __setstate__(self, state):
        self.__init__()

    def spread_now(self, measure: Callable[[], torch.Tensor]) -> float:
        """The newest spread on the host. `measure()` gives this call's, a 0-d float32 tensor: it is
        taken unless an earlier one is still on its way, and waited for only while none has arrived."""
        if self._pending is not None and self._pending.query():
            self.spread, self._pending = float(self._host), None
        if self._pending is None:
            measured = measure()
            if not measured.is_cuda:
                self.spread = float(measured)
            elif self.spread is None:  # the first call waits, and pins where the later ones land
                self.spread = float(measured)
                self._host = torch.empty((), dtype=torch.float32, pin_memory=True)
            else:
                self._host.copy_(measured, non_blocking=True)
                self._pending = torch.cuda.Event()
                self._pending.record()
        return self.spread
