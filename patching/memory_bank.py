"""The activation memory M as one pre-allocated tensor that grows by doubling.

Appending a few rows per accepted edit must not copy the whole memory every time (a list
concatenated at every step would), and `view()` must be a cheap slice for `M @ k`.
"""

from __future__ import annotations

import torch


class MemoryBank:
    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, capacity: int = 4096):
        self._data = torch.empty(capacity, dim, dtype=dtype, device=device)  # [capacity, d]
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def device(self) -> torch.device:
        return self._data.device

    def append(self, rows: torch.Tensor) -> None:
        """rows [m, d] -> appended at the end; the buffer doubles when full."""
        m = int(rows.shape[0])
        if self._n + m > self._data.shape[0]:
            cap = max(self._data.shape[0] * 2, self._n + m)
            grown = torch.empty(cap, self._data.shape[1], dtype=self._data.dtype, device=self._data.device)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n : self._n + m] = rows.detach().to(self._data)
        self._n += m

    def view(self) -> torch.Tensor:
        """The filled rows [n, d] (a view, no copy)."""
        return self._data[: self._n]

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self._n:
            raise ValueError(f"cannot truncate memory of {self._n} rows to {n}")
        self._n = n
