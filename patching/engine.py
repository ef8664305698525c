"""The Patcher: one model, its patched layer, the memory M, the held-out cache and the edits kept.

    patcher = Patcher(model, train=TrainConfig(), gate=GateConfig())
    patcher.build_memory(batches)      # FFN inputs of unrelated inputs -> M [N, d]
    patcher.build_heldout(batches)     # cached held-out rows for the locality gate
    outcome = patcher.edit(encoded, edit_id="42")   # already_fixed | accepted | rejected

`propose` trains and gates without changing anything; `commit` applies an accepted proposal
(the daemon stores it durably in between). A rejected neuron is never kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from patching import gate as gating
from patching.arch import FFNSite, locate, tail_logits
from patching.capture import frozen_forward
from patching.config import GateConfig, TrainConfig
from patching.encode import Encoded
from patching.fasttail import LinearTail, linear_tail
from patching.init import whitening
from patching.layer import PatchedFFN, activate, attach, detach, neuron_output, trained_as
from patching.memory_bank import MemoryBank, RowBank
from patching.reference import train_reference
from patching.saturation import BAND_NARROWER, band, cap, saturations
from patching.trainer import EditTensors, Neurons, Objective, TrainResult, train_cached

Status = Literal["already_fixed", "accepted", "rejected"]


@dataclass
class Proposal:
    edit_id: str
    edit: EditTensors
    neurons: Neurons
    train: TrainResult
    gate: gating.GateResult
    attempts: int
    seconds: float
    saturation: float | None = None  # relu-cap: the cap the neurons were gated with (None: relu/gelu)
    train_seconds: float = 0.0  # training time of every attempt (the rest of `seconds` is forward + gate)
    banded: bool = False  # the neurons are a band (saturation.band): the regular attempts were refused
    # every gated try in order (a training attempt is gated at each cap it is tried with): equivalents
    # trained to its end, steps, the cap, and the gate's reasons
    # (why an edit ended without its equivalents: docs/results/levers-21.md)
    tries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.gate.passed


@dataclass
class EditOutcome:
    status: Status
    proposal: Proposal | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass
class EditState:
    """Everything accepted edits changed in a Patcher, as tensors (all float32, on the CPU when
    saved). A fresh Patcher with the same base caches that restores it IS the uninterrupted run,
    bit for bit: the caches were updated incrementally (ffn + delta_1 + delta_2 ...), and only these
    stored sums, not a recomputation, reproduce them exactly. patching/snapshot.py writes it."""

    edits: list[str]  # accepted edit ids, in order
    neuron_edits: list[str]  # the edit id of each neuron (an edit may own several)
    keys: torch.Tensor  # [n, d]
    biases: torch.Tensor  # [n]
    values: torch.Tensor  # [n, d]
    memory_rows: torch.Tensor  # [m, d] the edits' own rows appended to M after the base rows
    heldout_ffn: torch.Tensor | None  # [H, d] held-out FFN outputs with every neuron in place
    heldout_pred: torch.Tensor | None  # [H] held-out predictions with every neuron in place
    retention: EditTensors | None  # rows of every accepted edit, group = edit number


@dataclass(frozen=True)
class Checkpoint:
    """Patcher.checkpoint(): what rollback() needs to undo the edits committed after it."""

    memory_rows: int
    heldout: gating.HeldoutTensors | None
    retention_rows: int
    retention_ffn: torch.Tensor | None  # a copy: the bank's ffn rows are updated in place
    edits: list[str]


class Patcher:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        train: TrainConfig | None = None,
        gate: GateConfig | None = None,
        arch: Mapping[str, Any] | None = None,
    ):
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.gate_cfg = gate or GateConfig()
        self.site: FFNSite = locate(model, arch)
        self.generation = self.site.spec.kind == "generation"
        self.train_cfg = (train or TrainConfig()).for_task(self.generation)
        self.wrapper: PatchedFFN = attach(self.site, self.train_cfg.activation)
        self.fast_tail: LinearTail | None = linear_tail(self.site)  # None: not an LM head of known form
        ref = next(model.parameters())
        # the frozen model runs in its own dtype (bfloat16 on a GPU); every cached tensor is cast up
        # to float32 and the neurons are trained, gated and kept in float32 (layer.py)
        self.dtype = ref.dtype
        self.memory = MemoryBank(self.site.hidden_size, torch.float32, ref.device)
        self.heldout: gating.HeldoutTensors | None = None
        # rows of every accepted edit (q, ffn, residual, targets, group = edit number), grown in place
        self._retention = RowBank(ref.device)
        self._edits: list[str] = []
        self._whiten: tuple[torch.Tensor, torch.Tensor] | None = None
        self._memory_base = 0  # rows of M that come from unrelated inputs, not from edits

    # ------------------------------------------------------------------ caching
    def tail(self, ffn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Logits [R, C] (float32) of the rows ffn, residual [R, d] (float32): the model's own tail
        modules run in its dtype, as the deployed model runs them (a no-op cast for float32)."""
        return tail_logits(self.site, ffn.to(self.dtype), residual.to(self.dtype)).float()

    def cache(self, enc: Encoded) -> EditTensors:
        """One frozen forward of the current model; the rows of `enc` at the patched layer."""
        batch = {k: v.to(self.memory.device) for k, v in enc.batch.items()}
        cap, _ = frozen_forward(self.site, batch)
        q, ffn, res = cap.require()
        b, t = enc.rows_b.to(q.device), enc.rows_t.to(q.device)
        return EditTensors(q[b, t].float(), ffn[b, t].float(), res[b, t].float(), enc.targets.to(q.device), group=b)

    def build_memory(self, batches: Iterable[Encoded]) -> int:
        """Append the FFN inputs of every row of every batch to M. Returns the memory size."""
        for enc in batches:
            self.add_memory(self.cache(enc).q)
        return len(self.memory)

    def add_memory(self, rows: torch.Tensor) -> None:
        """Append unrelated inputs' FFN inputs [m, d] to M (edits' own rows are appended by commit).

        Statistics derived from M (the fisher init's whitening) use these rows only, so a restart
        that replays stored edits derives exactly what an uninterrupted run derived.
        """
        self.memory.append(rows)
        self._memory_base = len(self.memory)
        self._whiten = None

    def build_heldout(self, batches: Iterable[Encoded], with_labels: bool = False) -> int:
        parts: list[EditTensors] = []
        offset = 0
        for enc in batches:
            et = self.cache(enc)
            assert et.group is not None
            et.group = et.group + offset
            offset += enc.size
            parts.append(et)
        cat = _concat(parts)
        pred = self.tail(cat.ffn, cat.residual).argmax(-1)
        assert cat.group is not None
        self.heldout = gating.HeldoutTensors(
            cat.q, cat.ffn, cat.residual, pred, cat.group, labels=cat.targets if with_labels else None
        )
        return offset

    # ------------------------------------------------------------------ queries
    def is_right(self, et: EditTensors) -> bool:
        return bool((self.tail(et.ffn, et.residual).argmax(-1) == et.targets).all())

    @property
    def edit_ids(self) -> list[str]:
        return list(self._edits)

    @property
    def retention(self) -> EditTensors | None:
        """The rows of every accepted edit (views into the bank: read them, do not keep them
        across a commit); None before the first edit."""
        if not len(self._retention):
            return None
        r = self._retention.view()
        return EditTensors(r["q"], r["ffn"], r["residual"], r["targets"], r["group"])

    # ------------------------------------------------------------------ editing
    def anchors(self, et: EditTensors, attempt: int = 0, extra: EditTensors | None = None) -> torch.Tensor:
        """Rows that get a neuron: the single row (classification), or each wrong target token,
        at most max_neurons of them (generation). Under teacher forcing a wrong token past the cap
        keeps its context, so it stays wrong unless a neuron fires there: a retry after a failed
        attempt may anchor max_neurons more rows (long answers, e.g. 9-token names).

        With train equivalents (extra: K*R rows, same target), a row index wrong in one of them
        only (often the stop token after a long answer) gets a neuron too, after the edit's own."""
        wrong = self.tail(et.ffn, et.residual).argmax(-1) != et.targets  # [R]
        rows = wrong.nonzero().flatten()
        if extra is not None and extra.rows and extra.rows % et.rows == 0:
            also = (self.tail(extra.ffn, extra.residual).argmax(-1) != extra.targets).reshape(-1, et.rows).any(0)
            rows = torch.cat([rows, (also & ~wrong).nonzero().flatten()])
        return rows[: self.train_cfg.max_neurons * (attempt + 1)]

    def propose(self, enc: Encoded | EditTensors, edit_id: str) -> Proposal | None:
        """Train and gate neurons for one edit; None when the model is already right."""
        t0 = time.perf_counter()
        # an encoded edit may carry train equivalents: examples 1.. of the batch, same target
        et, extra = split_equivalents(enc if isinstance(enc, EditTensors) else self.cache(enc))
        if self.is_right(et):
            return None
        proposal: Proposal | None = None
        tries = 0
        train_s = 0.0
        history: list[dict[str, Any]] = []
        # equivalents help, never block: when every attempt with them fails (usually the gate: a
        # key wide enough for all the phrasings also fires on a held-out input), the whole retry
        # sequence runs again on the edit alone, as it would have without them
        for eq in (extra, None) if extra is not None else (None,):
            for attempt in range(self.gate_cfg.retries + 1):
                # more neurons only when the edit itself stayed wrong with the capped set
                grow = attempt > 0 and proposal is not None and not proposal.gate.reliable
                anchors = self.anchors(et, attempt if grow else 0, eq)
                strength = self.gate_cfg.retry_factor**attempt
                obj = Objective.from_config(self.train_cfg, self.generation, strength)
                result = self._train(enc, et, anchors, obj, attempt, eq)
                train_s += result.seconds
                tries += 1
                for neurons, saturation in self._as_run(result.neurons, et):
                    # the stop rule is the trainer's proxy; the gate has the final word (a neuron that still
                    # fires on a memory row is kept only if no held-out prediction and no earlier edit moved)
                    verdict = self._gate(neurons, et, enc, edit_id)
                    proposal = Proposal(edit_id, et, neurons, result, verdict, tries, 0.0, saturation)
                    history.append(
                        {
                            "equivalents": result.equivalents,
                            "steps": result.steps,
                            "saturation": saturation,
                            "reasons": list(verdict.reasons),
                        }
                    )
                    if proposal.accepted:
                        break
                if proposal is not None and proposal.accepted:
                    break
            if proposal is not None and proposal.accepted:
                break
        assert proposal is not None
        if not proposal.accepted and proposal.gate.reliable and self._band_applies():
            proposal = self._banded(proposal, enc)
        proposal.seconds = time.perf_counter() - t0
        proposal.train_seconds = train_s
        proposal.tries = history
        return proposal

    def _band_applies(self) -> bool:
        """The band is the last try of a relu-cap edit that the gate refused only because its
        neurons fired elsewhere (a held-out input or an earlier edit changed); on a generator only
        with trainer.band_generation."""
        cfg = self.train_cfg
        return cfg.activation == "relu-cap" and cfg.band > 0 and (not self.generation or cfg.band_generation)

    def _banded(self, proposal: Proposal, enc: Encoded | EditTensors) -> Proposal:
        """The last attempt's trained neurons as a band around the edit (saturation.band), gated;
        the configured width first, then a narrower one (FEVER's 78 locality refusals of a 10,000-edit
        stream, each edit alone: 0.05 keeps 72, 0.02 keeps 77; docs/results/scale-20/)."""
        et = proposal.edit
        for width in (self.train_cfg.band, self.train_cfg.band * BAND_NARROWER):
            neurons = band(proposal.train.neurons, et.q, width)
            verdict = self._gate(neurons, et, enc, proposal.edit_id)
            if verdict.passed:
                return Proposal(
                    proposal.edit_id, et, neurons, proposal.train, verdict, proposal.attempts, 0.0, None, banded=True
                )
        return proposal  # the refused verdict of the regular attempts stands

    def _gate(self, nr: Neurons, et: EditTensors, enc: Encoded | EditTensors, edit_id: str) -> gating.GateResult:
        """The gate's verdict on candidate neurons; on a generator with the edit encoded (not only
        cached), a passing candidate must also make real greedy generate() give the target."""
        cfg = self.train_cfg
        verdict = gating.check(nr, cfg.activation, et, self.retention, self.heldout, self.tail, self.gate_cfg)
        if verdict.passed and self.generation and not isinstance(enc, EditTensors):
            if not self._generates(enc, nr, edit_id):
                verdict.passed = False
                verdict.reasons.append("generate: greedy output differs from the target")
        return verdict

    def _as_run(self, nr: Neurons, et: EditTensors) -> list[tuple[Neurons, float | None]]:
        """The trained neurons as the layer will run them, each way to gate in turn: as trained, or
        (relu-cap) capped at the configured saturation, then at 1 (patching/saturation.py)."""
        if self.train_cfg.activation != "relu-cap":
            return [(nr, None)]
        return [(cap(nr, et.q, s), s) for s in saturations(self.train_cfg.saturation)]

    def _train(
        self,
        enc: Encoded | EditTensors,
        et: EditTensors,
        anchors: torch.Tensor,
        obj: Objective,
        attempt: int,
        extra: EditTensors | None = None,
    ) -> TrainResult:
        seed = self.train_cfg.seed + attempt
        if self.train_cfg.mode == "reference":
            if isinstance(enc, EditTensors):
                raise ValueError("the reference trainer needs the encoded input, not cached tensors")
            if extra is not None:
                raise ValueError("the reference trainer does not train on equivalents")
            return train_reference(self, enc, et, anchors, obj, seed)
        cfg = self.train_cfg
        if attempt:
            # a retry starts from a narrower neuron: its threshold moves towards the edit (0.5 ->
            # 0.75 -> 0.875 with retry_factor 2; generation 0.25 -> 0.625 -> 0.8125), so it fires on
            # fewer held-out inputs; with a margin init that already meets the stop rule, a stronger
            # loss alone would change nothing
            strength = self.gate_cfg.retry_factor**attempt
            assert cfg.init_threshold is not None  # filled in by for_task
            cfg = replace(cfg, init_threshold=1.0 - (1.0 - cfg.init_threshold) / strength)
        return train_cached(
            et,
            anchors,
            self.memory.view(),
            self.tail,
            cfg,
            obj,
            trained_as(cfg.activation),
            seed,
            whiten=self.whitening(),
            extra=extra,
            fast=self.fast_tail if cfg.fast_tail else None,
        )

    def whitening(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Memory mean and inverse covariance for the fisher init, computed once from the memory as
        built (the rows of accepted edits appended later are a negligible share of it)."""
        if self.train_cfg.init != "fisher" or self._memory_base < 2:
            return None
        if self._whiten is None:
            self._whiten = whitening(self.memory.view()[: self._memory_base])
        return self._whiten

    def _generates(self, enc: Encoded, nr: Neurons, edit_id: str) -> bool:
        """Real greedy generate() with the neurons in place; they are removed again afterwards."""
        assert enc.prompts is not None and enc.target_ids is not None
        self.wrapper.add(nr.keys, nr.biases, nr.values, edit_id)
        try:
            return generates(self.model, enc, self.memory.device)
        finally:
            self.wrapper.remove([edit_id])

    def commit(self, proposal: Proposal) -> None:
        """Apply an accepted proposal: add its neurons, update every cache, extend M."""
        if not proposal.accepted:
            raise ValueError(f"edit {proposal.edit_id}: a rejected proposal is never committed")
        nr = proposal.neurons
        self.wrapper.add(nr.keys, nr.biases, nr.values, proposal.edit_id)
        self._add_to_caches(nr)
        et = proposal.edit
        self._retention.append(
            {
                "q": et.q,
                "ffn": et.ffn + self._delta(nr, et.q),
                "residual": et.residual,
                "targets": et.targets,
                "group": torch.full_like(et.targets, len(self._edits)),
            }
        )
        self.memory.append(et.q)
        self._edits.append(proposal.edit_id)

    def replay(self, enc: Encoded, edit_id: str, neurons: Neurons) -> gating.GateResult:
        """Re-apply a stored, previously accepted edit (restart recovery), in its original order.

        The gate is run again on the current caches so the caller can verify it against the stored
        result; the neurons are committed either way, because the stored model is the truth.
        Stored neurons may come from the CPU (a file); they are moved to the caches' device here.
        """
        device = self.memory.device
        neurons = Neurons(neurons.keys.to(device), neurons.biases.to(device), neurons.values.to(device))
        et = self.cache(enc)
        verdict = gating.check(
            neurons, self.train_cfg.activation, et, self.retention, self.heldout, self.tail, self.gate_cfg
        )
        stub = TrainResult(neurons, True, 0, 0.0, 0.0, 0.0)
        self.commit(Proposal(edit_id, et, neurons, stub, gating.GateResult(passed=True), 0, 0.0))
        return verdict

    def edit(self, enc: Encoded, edit_id: str) -> EditOutcome:
        proposal = self.propose(enc, edit_id)
        if proposal is None:
            return EditOutcome("already_fixed")
        if proposal.accepted:
            self.commit(proposal)
            return EditOutcome("accepted", proposal)
        return EditOutcome("rejected", proposal, list(proposal.gate.reasons))

    def _delta(self, nr: Neurons, q: torch.Tensor) -> torch.Tensor:
        return neuron_output(q, nr.keys, nr.biases, nr.values, self.train_cfg.activation)

    def _add_to_caches(self, nr: Neurons) -> None:
        if self.heldout is not None:
            h = self.heldout = replace(self.heldout)  # a new object: checkpoints keep the old one
            # only rows where the new neurons fire can change; predictions_with skips the rest
            h.pred, _ = gating.predictions_with(
                nr, self.train_cfg.activation, h.q, h.ffn, h.residual, self.tail, h.pred
            )
            h.ffn = h.ffn + self._delta(nr, h.q)
        if len(self._retention):
            # in place, and only the rows where a new neuron fires: elsewhere its output is exactly
            # 0 (relu, relu-cap), so the other rows would not change by a bit; the act @ values
            # product is what neuron_output computes, on those rows alone
            r = self._retention.view()
            act = activate(r["q"] @ nr.keys.T + nr.biases, self.train_cfg.activation)  # [R, m]
            rows = (act != 0).any(1).nonzero().flatten()
            if rows.numel():
                r["ffn"][rows] += act[rows] @ nr.values

    def checkpoint(self) -> Checkpoint:
        """A snapshot of the editing state to roll back to (the retention ffn is copied: it changes in place)."""
        n = len(self._retention)
        ffn = self._retention.view()["ffn"].clone() if n else None
        return Checkpoint(len(self.memory), self.heldout, n, ffn, list(self._edits))

    def rollback(self, cp: Checkpoint) -> None:
        """Undo every edit committed after `cp` (neurons, memory rows, caches)."""
        self.wrapper.remove([e for e in self._edits if e not in set(cp.edits)])
        self.memory.truncate(cp.memory_rows)
        self._retention.truncate(cp.retention_rows)
        if cp.retention_ffn is not None:
            self._retention.view()["ffn"].copy_(cp.retention_ffn)
        self.heldout, self._edits = cp.heldout, list(cp.edits)

    def export_state(self) -> EditState:
        """The edits' whole effect on this Patcher (see EditState); views, no copies."""
        h = self.heldout
        w = self.wrapper
        return EditState(
            list(self._edits),
            list(w.edit_ids),
            w.keys,
            w.biases,
            w.values,
            self.memory.view()[self._memory_base :],
            h.ffn if h is not None else None,
            h.pred if h is not None else None,
            self.retention,
        )

    def restore_state(self, state: EditState) -> None:
        """Make a fresh Patcher (base M and held-out cache built, no edit yet) the one that
        exported `state`. Shapes are checked against this Patcher's own caches: a state from
        other memory or held-out inputs is refused, not half applied."""
        if self._edits or self.wrapper.n or len(self.memory) != self._memory_base:
            raise ValueError("restore_state needs a fresh Patcher: edits were already applied")
        h = self.heldout
        if (h is None) != (state.heldout_ffn is None) or (
            h is not None and state.heldout_ffn is not None and state.heldout_ffn.shape != h.ffn.shape
        ):
            raise ValueError("the state's held-out rows do not match this Patcher's held-out cache")
        if state.memory_rows.ndim != 2 or state.memory_rows.shape[1] != self.site.hidden_size:
            raise ValueError(f"memory rows {tuple(state.memory_rows.shape)} do not fit width {self.site.hidden_size}")
        device = self.memory.device
        self.wrapper.restore(
            state.keys.to(device), state.biases.to(device), state.values.to(device), state.neuron_edits
        )
        self.memory.append(state.memory_rows.to(device))  # M's base rows stay first (whitening reads those)
        if h is not None and state.heldout_ffn is not None and state.heldout_pred is not None:
            self.heldout = replace(h, ffn=state.heldout_ffn.to(device), pred=state.heldout_pred.to(device))
        r = state.retention
        if r is not None:
            assert r.group is not None  # commit numbers every retention row by its edit
            self._retention.append(
                {"q": r.q, "ffn": r.ffn, "residual": r.residual, "targets": r.targets, "group": r.group}
            )
        self._edits = list(state.edits)

    def detach(self) -> None:
        """Remove the wrapper: the model is the untouched base again."""
        detach(self.site)


@torch.no_grad()
def generates(model: Any, enc: Encoded, device: torch.device | str) -> bool:
    """Real greedy generate() of the edit's prompt (example 0 of a generation encoding) gives
    exactly its target tokens, with whatever neurons the model holds."""
    assert enc.prompts is not None and enc.target_ids is not None
    prompt, target = enc.prompts[0].to(device), enc.target_ids[0].to(device)
    out = model.generate(
        input_ids=prompt[None],
        attention_mask=torch.ones_like(prompt)[None],
        max_new_tokens=int(target.numel()),
        do_sample=False,
        pad_token_id=int(model.config.pad_token_id or 0),
    )
    new = out[0, prompt.numel() :] if not model.config.is_encoder_decoder else out[0, 1:]
    return bool(new.shape == target.shape and bool((new == target).all()))


def split_equivalents(et: EditTensors) -> tuple[EditTensors, EditTensors | None]:
    """Rows of example 0 (the edit) and of examples 1.. (its train equivalents, or None).

    Only the edit's own rows are gated, kept for retention and added to M: the equivalents are
    extra training rows, not a second edit."""
    if et.group is None or not bool((et.group != 0).any()):
        return et, None
    group = et.group

    def rows(m: torch.Tensor) -> EditTensors:
        return EditTensors(et.q[m], et.ffn[m], et.residual[m], et.targets[m], group=group[m])

    return rows(group == 0), rows(group != 0)


def _concat(parts: list[EditTensors]) -> EditTensors:
    groups = [p.group for p in parts if p.group is not None]
    return EditTensors(
        torch.cat([p.q for p in parts]),
        torch.cat([p.ffn for p in parts]),
        torch.cat([p.residual for p in parts]),
        torch.cat([p.targets for p in parts]),
        group=torch.cat(groups) if len(groups) == len(parts) else None,
    )
