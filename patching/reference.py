"""The reference trainer: the original procedure, kept only to measure the cached trainer against.

Like Transformer-Patcher's code, every step runs a full forward (and backward) of the whole
model with the candidate neuron in place, and it follows the reference's fixed schedule: at
least `reference_min_steps` steps, the stop rule checked only every `reference_check_every`.
Losses, memory, initialisation and stop rule are the same as the cached trainer's.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from patching.arch import FFNSite
from patching.capture import capture
from patching.config import TrainConfig
from patching.encode import Encoded
from patching.layer import PatchedFFN, trained_as
from patching.memory_bank import MemoryBank
from patching.trainer import (
    EditTensors,
    Neurons,
    Objective,
    TrainResult,
    init_neurons,
    losses_of,
    stop_met,
    total_loss,
)


class ReferenceHost(Protocol):
    """What the reference trainer reads of the Patcher (patching/engine.py satisfies it)."""

    model: torch.nn.Module
    site: FFNSite
    wrapper: PatchedFFN
    memory: MemoryBank
    train_cfg: TrainConfig

    def tail(self, ffn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor: ...

    def whitening(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...


def train_reference(
    patcher: ReferenceHost, enc: Encoded, et: EditTensors, anchors: torch.Tensor, obj: Objective, seed: int
) -> TrainResult:
    cfg = patcher.train_cfg
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    memory = patcher.memory.view()
    nr = init_neurons(et, anchors, memory, patcher.tail, cfg, gen, trained_as(cfg.activation), patcher.whitening())
    params = [nr.keys.requires_grad_(), nr.biases.requires_grad_(), nr.values.requires_grad_()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    device = patcher.memory.device
    batch = {k: v.to(device) for k, v in enc.batch.items()}
    rb, rt = enc.rows_b.to(device), enc.rows_t.to(device)
    cols = torch.arange(anchors.numel(), device=device)
    patcher.wrapper.candidate = (nr.keys, nr.biases, nr.values)
    success, step = False, 0
    info: dict[str, torch.Tensor] = {}
    a_edit = torch.zeros(anchors.numel(), device=device)
    m_max = float("inf")
    try:
        for step in range(cfg.max_steps + 1):
            with capture(patcher.site) as cap:
                logits = patcher.model(**batch).logits  # the whole model, every step
            q = cap.q
            assert q is not None
            logits = (logits[rb] if logits.ndim == 2 else logits[rb, rt]).float()  # [R, C] (any model dtype)
            # the capture hook detaches q; the pre-activation is a function of the keys only (float32)
            pre = q[rb, rt].float() @ nr.keys.T + nr.biases  # [R, n]
            a_edit = pre[anchors, cols]
            m = memory @ nr.keys.T + nr.biases  # [N, n]
            check_now = (
                not cfg.fixed_steps and step >= cfg.reference_min_steps and step % cfg.reference_check_every == 0
            )
            if check_now or step == cfg.max_steps:
                with torch.no_grad():
                    edit_ok = bool((logits.argmax(-1) == et.targets).all())
                    m_max = float(m.max()) if m.numel() else float("-inf")
                    if stop_met(edit_ok, float(a_edit.min()), m_max, obj):
                        success = True
                        break
            if step == cfg.max_steps:
                break
            loss, info = total_loss(logits, et.targets, a_edit[None, :], a_edit, m, obj, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        patcher.wrapper.candidate = None
    final = Neurons(nr.keys.detach(), nr.biases.detach(), nr.values.detach())
    return TrainResult(
        final, success, step, time.perf_counter() - t0, float(a_edit.detach().min()), m_max, losses_of(info)
    )
