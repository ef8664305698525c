"""Transformer-Patcher at an FFN below the last layer: issue 21's lever 2, `patchd evaluate --site-depth F`.

WISE's layer sweep finds the last layers poor for generality: a paraphrase or a prefixed question
reaches the last FFN's input far from the edit's, while a layer at about 80 % depth still sees them
close. At the last FFN the engine trains on a few cached rows (a patch there changes its own
position's logits only). Below it, attention carries a patch at one position into every later
one, so a step must run the layers above. The cached trick, generalised:

- one frozen forward of the edit's sequences records the hidden states entering the site's layer
  and every layer's other arguments from there on (mask, positions, encoder states): none of them
  depends on the patch (`capture_stack`);
- a step replays only the layers from the site's on, with the candidate neurons in place at every
  position, then the final norm and the head on the target rows alone (`replay_logits`).
  tests/test_deepsite.py checks this against a full forward for every architecture row.

The gate is the engine's, made exact for a site whose effect is not per row: the FFN input q at
the site does not depend on neurons added at that site, so q is cached once for every position of
every held-out and edit sequence; a sequence on which no new neuron fires at any position cannot
change, and only those that fire are run again, in full, with the neurons in place.

This is an evaluation lever: the daemon's engine stays at the last FFN until the A/B pays
(docs/results/). Train equivalents (and `--context-augment` prefixes) are extra training rows that
help and never block, as in the engine; unlike the engine's they are never dropped mid-run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from patching import init
from patching.arch import FFNSite, get_module, locate
from patching.bases.tasks import TaskAdapter
from patching.capture import capture, frozen
from patching.config import GateConfig, TrainConfig
from patching.encode import Encoded
from patching.engine import generates
from patching.eval.record import EditRecord
from patching.layer import PatchedFFN, activate, attach, detach
from patching.saturation import cap, saturations
from patching.trainer import Neurons, Objective, stop_met, total_loss

Call = tuple[tuple[Any, ...], dict[str, Any]]  # a layer's arguments after the hidden states, and its keywords


@dataclass
class StackTail:
    """What a step replays: the hidden states [B, T, d] entering the site's layer, and the other
    arguments every layer from there on was called with in the frozen pass (`capture_stack`)."""

    hidden: torch.Tensor
    calls: list[Call]


def site_layer(model: nn.Module, depth: float) -> int:
    """The layer index at `depth` (0 = first, 1 = last) of the patched stack."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"--site-depth must be within [0, 1], got {depth}")
    n = len(stack_layers(locate(model)))
    return round(depth * (n - 1))


def stack_layers(site: FFNSite) -> nn.ModuleList:
    layers = get_module(site.model.base_model, site.spec.layers)  # type: ignore[arg-type]
    assert isinstance(layers, nn.ModuleList)  # locate checked it
    return layers


