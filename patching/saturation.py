"""Capping a trained relu neuron so that weaker firing inputs (paraphrases) get the edit's output.

A relu neuron adds relu(q.k + b) v, which scales with how strongly an input fires it: a paraphrase
of the edit reaches about half the edit's pre-activation (docs/results/zsre-generality-probe.md),
so it gets half the correction and often stays wrong, while a larger v overshoots on the edit's own
rows. The capped neuron adds min(relu(s (q.k + b) / p), 1) p v, where p is the neuron's largest
activation on the edit's rows and s the saturation: identical to the relu on the edit when s = 1,
never more than the edit's output anywhere, and the edit's full output on every input that reaches
1/s of it. Inputs where the relu is silent (every memory row, by the stop rule) stay silent.
"""

from __future__ import annotations

import torch

from patching.layer import activate
from patching.trainer import Neurons


def cap(nr: Neurons, q_edit: torch.Tensor, saturation: float) -> Neurons:
    """relu neurons [n] -> relu-cap neurons (activate(..., "relu-cap")) for the edit rows q_edit [R, d].

    A neuron silent on every edit row (peak 0) keeps its key and value: capped at 1, it can only
    give less than the relu did."""
    peak = activate(q_edit @ nr.keys.T + nr.biases, "relu").amax(dim=0)  # [n]
    live = peak > 0
    key_scale = torch.where(live, saturation / peak.clamp_min(torch.finfo(peak.dtype).tiny), torch.ones_like(peak))
    value_scale = torch.where(live, peak, torch.ones_like(peak))
    return Neurons(nr.keys * key_scale[:, None], nr.biases * key_scale, nr.values * value_scale[:, None])


def saturations(saturation: float) -> tuple[float, ...]:
    """The caps the engine tries for one trained neuron, boldest first: s, then 1 (the relu's output)."""
    return (saturation, 1.0) if saturation > 1.0 else (1.0,)
