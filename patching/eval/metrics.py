"""The sequential-editing metrics (DESIGN §7) as small pure functions over per-example outcomes.

SR: the edit is right just after its patch. GR: its paraphrases are right just after its patch.
ER: edits still right at the end of the stream. TrainR / TestR: accuracy after the stream divided
by accuracy before. Locality: share of held-out outputs unchanged.

Exact match (greedy generation) is patchd's headline. The `_tf` variants are teacher-forced, as
EasyEdit and the papers it serves score: per example, the share of the answer's tokens that are
the argmax when the prompt and the answer's earlier tokens are given (`token_accuracy`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch


def rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def success_rate(right_after_edit: Sequence[bool]) -> float | None:
    return rate(right_after_edit)


def generalization_rate(per_edit: Sequence[float | None]) -> float | None:
    """Mean over edits that have paraphrases (None = no paraphrase) of the share of them right."""
    vals = [v for v in per_edit if v is not None]
    return statistics.fmean(vals) if vals else None


def edit_retention(right_at_end: Sequence[bool]) -> float | None:
    return rate(right_at_end)


def relative_accuracy(before: Sequence[bool], after: Sequence[bool]) -> float | None:
    """accuracy(after) / accuracy(before) on the same examples; None when undefined."""
    if len(before) != len(after):
        raise ValueError("before and after must cover the same examples")
    acc_before = rate(before)
    if not acc_before:
        return None
    return (rate(after) or 0.0) / acc_before


def locality(before: Sequence[str], after: Sequence[str]) -> float | None:
    if len(before) != len(after):
        raise ValueError("before and after must cover the same examples")
    return rate([a == b for a, b in zip(before, after, strict=True)])


def running_mean(flags: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for i, f in enumerate(flags, start=1):
        total += f
        out.append(total / i)
    return out


def percentile(xs: Sequence[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(p * (len(s) - 1)))]


def token_accuracy(
    logits: torch.Tensor, rows_b: torch.Tensor, rows_t: torch.Tensor, targets: torch.Tensor, examples: int
) -> list[float | None]:
    """Per example, the share of its target rows whose argmax is the target token.

    logits [B, T, V] of a teacher-forced batch; rows_b / rows_t [R] the example and position of
    each row whose logits predict targets [R]. An example without rows (an empty answer) is None."""
    right = (logits[rows_b, rows_t].argmax(-1) == targets).float()  # [R]
    hits = torch.zeros(examples).index_add_(0, rows_b, right)
    rows = torch.zeros(examples).index_add_(0, rows_b, torch.ones_like(right))
    return [float(h / n) if n else None for h, n in zip(hits.tolist(), rows.tolist(), strict=True)]


def mean_score(scores: Sequence[float | None]) -> float | None:
    """Mean of the examples that have a score."""
    vals = [v for v in scores if v is not None]
    return statistics.fmean(vals) if vals else None
