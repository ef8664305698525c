"""Which corrections shape an answer: the patch neurons that fire on an input, and their share.

At a position the model reads (patching/layer.py: position 0 for a classifier's head, the last
prompt position for a causal LM's next token), patch neuron j adds a_j * v_j to the patched FFN's
output, with a_j = act(q . k_j + b_j). An edit's contribution is the sum over its neurons,
delta_e [d]; the whole patch adds D = sum_e delta_e. The edit's share is <delta_e, D> / |D|^2, the
part of D along D: the shares of the firing edits sum to 1, and an edit that pulls against the
others gets a negative one. Neurons that do not fire (a_j = 0: relu and relu-cap are exactly 0
below their threshold) are no part of the answer.

What is behind each edit (the mistake, its target, reports and reporters, when it was accepted,
its first version) comes from the published version itself (patching/checkpoint.py
VerifiedVersion.provenance), so a downstream service needs no database to answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from patching.config import Activation
from patching.layer import PatchedFFN, activate


@dataclass(frozen=True)
class Firing:
    """One edit whose neurons fire on an input, by its share of the patch's output change."""

    edit_id: int
    activation: float  # the largest activation among the edit's neurons
    share: float  # <delta_e, D> / |D|^2 (see the module docstring)
    provenance: dict[str, Any] = field(default_factory=dict)  # empty when the version carries none

    def as_dict(self) -> dict[str, Any]:
        return {"edit_id": self.edit_id, "activation": self.activation, "share": self.share, **self.provenance}


def edit_contributions(
    q: torch.Tensor,
    keys: torch.Tensor,
    biases: torch.Tensor,
    values: torch.Tensor,
    activation: Activation,
    edit_ids: Sequence[str],
) -> list[tuple[str, float, float]]:
    """(edit id, largest activation, share) of every edit firing on q [d], largest share first.

    keys [n, d], biases [n], values [n, d], edit_ids n (one per neuron).
    """
    act = activate(keys.float() @ q.float() + biases.float(), activation)  # [n]
    firing = torch.nonzero(act != 0).flatten()  # [f]
    if firing.numel() == 0:
        return []
    names = sorted({edit_ids[i] for i in firing.tolist()})
    slot = {name: k for k, name in enumerate(names)}
    index = torch.tensor([slot[edit_ids[i]] for i in firing.tolist()], dtype=torch.long)  # [f]
    delta = torch.zeros(len(names), values.shape[1]).index_add_(0, index, act[firing, None] * values[firing].float())
    total = delta.sum(0)  # [d]
    norm = float(total @ total)
    shares = (delta @ total) / norm if norm > 0 else torch.zeros(len(names))  # [e]
    peak = torch.zeros(len(names)).scatter_reduce_(0, index, act[firing], reduce="amax")  # [e]
    found = [(name, float(peak[k]), float(shares[k])) for k, name in enumerate(names)]
    return sorted(found, key=lambda item: -item[2])


def find_patched(model: torch.nn.Module) -> PatchedFFN | None:
    return next((m for m in model.modules() if isinstance(m, PatchedFFN)), None)


def why(
    model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], provenance: Mapping[int, dict[str, Any]] | None = None
) -> list[list[Firing]]:
    """For each row of a tokenized batch (what the model's forward takes), the edits firing where
    the model reads its answer, largest share first; [] for a row no patch touches."""
    layer = find_patched(model)
    batch = int(next(iter(inputs.values())).shape[0])
    if layer is None or layer.n == 0:
        return [[] for _ in range(batch)]
    layer.tap = []
    try:
        with torch.no_grad():
            model(**inputs)
        (q,) = layer.tap  # [B, k, d]: the read positions (every position when the model reads them all)
    finally:
        layer.tap = None
    mask = inputs.get("attention_mask")
    out: list[list[Firing]] = []
    for row in range(batch):
        # one position reads the answer: the head's (k = 1), else the last real token of the row
        at = q.shape[1] - 1 if q.shape[1] == 1 or mask is None else int(mask[row].nonzero().max())
        found = edit_contributions(q[row, at], layer.keys, layer.biases, layer.values, layer.activation, layer.edit_ids)
        out.append([Firing(int(e), a, s, dict((provenance or {}).get(int(e), {}))) for e, a, s in found])
    return out
