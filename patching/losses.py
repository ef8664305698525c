"""The Transformer-Patcher losses as pure tensor functions (DESIGN §3).

Notation: a [R, n] pre-activations of the n new neurons at the edit rows; m [N, n] their
pre-activations on the memory rows (FFN inputs of unrelated inputs and of earlier edits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# exp() of a margin violation is capped here: past it the loss is already huge, and an overflow
# to inf would turn every gradient into NaN
_MAX_EXP = 30.0


def _exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.clamp(max=_MAX_EXP))


def _topk_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over the top-k of each column. x [R, n] -> [n]."""
    k = min(k, x.shape[0])
    return x.topk(k, dim=0).values.mean(dim=0)


def edit_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Task loss on the edit: cross-entropy of the target label / token per row. logits [R, C]."""
    return F.cross_entropy(logits.float(), targets)


def activation_loss(a: torch.Tensor, margin: float, k: int) -> torch.Tensor:
    """Push each neuron on for its edit: mean over neurons of top-k mean of exp(margin - a).

    a [R_i, n]: for neuron i, the rows of column i are its anchor row and the perturbed copies.
    """
    return _topk_mean(_exp(margin - a), k).mean()


def memory_abs_loss(m: torch.Tensor, beta: float, k: int) -> torch.Tensor:
    """Keep activations on memory below beta: top-k mean of exp(m - beta). m [N, n]."""
    return _topk_mean(_exp(m - beta), k).mean()


def memory_rel_loss(m: torch.Tensor, a_edit: torch.Tensor, gamma: float, k: int) -> torch.Tensor:
    """Make the edit beat every memory row by gamma: top-k mean of exp(m - a + gamma).

    m [N, n]; a_edit [n] (each neuron's activation at its own anchor row).
    """
    return _topk_mean(_exp(m - a_edit[None, :] + gamma), k).mean()
