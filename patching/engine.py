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
from patching import patchfile
from patching.arch import FFNSite, locate, tail_logits
from patching.capture import frozen_forward
from patching.config import GateConfig, TrainConfig
from patching.encode import Encoded
from patching.fasttail import LinearTail, linear_tail
from patching.init import RIDGE, whitening
from patching.layer import PatchedFFN, activate, attach, attach_subject, detach, neuron_output, trained_as
from patching.memory_bank import MemoryBank, RowBank
from patching.reference import train_reference
from patching.saturation import BAND_NARROWER, band, cap, saturations
from patching.subject import (
    FLOOR,
    Detector,
    Refs,
    SequenceBank,
    Sequences,
    fit_detector,
    inputs_of,
    locate_token,
    whitening_apart,
    whitening_with,
    with_column,
)
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
    # trainer.subject_key: the edit's own layer-L_s rows and row positions, and its detector (None:
    # none separates its subject from the memory, the neurons are ordinary ones). With a detector,
    # `edit` and the neurons' keys carry m as one more column (patching/subject.py)
    subject: SubjectEdit | None = None

    @property
    def accepted(self) -> bool:
        return self.gate.passed


@dataclass
class SubjectEdit:
    seq: Sequences  # [1, T, d_s] example 0 (the edit itself)
    t: torch.Tensor  # [R] position of each of the edit's rows
    detector: Detector | None
    # c [n] as a stored patch holds them (replay): the layer gets these bits, not key * scale again
    gains: torch.Tensor | None = None


@dataclass
class Caches:
    """What an edit's neurons are trained and gated against: the Patcher's own caches, or the same
    with a subject detector's m as one more column of every q."""

    memory: torch.Tensor  # [N, d (+1)]
    retention: EditTensors | None
    heldout: gating.HeldoutTensors | None
    whiten: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class SubjectCache:
    """trainer.subject_key: layer-L_s rows of every sequence a cached row comes from, and where
    each row of M, of the held-out cache and of the retention rows sits in them."""

    site: FFNSite
    memory: SequenceBank  # memory inputs, then each accepted edit's own sequence
    heldout: SequenceBank
    memory_refs: Refs
    heldout_refs: Refs
    retention_refs: Refs


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
    subject: SubjectState | None = None  # trainer.subject_key: what the edits added for it


@dataclass
class SubjectState:
    """trainer.subject_key's part of an EditState: the accepted edits' own layer-L_s sequences
    (rows [P, d_s], token ids [P], lengths [E]; one per edit, after the memory inputs' sequences),
    the sequence refs (seq, t) of M's edit rows [m, 2] and of the retention rows [R, 2], and the
    layer's detectors (w [n, d_s], a [n], c [n]; None while no neuron has one)."""

    rows: torch.Tensor
    ids: torch.Tensor
    lengths: torch.Tensor
    memory_refs: torch.Tensor
    retention_refs: torch.Tensor
    detectors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class Checkpoint:
    """Patcher.checkpoint(): what rollback() needs to undo the edits committed after it."""

    memory_rows: int
    heldout: gating.HeldoutTensors | None
    retention_rows: int
    retention_ffn: torch.Tensor | None  # a copy: the bank's ffn rows are updated in place
    edits: list[str]
    subject_sequences: int | None = None  # trainer.subject_key: the layer-L_s bank's length


def _causal(model: torch.nn.Module, site: FFNSite) -> bool:
    return site.spec.kind == "generation" and not getattr(model.config, "is_encoder_decoder", False)


def _subject_layer(cfg: TrainConfig, site: FFNSite) -> int:
    return int(cfg.subject_layer * site.layers)


