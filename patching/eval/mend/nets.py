"""MEND's gradient transform: running normalisation, a residual low-rank MLP, per-matrix step sizes.

One `GradientTransform` per distinct weight shape, shared by every edited matrix of that shape;
which matrix it is working on selects a learned per-feature scale and shift (its "mode").
For a matrix W [out, in] with captured rows u [N, in] (inputs) and δ [N, out] (output gradients):

    x = concat(u, δ) -> (x - mean) / (std + 1e-7) -> two LRLinear layers -> (ũ, δ̃)
    ΔW = -α_W · Σ_t δ̃_t ũ_tᵀ          (minus: the original code's plus sign is a known bug)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn


class RunningStats(nn.Module):
    """Per-feature running mean and variance (Welford/Chan merge of whole batches, float64).

    Updated only in training mode; frozen at evaluation. Using them before at least two rows were
    seen raises, because NaN statistics would silently turn every edit into NaN.
    """

    # buffers, registered in __init__ (declared here for the type checker)
    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.count.item()
        total = n + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta**2 * (n * n_b / total)
        self.count.fill_(total)

    def initialised(self) -> bool:
        return self.count.item() >= 2 and bool(torch.isfinite(self.mean).all() and torch.isfinite(self.m2).all())

    def std(self) -> torch.Tensor:
        return (self.m2 / (self.count - 1)).clamp(min=0).sqrt()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialised():
            raise RuntimeError(
                "MEND normalisation statistics are not initialised (no training rows seen); "
                "an untrained or corrupt editor would make every edit NaN"
            )
        mean, std = self.mean.to(x.dtype), self.std().to(x.dtype)
        return (x - mean) / (std + 1e-7)


class LRLinear(nn.Module):
    """h = x + relu(scale[m] ⊙ (U V x + b) + shift[m]), U = 0 at init: the identity.

    V is drawn N(0, 1/d) (MEND: N(0, 1)) so that Vx has unit scale and ordinary Adam step sizes
    apply. The relu lets the gradient through at exactly 0 (`torch.where(pre >= 0, ...)`): at init
    every pre-activation IS 0, and torch >= 2 gives relu and clamp a zero gradient there, which
    would freeze U and b forever (MEND relied on torch 1.x clamp's gradient of 1 at the boundary).
    """

    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        r = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, r))
        self.v = nn.Parameter(torch.randn(r, dim) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (x @ self.v.T) @ self.u.T + self.bias
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return x + torch.where(pre >= 0, pre, torch.zeros_like(pre))


class GradientTransform(nn.Module):
    """The editor for one weight shape [d_out, d_in]; `mode` = which matrix of that shape."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_modes: int, n_layers: int = 2):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.stats = RunningStats(d_in + d_out)
        self.mlp = nn.ModuleList(LRLinear(d_in + d_out, rank, n_modes) for _ in range(n_layers))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([u, delta], dim=-1).float()
        if self.training:
            self.stats.update(x)
        h = self.stats.normalise(x)
        for layer in self.mlp:
            h = layer(h, mode)
        return h[:, : self.d_in], h[:, self.d_in :]


def shape_key(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]}"


class MendNet(nn.Module):
    """All editors of one model: one GradientTransform per weight shape, one step size per matrix.

    `names` and `shapes` ([out, in]) list the edited matrices in a fixed order; a matrix's mode is
    its index among the matrices of its shape.
    """

    def __init__(
        self, names: Sequence[str], shapes: Sequence[Sequence[int]], rank: int, edit_lr: float = 1e-4, n_layers: int = 2
    ):
        super().__init__()
        if len(names) != len(shapes) or not names:
            raise ValueError("MendNet needs one [out, in] shape per edited matrix")
        self.names = list(names)
        self.shapes = [tuple(int(s) for s in sh) for sh in shapes]
        self.modes: list[int] = []
        counts: dict[str, int] = {}
        for sh in self.shapes:
            key = shape_key(sh)
            self.modes.append(counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
        first = {shape_key(sh): sh for sh in reversed(self.shapes)}
        self.transforms = nn.ModuleDict(
            {key: GradientTransform(first[key][1], first[key][0], rank, counts[key], n_layers) for key in counts}
        )
        self.edit_lrs = nn.Parameter(torch.full((len(names),), float(edit_lr)))

    def editor_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n != "edit_lrs"]

    def stats_initialised(self) -> bool:
        return all(cast(GradientTransform, t).stats.initialised() for t in self.transforms.values())

    def updates(self, rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """ΔW per matrix name from its captured (u [N, in], δ [N, out]) rows; zeros where no rows."""
        out: dict[str, torch.Tensor] = {}
        for i, (name, shape) in enumerate(zip(self.names, self.shapes, strict=True)):
            u, delta = rows.get(name, (None, None))
            if u is None or u.shape[0] == 0:
                out[name] = torch.zeros(shape, device=self.edit_lrs.device)
                continue
            u_t, d_t = self.transforms[shape_key(shape)](u, delta, self.modes[i])
            out[name] = -self.edit_lrs[i] * (d_t.T @ u_t)  # Σ_t δ̃_t ũ_tᵀ: [out, in]
        return out