@contextmanager
def recording_stack(site: FFNSite) -> Iterator[Callable[[], StackTail]]:
    """While open, a forward's hidden states entering the site's layer and the other arguments of
    every layer from there on are recorded; the yielded function gives them after the forward.
    None of them depends on what the site's layer and those above it hold, so a training step
    replays only those layers (`replay_logits`). Also used by WISE (patching/eval/wise.py)."""
    hidden: list[torch.Tensor] = []
    calls: list[Call] = []

    def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rest = dict(kwargs)
        h = args[0] if args else rest.pop("hidden_states")
        if not hidden:
            hidden.append(h.detach())
        calls.append((tuple(args[1:]), rest))

    handles = [
        layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in stack_layers(site)[site.layer_index :]
    ]
    try:
        yield lambda: StackTail(hidden[0], calls)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_stack(
    site: FFNSite, batch: dict[str, torch.Tensor]
) -> tuple[StackTail, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One frozen forward: (the stack from the site's layer on, the site's FFN input q and output
    [B, T, d] (float32, every accepted neuron in place), the whole model's logits)."""
    with recording_stack(site) as tail, capture(site) as cap:
        # no KV cache: one would be handed to the layers in their keywords and grow at every replay
        extra = {"use_cache": False} if site.spec.kind == "generation" else {}
        logits = site.model(**batch, **extra).logits
    q, ffn, _ = cap.require()
    return tail(), q.float(), ffn.float(), logits


@torch.no_grad()
def site_inputs(site: FFNSite, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """q [B, T, d] (float32) at the site from a forward of the stack without the head (M's rows)."""
    extra = {"use_cache": False} if site.spec.kind == "generation" else {}
    with capture(site) as cap:
        site.model.base_model(**batch, **extra)  # type: ignore[operator]
    q, _, _ = cap.require()
    return q.float()


def replay_logits(site: FFNSite, tail: StackTail, rows_b: torch.Tensor, rows_t: torch.Tensor) -> torch.Tensor:
    """Logits [R, C] at rows (rows_b, rows_t): the layers from the site's on (with whatever neurons
    the site's wrapper holds, the candidate included), the final norm and the head on those rows."""
    h = tail.hidden
    for layer, (args, kwargs) in zip(stack_layers(site)[site.layer_index :], tail.calls, strict=True):
        out = layer(h, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    rows = h[rows_b, rows_t]  # [R, d]
    if site.final_norm is not None:
        rows = site.final_norm(rows)
    return site.head(rows).float()


def fired(q: torch.Tensor, mask: torch.Tensor | None, nr: Neurons, activation: str) -> torch.Tensor:
    """[B] sequences on which a neuron of nr is non-zero at some real position of q [B, T, d]."""
    act = activate(q @ nr.keys.T + nr.biases, activation)  # type: ignore[arg-type]  # [B, T, n]
    on = (act != 0).any(-1)  # [B, T]
    if mask is not None and mask.shape == on.shape:  # padding never fires (another mask: all count)
        on &= mask.bool()
    return on.any(-1)


def sub_batch(enc: Encoded, keep: torch.Tensor) -> Encoded:
    """The examples `keep` [k] of enc, with its rows renumbered."""
    batch = {k: v[keep] for k, v in enc.batch.items()}
    new_index = torch.full((enc.size,), -1, dtype=torch.long)
    new_index[keep] = torch.arange(keep.numel())
    take = new_index[enc.rows_b] >= 0
    return Encoded(batch, new_index[enc.rows_b[take]], enc.rows_t[take], enc.targets[take])


@dataclass
class Cached:
    """A sequence set the gate watches: its encoding, q at the site, and its current prediction per row."""

    enc: Encoded
    q: torch.Tensor  # [B, T, d]
    pred: torch.Tensor  # [R] argmax per row with every accepted neuron in place


class DeepSiteEditor:
    """tpatcher with its neurons at layer `layer` of the stack (module docstring)."""

    name = "tpatcher"

    def __init__(
        self,
        adapter: TaskAdapter,
        memory: Sequence[str],
        heldout: Sequence[str],
        depth: float,
        train: TrainConfig,
        gate: GateConfig,
    ):
        self.adapter = adapter
        model = adapter.base.model
        self.layer = site_layer(model, depth)
        self.site = locate(model, layer=self.layer)
        self.cfg = train.for_task(adapter.generation)
        self.gate_cfg = gate
        self.wrapper: PatchedFFN = attach(self.site, self.cfg.activation)
        rows = []
        for enc in adapter.memory_batches(list(memory)):
            rows.append(site_inputs(self.site, enc.batch)[enc.rows_b, enc.rows_t])
        self.memory = torch.cat(rows) if rows else torch.zeros(0, self.site.hidden_size)  # [N, d]
        self.memory_base = int(self.memory.shape[0])  # M's rows from unrelated inputs; edits' rows follow
        self.whiten = init.whitening(self.memory) if self.cfg.init == "fisher" and len(self.memory) > 1 else None
        # no neuron in place yet: the base's greedy answers, from the disk cache after the first run
        self.heldout = [self._cached(enc) for enc in adapter.heldout_batches(list(heldout), base=True)]
        self.heldout_base = list(self.heldout)  # the base's predictions (a commit replaces entries)
        self.edits: list[Cached] = []  # accepted edits (example 0 only), for retention

    # -- Editor ------------------------------------------------------------------------------

    @property
    def neurons(self) -> int:
        return self.wrapper.n

    @property
    def parameters_added(self) -> int:
        return self.wrapper.n * (2 * self.site.hidden_size + 1)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        with self.wrapper.without_neurons():
            yield

    def reset(self) -> None:
        """Back to the base (`evaluate --single`): every neuron removed; the caches are the base's."""
        self.wrapper.remove(list(self.wrapper.edit_ids))
        self.heldout = list(self.heldout_base)
        self.memory = self.memory[: self.memory_base]
        self.edits = []

    def close(self) -> None:
        detach(self.site)

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "layers": self.site.layers, "memory_rows": int(self.memory.shape[0])}

    def edit(self, inp: str, target: str, edit_id: str, train_equivalents: Sequence[str] = ()) -> EditRecord:
        t0 = time.perf_counter()
        enc = self.adapter.edit(inp, target, train_equivalents)
        stack, q, ffn, logits = capture_stack(self.site, enc.batch)
        own = enc.rows_b == 0  # [R_all] the edit's rows (the rest: its equivalents)
        rows_logits = logits[enc.rows_b, enc.rows_t] if logits.ndim == 3 else logits[enc.rows_b]
        wrong = rows_logits.argmax(-1) != enc.targets
        if not bool(wrong[own].any()):
            return EditRecord("already_fixed", time.perf_counter() - t0)
        steps, attempts = 0, 0
        reasons: list[str] = []
        counts: dict[str, int] = {}
        for attempt in range(self.gate_cfg.retries + 1):
            attempts += 1
            nr, took = self._train(enc, stack, q, ffn, wrong, own, attempt)
            steps += took
            for candidate in self._as_run(nr, q[enc.rows_b[own], enc.rows_t[own]]):
                reasons, counts = self._gate(enc, q, candidate)
                if not reasons:
                    self._commit(enc, q, candidate, edit_id)
                    seconds = time.perf_counter() - t0
                    return EditRecord(
                        "accepted", seconds, steps=steps, neurons=candidate.n, attempts=attempts, gate=dict(counts)
                    )
        seconds = time.perf_counter() - t0
        return EditRecord("rejected", seconds, steps=steps, reasons=reasons, attempts=attempts, gate=dict(counts))

    # -- training ----------------------------------------------------------------------------

    def _train(
        self,
        enc: Encoded,
        stack: StackTail,
        q: torch.Tensor,
        ffn: torch.Tensor,
        wrong: torch.Tensor,
        own: torch.Tensor,
        attempt: int,
    ) -> tuple[Neurons, int]:
        """Neurons anchored at the edit's wrong rows (at most max_neurons), trained on the replayed
        stack; the same neurons are anchored at the same row of every equivalent."""
        cfg = self.cfg
        strength = self.gate_cfg.retry_factor**attempt
        obj = Objective.from_config(cfg, self.adapter.generation, strength)
        assert cfg.init_threshold is not None  # for_task filled it in
        threshold = 1.0 - (1.0 - cfg.init_threshold) / strength  # a retry starts narrower, as the engine's
        anchors = wrong[own].nonzero().flatten()[: cfg.max_neurons]  # [n] indices into the edit's rows
        R = int(own.sum())
        q_rows = q[enc.rows_b, enc.rows_t]  # [R_all, d]
        # row r of example e sits at e * R + r (adapter.edit encodes every example with the same answer)
        examples = int(enc.rows_b.max()) + 1
        anchor_rows = torch.arange(examples)[:, None] * R + anchors[None, :]  # [E, n]
        gen = torch.Generator().manual_seed(cfg.seed + attempt)
        keys, biases = init.margin_keys(q_rows[anchors], self.memory, threshold, self.whiten)
        values = init.random_values(torch.Size(keys.shape), ffn[enc.rows_b, enc.rows_t], cfg, gen)
        nr = Neurons(keys.clone().requires_grad_(), biases.clone().requires_grad_(), values.requires_grad_())
        opt = torch.optim.Adam([nr.keys, nr.biases, nr.values], lr=cfg.lr)
        cols = torch.arange(anchors.numel())
        step = 0
        with frozen(self.site.model):
            self.wrapper.candidate = (nr.keys, nr.biases, nr.values)
            try:
                for step in range(cfg.max_steps + 1):
                    logits = replay_logits(self.site, stack, enc.rows_b, enc.rows_t)  # [R_all, V]
                    pre = q_rows @ nr.keys.T + nr.biases  # [R_all, n]
                    a_rows = pre[anchor_rows, cols[None, :]]  # [E, n]
                    m = self.memory @ nr.keys.T + nr.biases  # [N, n]
                    with torch.no_grad():
                        edit_ok = bool((logits[own].argmax(-1) == enc.targets[own]).all())
                        m_max = float(m.max()) if m.numel() else float("-inf")
                        if stop_met(edit_ok, float(a_rows[0].min()), m_max, obj) or step == cfg.max_steps:
                            break
                    loss, _ = total_loss(logits, enc.targets, a_rows, a_rows[0], m, obj, cfg)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            finally:
                self.wrapper.candidate = None
        return Neurons(nr.keys.detach(), nr.biases.detach(), nr.values.detach()), step

    def _as_run(self, nr: Neurons, q_edit: torch.Tensor) -> list[Neurons]:
        """As the engine gates them: relu-cap at the configured saturation, then at 1."""
        if self.cfg.activation != "relu-cap":
            return [nr]
        return [cap(nr, q_edit, s) for s in saturations(self.cfg.saturation)]

    # -- the gate ----------------------------------------------------------------------------

    def _gate(self, enc: Encoded, q: torch.Tensor, nr: Neurons) -> tuple[list[str], dict[str, int]]:
        """(reasons to refuse nr, none to accept; the counts): the edit wrong, an earlier edit no
        longer right, more held-out answers changed than the gate allows."""
        probe = "__candidate__"
        self.wrapper.add(nr.keys, nr.biases, nr.values, probe)
        try:
            if self.adapter.generation and not generates(self.site.model, enc, q.device):
                return ["generate: greedy output differs from the target"], {}
            own = sub_batch(enc, torch.tensor([0]))
            now = self._cached(own, q[:1])
            if not bool((now.pred == own.targets).all()):
                return ["reliability: the edit is still wrong with the new neuron"], {}
            counts = {
                "retention_failed": sum(self._changed(c, nr, against=c.enc.targets) for c in self.edits),
                "changed": sum(self._changed(c, nr, against=c.pred) for c in self.heldout),
            }
            reasons = []
            if counts["retention_failed"]:
                reasons.append(f"retention: {counts['retention_failed']} earlier edit(s) no longer right")
            if counts["changed"] > self.gate_cfg.max_changed:
                reasons.append(
                    f"locality: {counts['changed']} held-out prediction(s) changed (max {self.gate_cfg.max_changed})"
                )
            return reasons, counts
        finally:
            self.wrapper.remove([probe])

    def _changed(self, c: Cached, nr: Neurons, against: torch.Tensor) -> int:
        """Examples of c whose rows' argmax (the wrapper holding nr) differs from `against` [R]."""
        hit = fired(c.q, c.enc.batch.get("attention_mask"), nr, self.cfg.activation).nonzero().flatten()
        if not hit.numel():
            return 0
        sub = sub_batch(c.enc, hit)
        pred = self._predict(sub)
        take = torch.isin(c.enc.rows_b, hit)
        bad = pred != against[take]
        return int(torch.unique(sub.rows_b[bad]).numel())

    @torch.no_grad()
    def _predict(self, enc: Encoded) -> torch.Tensor:
        logits: torch.Tensor = self.site.model(**enc.batch).logits
        return (logits[enc.rows_b, enc.rows_t] if logits.ndim == 3 else logits[enc.rows_b]).argmax(-1)

    def _cached(self, enc: Encoded, q: torch.Tensor | None = None) -> Cached:
        if q is not None:
            return Cached(enc, q, self._predict(enc))
        _, q, _, logits = capture_stack(self.site, enc.batch)
        rows = logits[enc.rows_b, enc.rows_t] if logits.ndim == 3 else logits[enc.rows_b]
        return Cached(enc, q, rows.argmax(-1))

    def _commit(self, enc: Encoded, q: torch.Tensor, nr: Neurons, edit_id: str) -> None:
        """Keep nr: into the layer; the held-out predictions where it fires follow; the edit's own
        sequence joins the retention set and its rows join M (a later edit keeps off them)."""
        self.wrapper.add(nr.keys, nr.biases, nr.values, edit_id)
        for i, c in enumerate(self.heldout):
            hit = fired(c.q, c.enc.batch.get("attention_mask"), nr, self.cfg.activation).nonzero().flatten()
            if hit.numel():
                take = torch.isin(c.enc.rows_b, hit)
                pred = c.pred.clone()
                pred[take] = self._predict(sub_batch(c.enc, hit))
                self.heldout[i] = replace(c, pred=pred)
        own = sub_batch(enc, torch.tensor([0]))
        self.edits.append(self._cached(own, q[:1]))
        self.memory = torch.cat([self.memory, q[own.rows_b, own.rows_t]])
