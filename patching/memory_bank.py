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


class RowBank:
    """Aligned tensors that grow together by whole rows (same first dimension), doubling like
    MemoryBank: the retention rows of every accepted edit, appended at each commit. Concatenating
    them anew at each commit would copy every row every time (tens of MB per edit at 10,000 edits);
    here an append copies only the new rows, and a row's ffn may be updated in place."""

    def __init__(self, device: torch.device, capacity: int = 1024):
        self._device = device
        self._capacity = capacity
        self._data: dict[str, torch.Tensor] = {}  # name -> [capacity, ...]
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, rows: dict[str, torch.Tensor]) -> None:
        """rows: name -> [m, ...] (the same names every time) -> appended at the end."""
        m = int(next(iter(rows.values())).shape[0])
        if not self._data:
            self._data = {
                k: torch.empty((max(self._capacity, m), *v.shape[1:]), dtype=v.dtype, device=self._device)
                for k, v in rows.items()
            }
        if set(rows) != set(self._data):
            raise ValueError(f"rows {sorted(rows)} do not match the bank's {sorted(self._data)}")
        if self._n + m > next(iter(self._data.values())).shape[0]:
            cap = max(next(iter(self._data.values())).shape[0] * 2, self._n + m)
            for k, old in self._data.items():
                grown = torch.empty((cap, *old.shape[1:]), dtype=old.dtype, device=old.device)
                grown[: self._n] = old[: self._n]
                self._data[k] = grown
        for k, v in rows.items():
            self._data[k][self._n : self._n + m] = v.detach().to(self._data[k])
        self._n += m

    def view(self) -> dict[str, torch.Tensor]:
        """The filled rows of every tensor (views: writing into one writes into the bank)."""
        return {k: v[: self._n] for k, v in self._data.items()}

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self._n:
            raise ValueError(f"cannot truncate {self._n} rows to {n}")
        self._n = n
