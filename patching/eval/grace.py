"""GRACE (Hartvigsen et al., NeurIPS 2023, "Aging with GRACE"), re-implemented for `patchd evaluate`.

A codebook adaptor at one layer, here the FFN that Transformer-Patcher patches. Each entry holds a
key (the FFN input q at one position of an edit), a value (the FFN output to put there instead)
and a deferral radius. At every position, the nearest key (Euclidean) is looked up; a q within that
key's radius gets the key's value in place of the FFN's output, any other q the FFN's own.

An edit adds one entry per row it gets wrong: the classifier's pooled position, or a generator's
teacher-forced answer positions (the last FFN's output reaches only its own position's logits, so a
multi-token answer needs a key at each wrong token; tpatcher anchors its neurons the same way).
Each row's key is placed by the paper's codebook update rules (`update`), with h the row's q, y its
target (label or token id) and (k, r, y_k) the nearest entry at distance d:
- no entry, or d > eps_init + r: a new entry (h, r = eps_init);
- d <= eps_init + r and y_k == y: expand, r = max(r, d) (the existing value already says y);
- d <= eps_init + r and y_k != y: split, r = d / 2 for the old entry and a new one (h, d / 2).
A new entry's value starts as the FFN's current output at the row ("cold") and is trained by Adam
on the cached tail of the model until the row's argmax is y (at most `steps` steps).

The codebook sees nothing but its own keys: an input within no radius is exactly the base's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from patching.bases.tasks import TaskAdapter
from patching.engine import Patcher
from patching.eval.editorstate import EditorState
from patching.eval.record import EditRecord
from patching.trainer import Tail

Action = Literal["add", "expand", "split"]

EPS_INIT = 1.0  # the paper's initial deferral radius (its T5 / GPT2 experiments)
STEPS = 100  # the paper's value-training iterations
LR = 0.5  # Adam on the value: it starts as the FFN output, whose entries are O(1)
TARGET_P = 0.9  # a value is trained until the row's target has this probability (or STEPS)


@dataclass
class Codebook:
    """K entries of width d: keys [K, d], values [K, d], radii [K], labels [K]."""

    keys: torch.Tensor
    values: torch.Tensor
    radii: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def empty(cls, d: int) -> Codebook:
        return cls(torch.zeros(0, d), torch.zeros(0, d), torch.zeros(0), torch.zeros(0, dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])


def nearest(book: Codebook, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, d] -> (index [R], distance [R]) of each row's nearest key; the book must be non-empty."""
    q = q.float()
    # the matrix-product form picks the nearest key fast but loses ~1e-3 to cancellation (an input
    # identical to a key lands at 0.002, outside a small radius): the chosen key's distance is
    # computed again exactly
    idx = torch.cdist(q, book.keys.float()).argmin(dim=1)  # [R]
    d = (q - book.keys[idx].float()).norm(dim=-1)
    return idx, d


def lookup(book: Codebook, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, d] -> (hit [R] bool, index [R]): rows within their nearest key's radius, and that key."""
    if book.size == 0:
        return torch.zeros(q.shape[0], dtype=torch.bool), torch.zeros(q.shape[0], dtype=torch.long)
    idx, d = nearest(book, q)
    return d <= book.radii[idx], idx


def update(book: Codebook, h: torch.Tensor, label: int, eps_init: float) -> tuple[Codebook, Action, int]:
    """One row's codebook rule (module docstring): the new book, what was done, and the index of the
    entry that now covers h (a new entry's value is h's zero placeholder until it is trained)."""
    h = h.float().reshape(1, -1)
    if book.size:
        idx_t, d_t = nearest(book, h)
        i, d = int(idx_t[0]), float(d_t[0])
        if d <= eps_init + float(book.radii[i]):
            if int(book.labels[i]) == label:
                radii = book.radii.clone()
                radii[i] = max(float(radii[i]), d)
                return Codebook(book.keys, book.values, radii, book.labels), "expand", i
            radii = book.radii.clone()
            radii[i] = d / 2
            return _append(Codebook(book.keys, book.values, radii, book.labels), h, d / 2, label), "split", book.size
    return _append(book, h, eps_init, label), "add", book.size


def _append(book: Codebook, h: torch.Tensor, radius: float, label: int) -> Codebook:
    return Codebook(
        torch.cat([book.keys, h]),
        torch.cat([book.values, torch.zeros_like(h)]),
        torch.cat([book.radii, torch.tensor([radius])]),
        torch.cat([book.labels, torch.tensor([label])]),
    )


def train_values(
    ffn: torch.Tensor, residual: torch.Tensor, targets: torch.Tensor, tail: Tail, steps: int = STEPS, lr: float = LR
) -> tuple[torch.Tensor, int]:
    """Values [R, d] that make each row's target its argmax under the tail, with its probability at
    least TARGET_P (a value barely past the boundary flips back under another batch's rounding),
    starting from the FFN's own output ffn [R, d] (rows are independent: the tail is per position).
    Returns (values, steps)."""
    v = ffn.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    step = 0
    for step in range(steps + 1):
        nll = F.cross_entropy(tail(v, residual).float(), targets, reduction="none")  # [R]
        if bool((nll <= -math.log(TARGET_P)).all()) or step == steps:
            break
        opt.zero_grad(set_to_none=True)
        nll.sum().backward()
        opt.step()
    return v.detach(), step