def resolved_config(model: torch.nn.Module, train: TrainConfig, site: FFNSite | None = None) -> TrainConfig:
    """`train` with every default that depends on the model filled in: the task kind's (for_task)
    and trainer.subject_key's (None: on for a causal LM trained cached whose subject layer lies
    below the patched one, where it has a layer to read). Reports record this, not the Nones."""
    site = site or locate(model)
    cfg = train.for_task(site.spec.kind == "generation")
    if cfg.subject_key is None:
        on = _causal(model, site) and cfg.mode == "cached" and _subject_layer(cfg, site) < site.layer_index
        cfg = replace(cfg, subject_key=on)
    return cfg


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
        self.train_cfg = resolved_config(model, train or TrainConfig(), self.site)
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
        self._ridge = 0.0  # the fisher whitening's absolute ridge (subject columns reuse it)
        self._scale: float | None = None  # the subject column's width, from M's base rows (subject_scale)
        self._memory_base = 0  # rows of M that come from unrelated inputs, not from edits
        self.subject: SubjectCache | None = None
        if self.train_cfg.subject_key:
            if not _causal(model, self.site):
                raise ValueError("trainer.subject_key needs a causal LM (it reads the prompt's subject token)")
            s_site = locate(model, arch, layer=_subject_layer(self.train_cfg, self.site))
            attach_subject(self.site, self.wrapper, s_site)
            dim = int(s_site.hidden_size)
            self.subject = SubjectCache(
                s_site,
                SequenceBank(dim, ref.device),
                SequenceBank(dim, ref.device),
                Refs.empty(ref.device),
                Refs.empty(ref.device),
                Refs.empty(ref.device),
            )

    # ------------------------------------------------------------------ caching
    def tail(self, ffn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Logits [R, C] (float32) of the rows ffn, residual [R, d] (float32): the model's own tail
        modules run in its dtype, as the deployed model runs them (a no-op cast for float32)."""
        return tail_logits(self.site, ffn.to(self.dtype), residual.to(self.dtype)).float()

    def cache(self, enc: Encoded) -> EditTensors:
        """One frozen forward of the current model; the rows of `enc` at the patched layer."""
        return self._capture(enc)[0]

    def _capture(self, enc: Encoded, surprise: bool = False) -> tuple[EditTensors, Sequences | None]:
        """cache(), and with trainer.subject_key also layer L_s's input at every position of the batch
        (and with `surprise` the base's surprise at each token of example 0: the locator's)."""
        batch = {k: v.to(self.memory.device) for k, v in enc.batch.items()}
        if self.subject is None:
            cap, _ = frozen_forward(self.site, batch)
            seqs = None
        else:
            with inputs_of(self.subject.site.ffn_in) as got:
                cap, logits = frozen_forward(self.site, batch)
            mask = batch.get("attention_mask")
            valid = mask.bool() if mask is not None else torch.ones(got[-1].shape[:2], dtype=torch.bool)
            ids = batch["input_ids"].to(got[-1].device)
            seqs = Sequences(got[-1], valid.to(got[-1].device), ids)
            if surprise:
                logp = logits[0, :-1].float().log_softmax(-1)  # [T-1, V]: token t+1 given tokens <= t
                seqs.surprise = torch.cat([logp.new_zeros(1), -logp.gather(1, ids[0, 1:, None])[:, 0]])  # [T]
        q, ffn, res = cap.require()
        b, t = enc.rows_b.to(q.device), enc.rows_t.to(q.device)
        et = EditTensors(q[b, t].float(), ffn[b, t].float(), res[b, t].float(), enc.targets.to(q.device), group=b)
        return et, seqs

    def build_memory(self, batches: Iterable[Encoded]) -> int:
        """Append the FFN inputs of every row of every batch to M. Returns the memory size."""
        for enc in batches:
            et, seqs = self._capture(enc)
            self._add_memory(et.q)
            if self.subject is not None and seqs is not None:
                first = self.subject.memory.add(seqs)
                refs = self.subject.memory_refs.plus(first + enc.rows_b, enc.rows_t)
                self.subject.memory_refs = refs
        return len(self.memory)

    def add_memory(self, rows: torch.Tensor) -> None:
        """Append unrelated inputs' FFN inputs [m, d] to M (edits' own rows are appended by commit).

        Statistics derived from M (the fisher init's whitening) use these rows only, so a restart
        that replays stored edits derives exactly what an uninterrupted run derived.
        """
        if self.subject is not None and len(self.subject.memory_refs.seq) != len(self.memory) + rows.shape[0]:
            raise ValueError(
                "trainer.subject_key needs M built from inputs (build_memory), or the rows' sequences "
                "put back first (load_subject_base), not bare rows"
            )
        self._add_memory(rows)

    def subject_base(self) -> dict[str, dict[str, torch.Tensor]]:
        """trainer.subject_key, before any edit: the layer-L_s sequences behind M's rows and the
        held-out rows and where each row sits in them, as the activation store's subject splits
        (daemon/caches.py keeps them beside M; load_subject_base puts them back)."""
        if self.subject is None or self._edits:
            raise ValueError("subject_base needs trainer.subject_key and no edit yet")
        sub, out = self.subject, {}
        for name, bank, refs in (("memory", sub.memory, sub.memory_refs), ("heldout", sub.heldout, sub.heldout_refs)):
            rows, ids, lengths = bank.since(0)
            out[f"subject_{name}_rows"] = {"g": rows, "ids": ids}  # [P, d_s], [P]
            out[f"subject_{name}_lengths"] = {"length": lengths}  # [S]
            out[f"subject_{name}_refs"] = {"seq": refs.seq, "t": refs.t}  # [N] each
        return out

    def load_subject_base(self, parts: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Put back what subject_base() gave, before M's base rows (add_memory) and the held-out cache."""
        if self.subject is None or len(self.subject.memory) or len(self.subject.heldout):
            raise ValueError("load_subject_base needs trainer.subject_key and a fresh Patcher")
        sub, device = self.subject, self.memory.device
        for name, bank in (("memory", sub.memory), ("heldout", sub.heldout)):
            rows, lengths = parts[f"subject_{name}_rows"], parts[f"subject_{name}_lengths"]["length"]
            bank.append_raw(rows["g"], rows["ids"], lengths)
            refs = parts[f"subject_{name}_refs"]
            loaded = Refs(refs["seq"].to(device, torch.long), refs["t"].to(device, torch.long))
            if name == "memory":
                sub.memory_refs = loaded
            else:
                sub.heldout_refs = loaded

    def _add_memory(self, rows: torch.Tensor) -> None:
        self.memory.append(rows)
        self._memory_base = len(self.memory)
        self._whiten = None
        self._scale = None

    def build_heldout(self, batches: Iterable[Encoded], with_labels: bool = False) -> int:
        parts: list[EditTensors] = []
        offset = 0
        for enc in batches:
            et, seqs = self._capture(enc)
            if self.subject is not None and seqs is not None:
                first = self.subject.heldout.add(seqs)
                self.subject.heldout_refs = self.subject.heldout_refs.plus(first + enc.rows_b, enc.rows_t)
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
        if isinstance(enc, EditTensors):
            if self.subject is not None:
                raise ValueError("trainer.subject_key needs the encoded edit, not cached tensors")
            full, seqs = enc, None
        else:
            full, seqs = self._capture(enc, surprise=self.train_cfg.subject_locator != "memory")
        # an encoded edit may carry train equivalents: examples 1.. of the batch, same target
        et, extra = split_equivalents(full)
        if self.is_right(et):
            return None
        subject = None
        if seqs is not None and isinstance(enc, Encoded):
            subject, m = self._subject_edit(enc, full, seqs)
            if subject.detector is not None and m is not None:
                # m as one more column of every row the neurons are trained and gated on
                et, extra = split_equivalents(replace(full, q=with_column(full.q, subject.detector.column(m))))
                if self.train_cfg.subject_floor:
                    extra = with_floor_copy(et, extra, subject.detector)
        caches = self._caches(subject.detector if subject is not None else None)
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
                result = self._train(enc, et, anchors, obj, attempt, caches, eq)
                train_s += result.seconds
                tries += 1
                for neurons, saturation in self._as_run(result.neurons, et):
                    # the stop rule is the trainer's proxy; the gate has the final word (a neuron that still
                    # fires on a memory row is kept only if no held-out prediction and no earlier edit moved)
                    verdict = self._gate(neurons, et, enc, edit_id, caches, subject)
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
            proposal = self._banded(proposal, enc, caches, subject)
        proposal.seconds = time.perf_counter() - t0
        proposal.train_seconds = train_s
        proposal.tries = history
        proposal.subject = subject
        return proposal

    def _subject_edit(
        self, enc: Encoded, full: EditTensors, seqs: Sequences
    ) -> tuple[SubjectEdit, torch.Tensor | None]:
        """The edit's layer-L_s rows, and its subject detector with m [R] at every row of `full`
        (the edit's and its copies'), or no detector when none separates it from the memory.

        The positive rows: the prompt's token least like the memory (subject.locate_token), at its
        last occurrence in each example's prompt (the edit, its context and chat copies, its
        equivalents); the negatives: every position of every memory sequence (memory inputs and
        accepted edits) that does not hold that token. A memory text about the same subject is no
        negative: the detector is to find the subject wherever it is asked about, and the key's
        part on the patched layer's own row keeps the neuron off such a text."""
        assert self.subject is not None and full.group is not None and enc.prompts is not None
        group, t_all = full.group, enc.rows_t.to(full.group.device)
        edit = SubjectEdit(Sequences(seqs.g[:1], seqs.valid[:1], seqs.ids[:1]), t_all[group == 0], None)
        bank = self.subject.memory
        if not len(bank):
            return edit, None
        prompt = enc.prompts[0]
        n = prompt.numel()
        surprise = seqs.surprise[:n] if seqs.surprise is not None else None
        name = enc.name_pieces if self.train_cfg.subject_locator == "name" else None
        if name is not None and name.numel() != n:
            raise ValueError(f"name_pieces holds {name.numel()} codes for a prompt of {n} tokens")
        at = locate_token(seqs.g[0, :n], prompt.to(seqs.g.device), bank, surprise=surprise, name=name)
        token = int(prompt[at])
        neg = bank.rows_without(token)
        positives = []
        for i, p in enumerate(enc.prompts):
            hits = (p[1:] == token).nonzero().flatten()  # position 0 never (see locate_token)
            if hits.numel():
                positives.append(seqs.g[i, 1 + int(hits[-1])])
        fit = fit_detector(torch.stack(positives), neg) if positives else None
        if fit is None:
            return edit, None
        edit.detector = Detector(fit[0], fit[1], self.subject_scale())
        return edit, seqs.prefix_max(fit[0], fit[1], group, t_all)

    def subject_scale(self) -> float:
        """The width of m's column: the mean norm of M's base rows, so that the key's subject term
        moves as much per training step as its q part does. Computed once, as the whitening is."""
        if self._scale is None:
            base = self.memory.view()[: self._memory_base]
            self._scale = float(base.norm(dim=1).mean()) if base.shape[0] else 1.0
        return self._scale

    def _caches(self, detector: Detector | None) -> Caches:
        """The caches to train and gate against; with a detector, m as one more column of each."""
        memory, retention, heldout, whiten = self.memory.view(), self.retention, self.heldout, self.whitening()
        if detector is None or self.subject is None:
            return Caches(memory, retention, heldout, whiten)
        sub, w, a = self.subject, detector.w, detector.a
        if sub.memory_refs.seq.shape[0] != memory.shape[0]:
            raise RuntimeError(f"{sub.memory_refs.seq.shape[0]} sequence refs for {memory.shape[0]} memory rows")
        m = sub.memory.prefix_max(w, a, sub.memory_refs.seq, sub.memory_refs.t)  # [N]
        if whiten is not None:
            column = detector.column(m[: self._memory_base])[:, 0]
            if self.train_cfg.subject_floor:  # the key starts as the plain one: c = 0
                whiten = whitening_apart(whiten, column)
            else:
                base = self.memory.view()[: self._memory_base]
                whiten = whitening_with(whiten, base, column, self._ridge)
        memory = with_column(memory, detector.column(m))
        if retention is not None:
            refs = sub.retention_refs
            retention = replace(
                retention, q=with_column(retention.q, detector.column(sub.memory.prefix_max(w, a, refs.seq, refs.t)))
            )
        if heldout is not None:
            refs = sub.heldout_refs
            heldout = replace(
                heldout, q=with_column(heldout.q, detector.column(sub.heldout.prefix_max(w, a, refs.seq, refs.t)))
            )
        return Caches(memory, retention, heldout, whiten)

    def _layer_neurons(
        self, nr: Neurons, subject: SubjectEdit | None
    ) -> tuple[Neurons, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """Trained neurons as the layer holds them: keys [n, d] and, for subject neurons (keys
        [n, d + 1], the last entry on m's column), the detectors (w [n, d_s], a [n], c [n])."""
        if subject is None or subject.detector is None:
            return nr, None
        det, n = subject.detector, nr.n
        gains = nr.keys[:, -1] * det.scale if subject.gains is None else subject.gains  # k_last * (scale * m) = c * m
        return Neurons(nr.keys[:, :-1], nr.biases, nr.values), (det.w.expand(n, -1), det.a.expand(n), gains)

    def stored(self, proposal: Proposal) -> patchfile.PatchTensors:
        """A proposal's neurons as the layer holds them and a patch file stores them: keys [n, d],
        and for subject neurons their detectors with the column scale (replay's inverse)."""
        plain, det = self._layer_neurons(proposal.neurons, proposal.subject)
        subject = None
        if det is not None and self.wrapper.subject_layer is not None:
            w, a, c = det
            subject = patchfile.SubjectTensors(w, a, c, self.wrapper.subject_layer, self.subject_scale())
        ids = [proposal.edit_id] * plain.n
        return patchfile.PatchTensors(plain.keys, plain.biases, plain.values, ids, subject=subject)

    def _band_applies(self) -> bool:
        """The band is the last try of a relu-cap edit that the gate refused only because its
        neurons fired elsewhere (a held-out input or an earlier edit changed); on a generator only
        with trainer.band_generation."""
        cfg = self.train_cfg
        return cfg.activation == "relu-cap" and cfg.band > 0 and (not self.generation or cfg.band_generation)

    def _banded(
        self, proposal: Proposal, enc: Encoded | EditTensors, caches: Caches, subject: SubjectEdit | None
    ) -> Proposal:
        """The last attempt's trained neurons as a band around the edit (saturation.band), gated;
        the configured width first, then a narrower one (FEVER's 78 locality refusals of a 10,000-edit
        stream, each edit alone: 0.05 keeps 72, 0.02 keeps 77; docs/results/scale-20/)."""
        et = proposal.edit
        for width in (self.train_cfg.band, self.train_cfg.band * BAND_NARROWER):
            neurons = band(proposal.train.neurons, et.q, width)
            verdict = self._gate(neurons, et, enc, proposal.edit_id, caches, subject)
            if verdict.passed:
                return Proposal(
                    proposal.edit_id, et, neurons, proposal.train, verdict, proposal.attempts, 0.0, None, banded=True
                )
        return proposal  # the refused verdict of the regular attempts stands

    def _gate(
        self,
        nr: Neurons,
        et: EditTensors,
        enc: Encoded | EditTensors,
        edit_id: str,
        caches: Caches,
        subject: SubjectEdit | None = None,
    ) -> gating.GateResult:
        """The gate's verdict on candidate neurons; on a generator with the edit encoded (not only
        cached), a passing candidate must also make real greedy generate() give the target."""
        cfg = self.train_cfg
        verdict = gating.check(nr, cfg.activation, et, caches.retention, caches.heldout, self.tail, self.gate_cfg)
        if verdict.passed and self.generation and not isinstance(enc, EditTensors):
            if not self._generates(enc, nr, edit_id, subject):
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
        caches: Caches,
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
            caches.memory,
            self.tail,
            cfg,
            obj,
            trained_as(cfg.activation),
            seed,
            whiten=caches.whiten,
            extra=extra,
            fast=self.fast_tail if cfg.fast_tail else None,
        )

    def whitening(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Memory mean and inverse covariance for the fisher init, computed once from the memory as
        built (the rows of accepted edits appended later are a negligible share of it)."""
        if self.train_cfg.init != "fisher" or self._memory_base < 2:
            return None
        if self._whiten is None:
            base = self.memory.view()[: self._memory_base]
            self._whiten = whitening(base, RIDGE)
            self._ridge = RIDGE * float(base.var(dim=0).mean())  # the absolute ridge whitening() added
        return self._whiten

    def _generates(self, enc: Encoded, nr: Neurons, edit_id: str, subject: SubjectEdit | None = None) -> bool:
        """Real greedy generate() with the neurons in place; they are removed again afterwards."""
        assert enc.prompts is not None and enc.target_ids is not None
        plain, det = self._layer_neurons(nr, subject)
        self.wrapper.add(plain.keys, plain.biases, plain.values, edit_id, subject=det)
        try:
            return generates(self.model, enc, self.memory.device)
        finally:
            self.wrapper.remove([edit_id])

    def commit(self, proposal: Proposal) -> None:
        """Apply an accepted proposal: add its neurons, update every cache, extend M."""
        if not proposal.accepted:
            raise ValueError(f"edit {proposal.edit_id}: a rejected proposal is never committed")
        nr, sub = proposal.neurons, proposal.subject
        plain, det = self._layer_neurons(nr, sub)
        caches = self._caches(sub.detector if sub is not None else None)  # before this edit's rows join
        self.wrapper.add(plain.keys, plain.biases, plain.values, proposal.edit_id, subject=det)
        self._add_to_caches(nr, caches)
        et = proposal.edit
        q = et.q[:, :-1] if det is not None else et.q  # a subject edit's rows carry m as their last column
        self._retention.append(
            {
                "q": q,
                "ffn": et.ffn + self._delta(nr, et.q),
                "residual": et.residual,
                "targets": et.targets,
                "group": torch.full_like(et.targets, len(self._edits)),
            }
        )
        self.memory.append(q)
        if self.subject is not None:
            if sub is None:
                raise ValueError("trainer.subject_key: a proposal without the edit's sequence cannot be committed")
            seq = self.subject.memory.add(sub.seq)
            ids = torch.full_like(sub.t, seq)
            self.subject.memory_refs = self.subject.memory_refs.plus(ids, sub.t)
            self.subject.retention_refs = self.subject.retention_refs.plus(ids, sub.t)
        self._edits.append(proposal.edit_id)

    def replay(
        self,
        enc: Encoded,
        edit_id: str,
        neurons: Neurons,
        subject: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        scale: float | None = None,
    ) -> gating.GateResult:
        """Re-apply a stored, previously accepted edit (restart recovery), in its original order.

        The gate is run again on the current caches so the caller can verify it against the stored
        result; the neurons are committed either way, because the stored model is the truth.
        Stored neurons may come from the CPU (a file); they are moved to the caches' device here.
        `subject`: the neurons' detectors as the layer holds them (w [n, d_s], a [n], c [n]) and
        `scale` the column width they were trained with (patchfile.SubjectTensors); with
        trainer.subject_key every replayed edit also joins the layer-L_s bank, detector or not.
        """
        device = self.memory.device
        neurons = Neurons(neurons.keys.to(device), neurons.biases.to(device), neurons.values.to(device))
        if self.subject is None:
            if subject is not None:
                raise ValueError(f"edit {edit_id}: stored subject neurons need trainer.subject_key")
            et, sub = self.cache(enc), None
            retention, heldout = self.retention, self.heldout
        else:
            neurons, et, sub = self._replayed_subject(enc, edit_id, neurons, subject, scale)
            caches = self._caches(sub.detector)
            retention, heldout = caches.retention, caches.heldout
        verdict = gating.check(neurons, self.train_cfg.activation, et, retention, heldout, self.tail, self.gate_cfg)
        stub = TrainResult(neurons, True, 0, 0.0, 0.0, 0.0)
        proposal = Proposal(edit_id, et, neurons, stub, gating.GateResult(passed=True), 0, 0.0, subject=sub)
        self.commit(proposal)
        return verdict

    def _replayed_subject(
        self,
        enc: Encoded,
        edit_id: str,
        neurons: Neurons,
        subject: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        scale: float | None,
    ) -> tuple[Neurons, EditTensors, SubjectEdit]:
        """A stored edit in the trained form commit() takes: the edit's rows, with m's column and
        keys [n, d + 1] (the last entry c / scale) when its neurons have a detector."""
        assert self.subject is not None
        full, seqs = self._capture(enc)
        assert full.group is not None and seqs is not None
        et, _ = split_equivalents(full)
        group, t_all = full.group, enc.rows_t.to(full.group.device)
        sub = SubjectEdit(Sequences(seqs.g[:1], seqs.valid[:1], seqs.ids[:1]), t_all[group == 0], None)
        if subject is None:
            return neurons, et, sub
        if scale is None or scale != self.subject_scale():
            raise ValueError(
                f"edit {edit_id}: its subject neurons were trained with column scale {scale}, this memory "
                f"gives {self.subject_scale()} (another memory or base)"
            )
        device = self.memory.device
        w, a, c = (x.to(device=device, dtype=torch.float32) for x in subject)
        sub.detector = Detector(w[0], a[0], scale)
        sub.gains = c
        m = seqs.prefix_max(w[0], a[0], group[group == 0], t_all[group == 0])  # [R] the edit's own rows
        et = replace(et, q=with_column(et.q, sub.detector.column(m)))
        keys = torch.cat([neurons.keys, (c / scale)[:, None]], 1)
        return Neurons(keys, neurons.biases, neurons.values), et, sub

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

    def _add_to_caches(self, nr: Neurons, caches: Caches) -> None:
        """The new neurons' output added to the held-out and retention caches; `caches` holds their
        q as the neurons read them (with m's column for subject neurons)."""
        if self.heldout is not None:
            hq = caches.heldout.q if caches.heldout is not None else self.heldout.q
            h = self.heldout = replace(self.heldout)  # a new object: checkpoints keep the old one
            # only rows where the new neurons fire can change; predictions_with skips the rest
            h.pred, _ = gating.predictions_with(nr, self.train_cfg.activation, hq, h.ffn, h.residual, self.tail, h.pred)
            h.ffn = h.ffn + self._delta(nr, hq)
        if len(self._retention):
            # in place, and only the rows where a new neuron fires: elsewhere its output is exactly
            # 0 (relu, relu-cap), so the other rows would not change by a bit; the act @ values
            # product is what neuron_output computes, on those rows alone
            r = self._retention.view()
            rq = caches.retention.q if caches.retention is not None else r["q"]
            act = activate(rq @ nr.keys.T + nr.biases, self.train_cfg.activation)  # [R, m]
            rows = (act != 0).any(1).nonzero().flatten()
            if rows.numel():
                r["ffn"][rows] += act[rows] @ nr.values

    def checkpoint(self) -> Checkpoint:
        """A snapshot of the editing state to roll back to (the retention ffn is copied: it changes in place)."""
        n = len(self._retention)
        ffn = self._retention.view()["ffn"].clone() if n else None
        seqs = len(self.subject.memory) if self.subject is not None else None
        return Checkpoint(len(self.memory), self.heldout, n, ffn, list(self._edits), seqs)

    def rollback(self, cp: Checkpoint) -> None:
        """Undo every edit committed after `cp` (neurons, memory rows, caches)."""
        self.wrapper.remove([e for e in self._edits if e not in set(cp.edits)])
        self.memory.truncate(cp.memory_rows)
        self._retention.truncate(cp.retention_rows)
        if cp.retention_ffn is not None:
            self._retention.view()["ffn"].copy_(cp.retention_ffn)
        self.heldout, self._edits = cp.heldout, list(cp.edits)
        if self.subject is not None:
            if cp.subject_sequences is None:
                raise ValueError("a checkpoint taken without trainer.subject_key")
            sub = self.subject
            sub.memory.truncate(cp.subject_sequences)
            sub.memory_refs = sub.memory_refs.first(cp.memory_rows)
            sub.retention_refs = sub.retention_refs.first(cp.retention_rows)

    def export_state(self) -> EditState:
        """The edits' whole effect on this Patcher (see EditState); views, no copies."""
        h = self.heldout
        w = self.wrapper
        subject = None
        if self.subject is not None:
            sub, base = self.subject, self._memory_base
            rows, ids, lengths = sub.memory.since(len(sub.memory) - len(self._edits))  # one sequence per edit
            subject = SubjectState(
                rows,
                ids,
                lengths,
                torch.stack([sub.memory_refs.seq[base:], sub.memory_refs.t[base:]], 1),
                torch.stack([sub.retention_refs.seq, sub.retention_refs.t], 1),
                w.det,
            )
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
            subject,
        )

    def restore_state(self, state: EditState) -> None:
        """Make a fresh Patcher (base M and held-out cache built, no edit yet) the one that
        exported `state`. Shapes are checked against this Patcher's own caches: a state from
        other memory or held-out inputs is refused, not half applied."""
        if self._edits or self.wrapper.n or len(self.memory) != self._memory_base:
            raise ValueError("restore_state needs a fresh Patcher: edits were already applied")
        if (self.subject is None) != (state.subject is None):
            raise ValueError(
                "the state was exported with trainer.subject_key " + ("off" if state.subject is None else "on")
            )
        h = self.heldout
        if (h is None) != (state.heldout_ffn is None) or (
            h is not None and state.heldout_ffn is not None and state.heldout_ffn.shape != h.ffn.shape
        ):
            raise ValueError("the state's held-out rows do not match this Patcher's held-out cache")
        if state.memory_rows.ndim != 2 or state.memory_rows.shape[1] != self.site.hidden_size:
            raise ValueError(f"memory rows {tuple(state.memory_rows.shape)} do not fit width {self.site.hidden_size}")
        device = self.memory.device
        if state.subject is not None:
            self._check_subject_state(state)
        self.wrapper.restore(
            state.keys.to(device), state.biases.to(device), state.values.to(device), state.neuron_edits
        )
        if state.subject is not None:
            self._restore_subject(state.subject)
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

    def _check_subject_state(self, state: EditState) -> None:
        """Refuse a subject state that does not fit this Patcher before anything changes."""
        assert self.subject is not None and state.subject is not None
        sub, got = self.subject, state.subject
        m = state.memory_rows.shape[0]
        if got.lengths.shape != (len(state.edits),) or got.memory_refs.shape != (m, 2):
            raise ValueError("the state's layer-L_s sequences do not match its edits and memory rows")
        if got.rows.ndim != 2 or got.rows.shape[1] != sub.memory.rows().shape[1]:
            raise ValueError(f"layer-L_s rows {tuple(got.rows.shape)} do not fit this subject layer")
        det = got.detectors
        if det is not None and (det[0].shape[0] != state.keys.shape[0] or det[0].shape[1] != got.rows.shape[1]):
            raise ValueError("the state's detectors do not match its neurons")

    def _restore_subject(self, got: SubjectState) -> None:
        """The bank, refs and detectors of a checked SubjectState (restore_state)."""
        assert self.subject is not None
        sub, device = self.subject, self.memory.device
        sub.memory.append_raw(got.rows, got.ids, got.lengths)
        refs = got.memory_refs.to(device)
        sub.memory_refs = sub.memory_refs.plus(refs[:, 0], refs[:, 1])
        refs = got.retention_refs.to(device)
        sub.retention_refs = Refs(refs[:, 0].clone(), refs[:, 1].clone())
        if got.detectors is not None:
            self.wrapper.restore_subject(got.detectors)

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


def with_floor_copy(et: EditTensors, extra: EditTensors | None, detector: Detector) -> EditTensors:
    """trainer.subject_floor: the equivalents plus the edit's own rows with m at its floor, as one
    more example. Trained with them, the key fires on the edit without the subject term, so that
    term only adds (a paraphrase that lost the located token is still reached the last position's
    way); where no key can, the equivalents are dropped and the edit is trained alone (propose)."""
    q = et.q.clone()
    q[:, -1] = detector.column(torch.full_like(q[:, -1], FLOOR))[:, 0]
    last = int(extra.group.max()) if extra is not None and extra.group is not None else 0
    floor = EditTensors(q, et.ffn, et.residual, et.targets, group=torch.full_like(et.targets, last + 1))
    return floor if extra is None else _concat([extra, floor])


def _concat(parts: list[EditTensors]) -> EditTensors:
    groups = [p.group for p in parts if p.group is not None]
    return EditTensors(
        torch.cat([p.q for p in parts]),
        torch.cat([p.ffn for p in parts]),
        torch.cat([p.residual for p in parts]),
        torch.cat([p.targets for p in parts]),
        group=torch.cat(groups) if len(groups) == len(parts) else None,
    )
