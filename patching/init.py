"""Initial neuron weights: the reference's, and a max-margin start that usually needs no steps.

reference: k = q/|q|^2, b = 0 (pre-activation on the edit exactly 1), v small and random.

fisher (default): as margin, with the key direction whitened by the memory's covariance (see
`whitening`).

margin: the same key direction as the reference, taken from the memory mean mu (the last-layer FFN
inputs of a trained model share a large common component, so the raw q is close to almost every
memory row), scaled and biased so that the pre-activation is +1 on the edit and -1 on the closest
memory row: the threshold sits half-way between them. v points along the direction that lowers
the edit loss fastest, with the smallest length (of a doubling series) that makes the edit right.
When the memory already satisfies the stop rule at this point, training takes zero steps; when a
memory row is as close as the edit itself, the neuron falls back to the reference key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F

from patching.config import TrainConfig
from patching.layer import activate

Tail = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # v length, in units of the FFN output's norm


def reference_keys(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, d] -> keys [n, d], biases [n] with q_i . k_i + b_i = 1."""
    return q / q.pow(2).sum(-1, keepdim=True), torch.zeros(q.shape[0], dtype=q.dtype, device=q.device)


# the whitening's ridge, relative to the mean variance
RIDGE = 1e-2


def whitening(memory: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean mu [d] and regularised inverse covariance P [d, d] of the memory rows.

    P (q - mu) is the Fisher direction separating one input from the memory distribution: it
    discounts the directions every input shares and weighs the rare ones (the entity, the claim),
    which leaves a far larger margin to the closest memory row (zsRE: its activation drops from
    0.92 to 0.49 of the edit's) and lets paraphrases of the edit fire. ridge is relative to the
    mean variance and keeps P well conditioned.
    """
    mu = memory.mean(dim=0)
    x = memory.float() - mu.float()
    cov = x.T @ x / max(1, x.shape[0] - 1)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    precision = torch.linalg.inv(cov + ridge * cov.diagonal().mean() * eye)
    return mu, precision.to(memory.dtype)


def margin_keys(
    q: torch.Tensor,
    memory: torch.Tensor,
    threshold: float = 0.5,
    whiten: tuple[torch.Tensor, torch.Tensor] | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, d], memory [N, d] -> keys, biases with pre-activation +1 on q_i.

    The direction is (q - mu), or P (q - mu) with `whiten` = (mu, P). The bias puts the firing
    threshold at `threshold` of the way from the closest memory row to the edit (0.5: half-way,
    so the closest memory row sits at -1 when threshold is 0.5).

    rows [C, n, d] (C >= 1): every row neuron i must fire on, the edit's and its copies' (the
    edit behind context prefixes, in a chat, in other words). The direction is then taken from
    their centroid, and +1 and the threshold from the weakest of them, so that at the start the
    neuron already fires on all of them where the memory allows (trainer.init_from = "copies").
    """
    if memory.shape[0] == 0:
        return reference_keys(q)
    mu = memory.mean(dim=0) if whiten is None else whiten[0]  # [d]
    u = (q if rows is None else rows.mean(dim=0)) - mu  # [n, d]
    direction = u if whiten is None else u @ whiten[1]  # P is symmetric
    k0 = direction / (u * direction).sum(-1, keepdim=True)  # (centroid_i - mu) . k0_i = 1
    # (memory - mu) @ k0 without materialising memory - mu
    m_max = (memory @ k0.T - (mu * k0).sum(-1)).max(dim=0).values  # [n] closest memory row, in edit units
    top = torch.ones_like(m_max)  # [n] where the neuron's +1 goes: the edit (or the rows' centroid)
    if rows is not None:
        weakest = ((rows - mu) * k0[None]).sum(-1).min(dim=0).values  # [n] in the same units
        # +1 at the weakest row when the memory leaves room below it; else at the centroid, and
        # training pulls the rest up as far as the memory margins allow
        top = torch.where(weakest > m_max + 1e-3, weakest, top)
    c = m_max + threshold * (top - m_max)
    s = 1.0 / (top - c)
    keys = k0 * s[:, None]
    biases = -s * ((mu * k0).sum(-1) + c)
    ref_k, ref_b = reference_keys(q)
    hopeless = m_max >= top - 1e-3  # a memory row at least as close as the edit: no margin to place
    keys[hopeless], biases[hopeless] = ref_k[hopeless], ref_b[hopeless]
    return keys, biases


@torch.enable_grad()
def descent_direction(
    ffn: torch.Tensor, residual: torch.Tensor, targets: torch.Tensor, anchors: torch.Tensor, tail: Tail
) -> torch.Tensor:
    """Unit directions [n, d] in FFN-output space that lower the edit loss at each anchor row."""
    x = ffn.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(tail(x, residual).float(), targets, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    d = -g[anchors]
    return cast(torch.Tensor, d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12))  # Tensor.norm is not annotated


@torch.no_grad()
def init_values(
    q: torch.Tensor,
    ffn: torch.Tensor,
    residual: torch.Tensor,
    targets: torch.Tensor,
    anchors: torch.Tensor,
    keys: torch.Tensor,
    biases: torch.Tensor,
    tail: Tail,
    activation: str,
    scale_up: float = 1.0,
) -> torch.Tensor:
    """Per neuron, the shortest v along its row's descent direction that makes that row right.

    Neurons are set one after another (a neuron may also fire on another neuron's row); a neuron
    for which no length in the series works gets the length with the lowest loss on its row, and
    training takes it from there.
    """
    direction = descent_direction(ffn, residual, targets, anchors, tail)  # [n, d]
    scale = ffn[anchors].norm(dim=-1, keepdim=True)  # [n, 1]
    act = activate(q @ keys.T + biases, activation)  # type: ignore[arg-type]  # [R, n]
    values = torch.zeros_like(direction)
    for i, row in enumerate(anchors.tolist()):
        best, best_loss = None, float("inf")
        for alpha in _ALPHAS:
            values[i] = direction[i] * scale[i] * alpha
            logits = tail(ffn[row : row + 1] + act[row : row + 1] @ values, residual[row : row + 1])
            if int(logits.argmax(-1)) == int(targets[row]):
                best = values[i].clone()
                break
            loss = float(F.cross_entropy(logits.float(), targets[row : row + 1]))
            if loss < best_loss:
                best, best_loss = values[i].clone(), loss
        assert best is not None
        values[i] = best
    # scale_up > 1 leaves headroom: a paraphrase that activates the neuron less still gets pushed over
    return values * scale_up


def random_values(shape: torch.Size, ffn: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    scale = ffn.float().pow(2).mean().sqrt() * cfg.value_init_std
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(ffn) * scale