class GraceEditor:
    """GRACE as an `Editor` of `patchd evaluate` (see the module docstring)."""

    name = "grace"

    def __init__(self, patcher: Patcher, adapter: TaskAdapter, eps_init: float = EPS_INIT, steps: int = STEPS):
        self.patcher, self.adapter = patcher, adapter
        self.eps_init, self.steps = eps_init, steps
        site = patcher.site
        self.book = Codebook.empty(site.hidden_size)
        self.actions: dict[str, int] = {"add": 0, "expand": 0, "split": 0}
        self._q: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []
        q_from_input = site.ffn_in is site.ffn_out

        def store_q(_m: Any, args: tuple[Any, ...]) -> None:
            self._q = args[0]

        def replace(_m: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            q = args[0] if q_from_input else self._q
            self._q = None
            if q is None or self.book.size == 0:
                return out
            flat = q.reshape(-1, q.shape[-1])
            hit, idx = lookup(self.book, flat)
            if not bool(hit.any()):
                return out
            new = out.reshape(-1, out.shape[-1]).clone()
            new[hit] = self.book.values[idx[hit]].to(new.dtype)
            return new.reshape(out.shape)

        if not q_from_input:
            self._handles.append(site.ffn_in.register_forward_pre_hook(store_q))
        # registered before any capture: the caches see the codebook's output (the current model)
        self._handles.append(site.ffn_out.register_forward_hook(replace))

    @property
    def neurons(self) -> int:
        """Codebook entries (each adds 2d + 1 numbers: key, value, radius)."""
        return self.book.size

    @property
    def parameters_added(self) -> int:
        """Numbers the codebook adds: a key, a value and a radius per entry."""
        return self.book.size * (2 * self.patcher.site.hidden_size + 1)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base for a moment: an empty codebook, then the same one back."""
        book, self.book = self.book, Codebook.empty(self.patcher.site.hidden_size)
        try:
            yield
        finally:
            self.book = book

    def reset(self) -> None:
        """Back to the base: an empty codebook (`evaluate --single`)."""
        self.book = Codebook.empty(self.patcher.site.hidden_size)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def edit(self, inp: str, target: str, edit_id: str, train_equivalents: Sequence[str] = ()) -> EditRecord:
        t0 = time.perf_counter()
        et = self.patcher.cache(self.adapter.edit(inp, target))
        wrong = (self.patcher.tail(et.ffn, et.residual).argmax(-1) != et.targets).nonzero().flatten()
        if wrong.numel() == 0:
            return EditRecord("already_fixed", time.perf_counter() - t0)
        steps = 0
        fresh: list[tuple[int, int]] = []  # (entry, row) whose value is trained
        for row in wrong.tolist():
            self.book, action, entry = update(self.book, et.q[row], int(et.targets[row]), self.eps_init)
            self.actions[action] += 1
            if action != "expand":
                fresh.append((entry, row))
        if fresh:
            entries, rows = (torch.tensor(x) for x in zip(*fresh, strict=True))
            values, steps = train_values(
                et.ffn[rows], et.residual[rows], et.targets[rows], self.patcher.tail, self.steps
            )
            book_values = self.book.values.clone()
            book_values[entries] = values
            self.book = Codebook(self.book.keys, book_values, self.book.radii, self.book.labels)
        return EditRecord("applied", time.perf_counter() - t0, steps=steps, neurons=len(fresh))

    def settings(self) -> dict[str, Any]:
        """What makes another stream: a resumed run must have the same (patching/eval/resume.py)."""
        return {"eps_init": self.eps_init, "steps": self.steps}

    def state(self) -> EditorState:
        """The codebook and the action counts, for `evaluate --resume` (patching/eval/editorstate.py)."""
        b = self.book
        tensors = {"keys": b.keys, "values": b.values, "radii": b.radii, "labels": b.labels}
        return EditorState(self.name, tensors, {"actions": dict(self.actions)})

    def load_state(self, state: EditorState) -> None:
        t = state.tensors
        if t["keys"].shape[1:] != (self.patcher.site.hidden_size,):
            raise ValueError(f"a GRACE codebook of width {t['keys'].shape[1:]} does not fit this base's FFN")
        self.book = Codebook(t["keys"], t["values"], t["radii"], t["labels"])
        self.actions = {k: int(v) for k, v in state.meta["actions"].items()}

    def summary(self) -> dict[str, Any]:
        d = self.patcher.site.hidden_size
        return {
            "entries": self.book.size,
            "actions": dict(self.actions),
            "eps_init": self.eps_init,
            "steps": self.steps,
            "parameters_added": self.book.size * (2 * d + 1),
            "radius_median": float(self.book.radii.median()) if self.book.size else None,
        }
