"""Capping a trained relu neuron so that weaker firing inputs (paraphrases) get the edit's output.

A relu neuron adds relu(q.k + b) v, which scales with how strongly an input fires it: a paraphrase
of the edit reaches about half the edit's pre-activation (docs/results/zsre-generality-probe.md),
so it gets half the correction and often stays wrong, while a larger v overshoots on the edit's own
rows. The capped neuron adds min(relu(s (q.k + b) / p), 1) p v, where p is the neuron's largest
activation on the edit's rows and s the saturation: identical to the relu on the edit when s = 1,
never more than the edit's output anywhere, and the edit's full output on every input that reaches
1/s of it. Inputs where the relu is silent (every memory row, by the stop rule) stay silent.

A relu neuron fires on a half-space: an input whose projection on the key lies beyond the edit's
(a longer paraphrase of a FEVER claim reaches 1.1-3.3x the edit's pre-activation) fires at least
as strongly as the edit, whatever the threshold. `band` bounds it on both sides with a second
neuron of the same key and the opposite value: the pair gives the edit's output for
pre-activations within [1 - w, 1 + w] of the edit's, ramps to zero by 1 - 2w and 1 + 2w, and is
zero outside (exactly below; above, the two equal and opposite outputs cancel up to rounding).
It is the engine's last try for an edit the gate refused because the neurons fired elsewhere
(patching/engine.py).
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


# the engine's second band width, as a share of the first
BAND_NARROWER = 0.4


def band(nr: Neurons, q_edit: torch.Tensor, width: float) -> Neurons:
    """relu neurons [n] -> 2n relu-cap neurons: a rising edge and a falling edge per neuron.

    With p_lo / p_hi the neuron's smallest / largest positive pre-activation on the edit rows
    q_edit [R, d] and u its pre-activation on an input:
      rising  clamp((u - (1 - 2w) p_lo) / (w p_lo), 0, 1) * p_hi v   (full from (1 - w) p_lo)
      falling clamp((u - (1 + w) p_hi) / (w p_hi), 0, 1) * -p_hi v   (full from (1 + 2w) p_hi)
    Every edit row in [p_lo, p_hi] gets p_hi v, the largest output the relu gave an edit row (a
    capped neuron's output, as `cap` at saturation 1 gives at the peak row). A neuron silent on
    every edit row is returned as a silent pair."""
    pre = q_edit @ nr.keys.T + nr.biases  # [R, n]
    live = pre > 0
    big = torch.finfo(pre.dtype).max
    p_hi = pre.amax(dim=0).clamp_min(0.0)  # [n]
    p_lo = torch.where(live, pre, torch.full_like(pre, big)).amin(dim=0)  # [n]
    silent = ~live.any(dim=0)
    p_lo = torch.where(silent, torch.ones_like(p_lo), p_lo)
    p_hi_safe = torch.where(silent, torch.ones_like(p_hi), p_hi)
    rise = 1.0 / (width * p_lo)  # [n]
    fall = 1.0 / (width * p_hi_safe)
    keys = torch.cat([nr.keys * rise[:, None], nr.keys * fall[:, None]])
    biases = torch.cat([(nr.biases - (1 - 2 * width) * p_lo) * rise, (nr.biases - (1 + width) * p_hi_safe) * fall])
    value = nr.values * p_hi[:, None]  # a silent neuron: p_hi = 0, a zero value
    return Neurons(keys, biases, torch.cat([value, -value]))


def saturations(saturation: float) -> tuple[float, ...]:
    """The caps the engine tries for one trained neuron, boldest first: s, then 1 (the relu's output)."""
    return (saturation, 1.0) if saturation > 1.0 else (1.0,)
