"""Capture the patched layer's FFN input q, FFN output and residual during one frozen forward.

Everything after the last FFN output is per position, so these three tensors at the positions
that matter are all a training step or a gate check needs (see arch.tail_logits).

    with capture(site) as cap:
        model(**batch)
    cap.q, cap.ffn, cap.residual      # each [B, T, d]

`ffn` is the output of the (possibly wrapped) ffn_out module, i.e. the frozen FFN plus every
patch neuron accepted so far.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from patching.arch import FFNSite


@dataclass
class Captured:
    q: torch.Tensor | None = None  # [B, T, d] FFN input
    ffn: torch.Tensor | None = None  # [B, T, d] FFN output, accepted patches included
    residual: torch.Tensor | None = None  # [B, T, d] stream the FFN output is added to

    def require(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.q is None or self.ffn is None or self.residual is None:
            raise RuntimeError("capture saw no forward through the patched layer")
        return self.q, self.ffn, self.residual


@contextmanager
def capture(site: FFNSite) -> Iterator[Captured]:
    cap = Captured()
    handles = []

    def on_q(_m: nn.Module, args: tuple[Any, ...]) -> None:
        cap.q = args[0].detach()
        if site.residual_in is None:  # post-LN: the residual is q itself
            cap.residual = cap.q

    def on_residual(_m: nn.Module, args: tuple[Any, ...]) -> None:
        cap.residual = args[0].detach()

    def on_ffn(_m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
        cap.ffn = out.detach()

    handles.append(site.ffn_in.register_forward_pre_hook(on_q))
    if site.residual_in is not None:
        handles.append(site.residual_in.register_forward_pre_hook(on_residual))
    handles.append(site.ffn_out.register_forward_hook(on_ffn))
    # the caches need the patched output at every position, not only where the head reads
    from patching.layer import PatchedFFN  # layer.py imports nothing from here: no cycle

    wrapper = site.ffn_out if isinstance(site.ffn_out, PatchedFFN) else None
    dense_before = wrapper.dense if wrapper is not None else False
    if wrapper is not None:
        wrapper.dense = True
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()
        if wrapper is not None:
            wrapper.dense = dense_before


@torch.no_grad()
def frozen_forward(site: FFNSite, batch: Mapping[str, torch.Tensor]) -> tuple[Captured, torch.Tensor]:
    """Run the model once on `batch` (eval mode, no grad) and return the capture and the logits."""
    model = site.model
    with capture(site) as cap:
        out = model(**batch)
    return cap, out.logits


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """The model's own weights out of autograd while an editor trains its own tensors through it
    (MEND's editor; WISE and the deep-site tpatcher through the replayed layers): backward skips
    every weight gradient of the base (a WISE step on zsre-smollm2: 0.41 s -> 0.19 s of backward)
    and leaves no .grad on it. The flags are restored afterwards."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
