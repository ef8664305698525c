"""Editors that `patchd evaluate` runs through the same stream: tpatcher, the FT baselines, mend, grace, wise.

Every editor takes one (input, target) at a time, in place, without reset, and says what it did
(the contract: patching/eval/record.py). A new editor is a class with `name`, `neurons` and
`edit(...) -> EditRecord`, built by `make_editor` from its name, and a choice of `--editor`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from patching.bases.tasks import TaskAdapter
from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher
from patching.eval.mend.editor import MendEditor
from patching.eval.record import Editor, EditRecord


class TPatcherEditor:
    """Transformer-Patcher: the daemon's own trainer and gate."""

    name = "tpatcher"

    def __init__(self, patcher: Patcher, adapter: TaskAdapter, factory: Any = None):
        self.patcher, self.adapter, self.factory = patcher, adapter, factory

    @property
    def parameters_added(self) -> int:
        """Numbers the patch adds to the model: a key, a bias and a value per neuron."""
        return self.patcher.wrapper.n * (2 * self.patcher.site.hidden_size + 1)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base for a moment (the same neuron tensors are put back): the overhead's baseline."""
        with self.patcher.wrapper.without_neurons():
            yield

    def reset(self) -> None:
        """Back to the base (`evaluate --single`): the neurons removed with the wrapper, and a fresh
        patcher (memory and held-out caches from the disk cache) for the next edit."""
        if self.factory is None:
            raise ValueError("this tpatcher editor was built without a factory: it cannot reset")
        self.patcher.detach()
        self.patcher = self.factory()

    @property
    def neurons(self) -> int:
        return self.patcher.wrapper.n

    def edit(self, inp: str, target: str, edit_id: str, train_equivalents: Sequence[str] = ()) -> EditRecord:
        t0 = time.perf_counter()
        out = self.patcher.edit(self.adapter.edit(inp, target, train_equivalents), edit_id)
        p = out.proposal
        return EditRecord(
            out.status,
            time.perf_counter() - t0,
            steps=p.train.steps if p else 0,
            neurons=p.neurons.n if p and out.status == "accepted" else 0,
            gate=p.gate.to_dict() if p else {},
            reasons=out.reasons,
            attempts=p.attempts if p else 0,
            equivalents=p.train.equivalents if p else 0,
            saturation=p.saturation if p else None,
            tries=p.tries if p else [],
            subject=(p.subject.detector is not None) if p and p.subject else None,
        )


class FineTuneEditor:
    """The paper's FT baselines: fine-tune on the edit until it is right, sequentially.

    `ft-last` trains only the last FFN (the layer Transformer-Patcher adds its neurons to);
    `ft-all` trains every weight. No gate: a fine-tuning step cannot be rejected after the fact.
    """

    def __init__(
        self, name: str, adapter: TaskAdapter, site_params: list[torch.nn.Parameter], lr: float, max_steps: int = 50
    ):
        self.name, self.adapter, self.params = name, adapter, site_params
        self.lr, self.max_steps = lr, max_steps
        self.model = adapter.base.model

    @property
    def neurons(self) -> int:
        return 0

    def edit(self, inp: str, target: str, edit_id: str, train_equivalents: Sequence[str] = ()) -> EditRecord:
        """Fine-tunes on the edit and its train equivalents together until all are right."""
        t0 = time.perf_counter()
        enc = self.adapter.edit(inp, target, train_equivalents)
        for p in self.params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(self.params, lr=self.lr)
        step = 0
        try:
            for step in range(self.max_steps + 1):
                logits = self.model(**enc.batch).logits
                logits = logits[enc.rows_b] if logits.ndim == 2 else logits[enc.rows_b, enc.rows_t]
                if bool((logits.argmax(-1) == enc.targets).all()):
                    break
                if step == self.max_steps:
                    break
                loss = F.cross_entropy(logits.float(), enc.targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            for p in self.params:
                p.requires_grad_(False)
                p.grad = None
        return EditRecord("applied", time.perf_counter() - t0, steps=step)


def make_editor(name: str, adapter: TaskAdapter, patcher_factory: Any, options: dict[str, Any] | None = None) -> Editor:
    """`options`: editor-specific settings (mend: `mend_dir`, `heldout` inputs for its emulated gate, `seed`;
    grace: `grace_eps`; wise: `memory` inputs for its routing loss, `wise` WiseConfig fields;
    tpatcher with `site_depth`: its layer, with `memory`, `heldout`, `train` and `gate`)."""
    options = options or {}
    if name == "tpatcher" and options.get("site_depth") is not None:
        from patching.eval.deepsite import DeepSiteEditor

        return DeepSiteEditor(
            adapter,
            options.get("memory", ()),
            options.get("heldout", ()),
            options["site_depth"],
            options.get("train") or TrainConfig(),
            options.get("gate") or GateConfig(),
        )
    if name == "tpatcher":
        return TPatcherEditor(patcher_factory(), adapter, patcher_factory)
    if name == "mend":
        if not options.get("mend_dir"):
            raise ValueError("--editor mend needs a trained editor: --mend-dir DIR (see `patchd mend train`)")
        return MendEditor(adapter, options["mend_dir"], options.get("heldout", ()), seed=options.get("seed", 0))
    if name == "grace":
        from patching.eval.grace import EPS_INIT, GraceEditor

        # a bare patcher (no memory, no held-out cache): GRACE reads only the cached tail
        return GraceEditor(Patcher(adapter.base.model), adapter, eps_init=options.get("grace_eps") or EPS_INIT)
    if name == "wise":
        from patching.eval.wise import WiseConfig, WiseEditor

        config = WiseConfig(**options.get("wise", {}))
        return WiseEditor(adapter, options.get("memory", ()), config, seed=options.get("seed", 0))
    from patching.arch import locate

    model = adapter.base.model
    if name == "ft-last":
        site = locate(model)
        params = list({id(p): p for m in (site.ffn_in, site.ffn_out) for p in m.parameters()}.values())
        return FineTuneEditor(name, adapter, params, lr=1e-4)
    if name == "ft-all":
        return FineTuneEditor(name, adapter, list(model.parameters()), lr=1e-5)
    raise ValueError(f"unknown editor {name!r} (tpatcher, ft-last, ft-all, mend, grace, wise)")
