"""The margin / fisher key init (patching/init.py): from the edit's row, or from the edit's and its
copies' rows (trainer.init_from = "copies"), on hand-made tensors whose geometry is known."""

from __future__ import annotations

import torch

from patching import init
from patching.config import TrainConfig
from patching.trainer import EditTensors, init_neurons

D = 16


def _memory(n: int = 400) -> torch.Tensor:
    """[n, D] unrelated rows around the origin, none along axis 0 (the edit's own direction)."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(n, D, generator=g)
    m[:, 0] = 0.0
    return m


def _edit_and_copies(k: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """An edit row q [D] (axis 0) and k copies [k, D]: the same question behind other text, so
    each copy keeps a little of q and moves far along one shared context direction (axis 1)."""
    q = torch.zeros(D)
    q[0] = 4.0
    copies = q.repeat(k, 1) * 0.2
    copies[:, 1] = 3.0
    copies[:, 2] = torch.linspace(-1.0, 1.0, k)  # spread, so one copy is the weakest
    return q, copies


def test_with_one_row_the_copies_init_is_the_edit_init() -> None:
    mem = _memory()
    q, _ = _edit_and_copies()
    whiten = init.whitening(mem)
    k1, b1 = init.margin_keys(q[None], mem, 0.25, whiten)
    k2, b2 = init.margin_keys(q[None], mem, 0.25, whiten, rows=q[None, None])
    assert torch.allclose(k1, k2) and torch.allclose(b1, b2)
    assert torch.allclose(q @ k1[0] + b1[0], torch.tensor(1.0), atol=1e-4)


def test_a_key_from_the_copies_fires_on_all_of_them_and_stays_silent_on_the_memory() -> None:
    mem = _memory()
    q, copies = _edit_and_copies()
    whiten = init.whitening(mem)
    rows = torch.cat([q[None], copies])[:, None, :]  # [1 + k, n=1, D]
    edit_k, edit_b = init.margin_keys(q[None], mem, 0.25, whiten)
    copy_k, copy_b = init.margin_keys(q[None], mem, 0.25, whiten, rows=rows)
    on_edit_key = rows[:, 0] @ edit_k[0] + edit_b[0]  # [1 + k]
    on_copy_key = rows[:, 0] @ copy_k[0] + copy_b[0]
    # the edit-row key is fitted to the edit alone: the copies, far along the context direction,
    # start below its threshold (the failure the copies init removes)
    assert (on_edit_key[1:] <= 0).all()
    # the centroid key: +1 exactly at the weakest row, above it on every other, memory below 0
    assert torch.allclose(on_copy_key.min(), torch.tensor(1.0), atol=1e-4)
    assert (on_copy_key >= 1.0 - 1e-4).all()
    assert float((mem @ copy_k[0] + copy_b[0]).max()) < 0.0


def test_init_neurons_reads_the_copies_only_when_asked() -> None:
    mem = _memory()
    q, copies = _edit_and_copies()
    R = 1  # one answer row: neuron 0 anchored at it, each copy's row 0 its counterpart
    w = torch.randn(D, 5, generator=torch.Generator().manual_seed(1))

    def tail(ffn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return (ffn + residual) @ w  # [rows, 5] a linear head: only the value init reads it

    def tensors(x: torch.Tensor) -> EditTensors:
        rows = x.reshape(-1, D)
        return EditTensors(
            rows, torch.zeros_like(rows), torch.zeros_like(rows), torch.zeros(rows.shape[0], dtype=torch.long)
        )

    edit, extra = tensors(q), tensors(copies)
    anchors = torch.zeros(R, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    whiten = init.whitening(mem)
    cfg = TrainConfig(init_threshold=0.25)
    plain = init_neurons(edit, anchors, mem, tail, cfg, gen, "relu", whiten, extra)
    from_copies = init_neurons(
        edit, anchors, mem, tail, TrainConfig(init_threshold=0.25, init_from="copies"), gen, "relu", whiten, extra
    )
    assert ((extra.q @ plain.keys.T + plain.biases) <= 0).all()  # "edit" ignores the copies
    assert ((extra.q @ from_copies.keys.T + from_copies.biases) >= 1.0 - 1e-4).all()
    assert float((edit.q @ from_copies.keys.T + from_copies.biases).min()) >= 1.0 - 1e-4
