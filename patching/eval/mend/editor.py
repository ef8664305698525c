"""`--editor mend` for `patchd evaluate`: a trained MEND editor applied to the live weights in place.

Each edit: one forward/backward of the current (already edited) model on the edit, (u, δ) of every
edited matrix, the editor in evaluation mode (frozen statistics), W ← W - α·Σ δ̃ ũᵀ under no_grad.
MEND has no per-edit rejection. What patchd's gate *would* have said is computed beside it (and
not counted in the edit's seconds): reliability, retention of every earlier edit, and changed
predictions on a fixed sample of the held-out set (the top layers run on cached inputs: the layers
below the lowest edited one never change). `reset()` restores the base weights, for single-edit
(T = 1) runs.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from patching import encode
from patching.bases.tasks import TaskAdapter
from patching.capture import frozen
from patching.config import GateConfig
from patching.encode import Encoded
from patching.eval.mend import store
from patching.eval.mend.stack import Cached, GradCapture, TopStack, select_targets, target_modules
from patching.eval.record import EditRecord
from patching.loading import base_identity

GATE_SAMPLE = 300  # held-out inputs the emulated gate checks per edit (the curve's sample size)
KEPT_BATCH = 32  # earlier edits are re-captured as one padded batch per this many (retention check)


class MendEditor:
    name = "mend"

    def __init__(
        self,
        adapter: TaskAdapter,
        mend_dir: Path,
        heldout: Sequence[str] = (),
        *,
        gate_sample: int = GATE_SAMPLE,
        seed: int = 0,
        gate: GateConfig | None = None,
    ):
        self.adapter, self.model, self.dir = adapter, adapter.base.model, Path(mend_dir)
        self.net, self.config = store.load(self.dir)
        store.check_matches(self.config, self.model)
        want = self.config.get("base_identity")
        try:
            have = base_identity(adapter.base.directory)
        except (OSError, ValueError):
            have = None
        if want and have and want != have:
            raise store.MendStateError(f"{self.dir} was trained for another base ({self.config.get('base')})")
        if not self.net.stats_initialised():
            raise store.MendStateError(f"{self.dir}: normalisation statistics not initialised (untrained editor)")
        self.net.eval()
        tc = self.config["train_config"]
        self.targets = select_targets(self.model, tc["n_layers"], tc["gate_proj"])
        if [t.name for t in self.targets] != self.net.names:
            raise store.MendStateError(f"{self.dir}: edited matrices differ from this model's selection")
        self.mods = target_modules(self.model, self.targets)
        params = dict(self.model.named_parameters())
        self.weights = {t.name: params[t.name] for t in self.targets}
        self.original = {n: w.detach().clone() for n, w in self.weights.items()}
        self.stack = TopStack(self.model, min(t.layer for t in self.targets))
        self.gate_cfg = gate or GateConfig()
        rng = random.Random(seed)
        sample = sorted(rng.sample(range(len(heldout)), min(gate_sample, len(heldout))))
        self.held: list[tuple[Cached, Encoded]] = []
        for enc in adapter.heldout_batches([heldout[i] for i in sample], progress=False):
            self.held.append((self.stack.capture(enc.batch), enc))
        self.held_examples = len(sample)
        self.held_pred0 = self._held_predictions()
        self.held_pred = self.held_pred0.clone()
        self.kept: list[tuple[Cached, Encoded]] = []  # earlier edits, in padded batches of KEPT_BATCH
        self.pending: list[tuple[str, str, Cached, Encoded]] = []  # the last < KEPT_BATCH edits, one by one
        self.nonfinite = 0
        self.gates: list[dict[str, Any]] = []

    @property
    def neurons(self) -> int:
        return 0

    # ------------------------------------------------------------------ predictions on cached inputs
    @torch.no_grad()
    def _wrong(self, cached: Cached, enc: Encoded) -> int:
        """How many examples of the batch are not right (every row of an example must be)."""
        bad = self.stack.logits(cached, enc.rows_b, enc.rows_t).argmax(-1) != enc.targets
        return int(torch.unique(enc.rows_b[bad]).numel())

    def _encode(self, inputs: list[str], targets: list[str]) -> Encoded:
        ad = self.adapter
        if ad.generation:
            return encode.generation(ad.base.tokenizer, [ad.text(x) for x in inputs], targets)
        return encode.classification(ad.base.tokenizer, inputs, [ad.label_id(t) for t in targets])

    @torch.no_grad()
    def _held_predictions(self) -> torch.Tensor:
        """One prediction per held-out example: its argmax rows joined (generation: the greedy answer's
        positions, whose argmax is unchanged iff the greedy answer is)."""
        preds = []
        for cached, enc in self.held:
            am = self.stack.logits(cached, enc.rows_b, enc.rows_t).argmax(-1)
            for b in range(enc.size):
                preds.append(am[enc.rows_b == b])
        return (
            torch.nn.utils.rnn.pad_sequence(preds, batch_first=True, padding_value=-1)
            if preds
            else torch.zeros(0, 1, dtype=torch.long)
        )

    # ------------------------------------------------------------------ editing
    def edit(self, inp: str, target: str, edit_id: str, train_equivalents: Sequence[str] = ()) -> EditRecord:
        """One gradient-transform step on the edit's own gradient. Train equivalents are not used:
        the editor network was trained on single-input gradients."""
        t0 = time.perf_counter()
        enc = self.adapter.edit(inp, target)
        with frozen(self.model), torch.enable_grad(), GradCapture(self.mods) as cap:
            logits = self.model(**enc.batch).logits
            logits = logits[enc.rows_b] if logits.ndim == 2 else logits[enc.rows_b, enc.rows_t]
            rows = cap.rows(F.cross_entropy(logits.float(), enc.targets))
        status = "applied"
        with torch.no_grad():
            updates = self.net.updates(rows)
            if all(bool(torch.isfinite(u).all()) for u in updates.values()):
                for name, upd in updates.items():
                    self.weights[name].add_(upd.to(self.weights[name].dtype))
            else:
                status = "nonfinite"  # a service would not write NaN into its weights: skipped, counted
                self.nonfinite += 1
        seconds = time.perf_counter() - t0
        gate = self._would_gate(inp, target, enc)
        self.gates.append(gate)
        return EditRecord(status, seconds, steps=1, gate=gate, reasons=gate["reasons"])

    def _would_gate(self, inp: str, target: str, enc: Encoded) -> dict[str, Any]:
        t0 = time.perf_counter()
        cached = self.stack.capture(enc.batch)
        reliable = self._wrong(cached, enc) == 0
        retention_failed = sum(self._wrong(c, e) for c, e in self.kept)
        retention_failed += sum(self._wrong(c, e) for _, _, c, e in self.pending)
        now = self._held_predictions()
        changed = int((now != self.held_pred).any(-1).sum()) if now.numel() else 0
        self.held_pred = now
        self.pending.append((inp, target, cached, enc))
        if len(self.pending) == KEPT_BATCH:
            batch = self._encode([x for x, *_ in self.pending], [t for _, t, *_ in self.pending])
            self.kept.append((self.stack.capture(batch.batch), batch))
            self.pending.clear()
        reasons = []
        if not reliable:
            reasons.append("reliability: the edit is still wrong after the update")
        if retention_failed:
            reasons.append(f"retention: {retention_failed} earlier edit(s) no longer right")
        if changed > self.gate_cfg.max_changed:
            reasons.append(
                f"locality: {changed} of {self.held_examples} sampled held-out prediction(s) changed "
                f"(max {self.gate_cfg.max_changed})"
            )
        return {
            "would_pass": not reasons,
            "reliable": reliable,
            "retention_failed": retention_failed,
            "changed": changed,
            "heldout_checked": self.held_examples,
            "reasons": reasons,
            "seconds": round(time.perf_counter() - t0, 4),
        }

    def reset(self) -> None:
        """Back to the base weights (single-edit runs: every edit on the unedited model)."""
        with torch.no_grad():
            for name, w in self.weights.items():
                w.copy_(self.original[name])
        self.held_pred = self.held_pred0.clone()
        self.kept.clear()
        self.pending.clear()

    def summary(self) -> dict[str, Any]:
        g = self.gates
        drift = {
            n: round(float((w.detach() - self.original[n]).norm() / self.original[n].norm()), 5)
            for n, w in self.weights.items()
        }
        training = self.config.get("training", {})
        return {
            "mend_dir": str(self.dir),
            "edited": [t.name for t in self.targets],
            "trained_steps": training.get("step"),
            "rank": self.config["net"]["rank"],
            "edit_lrs": [round(float(x), 6) for x in self.net.edit_lrs.detach()],
            "gate_would_pass": sum(x["would_pass"] for x in g),
            "gate_checked": len(g),
            "gate_reliable": sum(x["reliable"] for x in g),
            "gate_heldout_sample": self.held_examples,
            "heldout_changed_per_edit": {
                "mean": statistics.fmean(x["changed"] for x in g) if g else None,
                "max": max((x["changed"] for x in g), default=None),
            },
            "locality_per_edit": (1 - statistics.fmean(x["changed"] for x in g) / self.held_examples)
            if g and self.held_examples
            else None,
            "nonfinite_skipped": self.nonfinite,
            "weight_relative_change_now": drift,
        }
