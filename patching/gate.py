"""The gate every candidate neuron must pass before it is kept, computed on cached tensors.

- reliability: the edit is right with the neurons added;
- retention: every earlier accepted edit is still right;
- locality: on a held-out set disjoint from the memory, at most `max_changed` examples change
  their prediction (policy "changed") or turn from right to wrong (policy "regressed").

Only rows where a new neuron is active can change, so the head is recomputed only there: with a
ReLU patch that is usually a handful of rows, which makes the gate nearly free.
A neuron that fails is discarded by the caller, never kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from patching.config import GateConfig
from patching.layer import activate
from patching.trainer import EditTensors, Neurons, Tail

_CHUNK = 512  # rows per head recomputation; bounds memory for large vocabularies


@dataclass
class HeldoutTensors:
    """Cached held-out rows: R positions of G examples."""

    q: torch.Tensor  # [R, d]
    ffn: torch.Tensor  # [R, d] FFN output of the current model
    residual: torch.Tensor  # [R, d]
    pred: torch.Tensor  # [R] current prediction (argmax) per row
    group: torch.Tensor  # [R] example index of each row
    labels: torch.Tensor | None = None  # [R] right answer per row, for the "regressed" policy

    @property
    def examples(self) -> int:
        return int(self.group.max()) + 1 if self.group.numel() else 0


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # empty when passed
    reliable: bool = True
    retention_failed: int = 0  # earlier edits no longer right
    changed: int = 0  # held-out examples whose prediction changed
    regressed: int = 0  # held-out examples that were right and became wrong (needs labels)
    heldout_active: float = 0.0  # share of held-out rows on which a new neuron is non-zero
    heldout_max_pre: float = float("-inf")  # largest new-neuron pre-activation on held-out rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def predictions_with(
    nr: Neurons,
    activation: str,
    q: torch.Tensor,
    ffn: torch.Tensor,
    residual: torch.Tensor,
    tail: Tail,
    pred: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New argmax per row with the neurons added, and the mask of rows where they are active.

    Rows where every new neuron outputs exactly zero keep `pred` without running the head.
    """
    act = activate(q @ nr.keys.T + nr.biases, activation)  # type: ignore[arg-type]  # [R, n]
    active = act.abs().amax(dim=1) > 0 if act.numel() else torch.zeros(q.shape[0], dtype=torch.bool)
    new = pred.clone()
    rows = active.nonzero().flatten()
    for start in range(0, rows.numel(), _CHUNK):
        r = rows[start : start + _CHUNK]
        logits = tail(ffn[r] + act[r] @ nr.values, residual[r])
        new[r] = logits.argmax(-1)
    return new, active


def _bad_groups(bad_rows: torch.Tensor, group: torch.Tensor | None) -> int:
    if group is None:
        return int(bad_rows.sum())
    return int(torch.unique(group[bad_rows]).numel())


@torch.no_grad()
def check(
    nr: Neurons,
    activation: str,
    edit: EditTensors,
    retention: EditTensors | None,
    heldout: HeldoutTensors | None,
    tail: Tail,
    cfg: GateConfig,
) -> GateResult:
    res = GateResult(passed=True)
    cur = tail(edit.ffn, edit.residual).argmax(-1)  # the current model's prediction per edit row
    new, _ = predictions_with(nr, activation, edit.q, edit.ffn, edit.residual, tail, cur)
    res.reliable = bool((new == edit.targets).all())
    if not res.reliable:
        res.reasons.append("reliability: the edit is still wrong with the new neuron")
    if retention is not None and retention.rows:
        new, _ = predictions_with(
            nr, activation, retention.q, retention.ffn, retention.residual, tail, retention.targets
        )
        res.retention_failed = _bad_groups(new != retention.targets, retention.group)
        if res.retention_failed:
            res.reasons.append(f"retention: {res.retention_failed} earlier edit(s) no longer right")
    if heldout is not None and heldout.q.shape[0]:
        pre = heldout.q @ nr.keys.T + nr.biases
        res.heldout_max_pre = float(pre.max())
        new, active = predictions_with(nr, activation, heldout.q, heldout.ffn, heldout.residual, tail, heldout.pred)
        res.heldout_active = float(active.float().mean())
        res.changed = _bad_groups(new != heldout.pred, heldout.group)
        if heldout.labels is not None:
            regressed = (heldout.pred == heldout.labels) & (new != heldout.labels)
            res.regressed = _bad_groups(regressed, heldout.group)
        counted = res.changed if cfg.policy == "changed" else res.regressed
        if counted > cfg.max_changed:
            res.reasons.append(f"locality: {counted} held-out prediction(s) {cfg.policy} (max {cfg.max_changed})")
    res.passed = not res.reasons
    return res
