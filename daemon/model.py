"""The patched model the daemon edits: base + memory M + held-out cache + the stored patches.

    model = PatchedModel.load(settings)              # base, M and held-out built once
    rebuilt = model.rebuild(store)                   # restart: recover, then replay every kept patch
    proposal = model.propose(mistake, equivalents)   # None = already right; nothing changes
    model.commit(proposal)                           # only AFTER the patch row is stored

The worker's one door to the engine: it hands over a stored mistake (its input as the producer
sent it: a text or a text pair, memory.records.InputValue) and gets the engine's typed Proposal
back; the encoding, the neurons and the caches stay behind this class.

Restart contract (memory/store.py): a mistake left in `patching` was never kept, so it goes back
to `queued`; the accepted patches are replayed in acceptance order, which recomputes exactly the
caches (retention rows, memory rows, held-out predictions) the original run had, and the gate is
run again on each so that a stored verdict that no longer holds is reported, not hidden.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.caches import ModelSetupError, build_caches, memory_inputs
from daemon.logs import get_logger
from daemon.settings import Settings, resolve_device
from memory.records import InputValue, MistakeRecord, PatchIn, PatchRecord
from memory.store import Store
from patching import patchfile
from patching.bases.load import LoadedBase, load_base, resolve_dtype
from patching.bases.tasks import TaskAdapter
from patching.encode import Encoded
from patching.engine import Patcher, Proposal
from patching.trainer import Neurons

__all__ = ["ModelSetupError", "PatchedModel", "Rebuilt", "edit_inputs"]

log = get_logger(__name__)

# gate fields compared on replay: the verdict and the counts it was based on
REPLAY_CHECKED = ("passed", "reliable", "retention_failed", "changed")


@dataclass
class Rebuilt:
    recovered: list[int]  # mistakes moved back from `patching` to `queued`
    replayed: int  # accepted patches re-applied
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # stored vs replayed gate verdicts
    seconds: float = 0.0


class PatchedModel:
    def __init__(
        self, settings: Settings, base: LoadedBase, adapter: TaskAdapter, patcher: Patcher, setup_seconds: float
    ):
        self.settings = settings
        self.base = base
        self.adapter = adapter
        self.patcher = patcher
        self.setup_seconds = setup_seconds

    @property
    def labels(self) -> tuple[str, ...] | None:
        return self.base.labels

    @property
    def layer(self) -> int:
        return int(self.patcher.site.layer_index)

    @classmethod
    def load(cls, settings: Settings) -> PatchedModel:
        """Load the base, attach the patch layer and build M and the held-out cache (the slow part)."""
        t0 = time.perf_counter()
        assert settings.model.base is not None  # load_settings resolves it to model.name
        device = resolve_device(settings.device)
        base = load_base(settings.model.base, dtype=resolve_dtype(settings.model.dtype, device))
        base.model.to(device)
        patcher = Patcher(base.model, train=settings.trainer, gate=settings.gate)
        if settings.model.layer is not None and settings.model.layer != patcher.site.layer_index:
            patcher.detach()
            raise ModelSetupError(
                f"model.layer = {settings.model.layer}: patchd patches the last FFN only "
                f"(layer {patcher.site.layer_index} of this model); leave model.layer unset"
            )
        memory, heldout = memory_inputs(settings, base.name)
        log.info(
            "preparing memory and held-out caches",
            memory_inputs=len(memory),
            heldout_inputs=len(heldout),
            base=base.name,
            device=device,
            dtype=str(base.model.dtype).removeprefix("torch."),
        )
        cached = build_caches(settings, base, patcher, memory, heldout)
        # state the engine derives lazily from M (the fisher init's whitening) must come from the base
        # rows alone, as in an uninterrupted run, not from M after the replay added the edits' rows
        patcher.whitening()
        seconds = time.perf_counter() - t0
        log.info(
            "model ready",
            base=base.name,
            kind=base.kind,
            memory_rows=len(patcher.memory),
            from_cache=cached,
            seconds=round(seconds, 2),
        )
        return cls(settings, base, TaskAdapter(base), patcher, seconds)

    # ------------------------------------------------------------------ editing

    def encode(self, mistake: MistakeRecord, equivalents: Sequence[str] = ()) -> Encoded:
        """The mistake's input (as the producer sent it) and target, with its paraphrases as extra
        training inputs (example 0 is the edit, Patcher.propose); ValueError when it has no target."""
        if mistake.target is None:
            raise ValueError(f"mistake {mistake.id} has no target (the policy sets it when queued)")
        return self.adapter.edit(mistake.input, mistake.target, edit_inputs(mistake.input, equivalents))

    def propose(self, mistake: MistakeRecord, equivalents: Sequence[str] = ()) -> Proposal | None:
        """Train and gate neurons for one mistake (and, as extra training inputs, its paraphrases);
        None when the current model already gives its target."""
        return self.patcher.propose(self.encode(mistake, equivalents), edit_id=str(mistake.id))

    def commit(self, proposal: Proposal) -> None:
        self.patcher.commit(proposal)

    def patch_row(self, proposal: Proposal) -> PatchIn:
        """What the store keeps of a proposal: the neurons as safetensors bytes and the gate's verdict."""
        nr = proposal.neurons
        gate = _json_safe(proposal.gate.to_dict())
        gate["attempts"] = proposal.attempts
        gate["train_success"] = bool(proposal.train.success)
        return PatchIn(
            neurons=patchfile.encode(nr.keys, nr.biases, nr.values, [proposal.edit_id] * nr.n),
            n_neurons=nr.n,
            layer=self.layer,
            activation=self.settings.trainer.activation,
            steps=int(proposal.train.steps),
            seconds=float(proposal.seconds),
            gate=gate,
            accepted=bool(proposal.accepted),
        )

    # ------------------------------------------------------------------ restart

    def rebuild(self, store: Store) -> Rebuilt:
        """Recover interrupted mistakes, then replay every kept patch in acceptance order."""
        t0 = time.perf_counter()
        model = self.settings.model.name
        recovered = store.recover_interrupted(model)
        if recovered:
            log.warning("recovered interrupted mistakes", mistakes=recovered)
        if self.patcher.edit_ids:
            raise ModelSetupError("rebuild needs a fresh model: patches were already applied in this process")
        patches = store.accepted_patches(model)
        result = Rebuilt(recovered=recovered, replayed=0)
        for i, patch in enumerate(patches):
            self._replay(store, patch, result)
            if (i + 1) % 100 == 0:
                log.info("replaying stored patches", done=i + 1, total=len(patches))
        result.seconds = time.perf_counter() - t0
        if result.mismatches:
            log.error(
                "replayed gate verdicts differ from the stored ones",
                count=len(result.mismatches),
                first=result.mismatches[0],
            )
        log.info(
            "model rebuilt from stored patches",
            patches=result.replayed,
            recovered=len(recovered),
            mismatches=len(result.mismatches),
            seconds=round(result.seconds, 2),
        )
        return result

    def _replay(self, store: Store, patch: PatchRecord, result: Rebuilt) -> None:
        mistake = store.get_mistake(patch.mistake_id)
        if mistake is None or mistake.target is None:
            raise ModelSetupError(f"patch {patch.id}: its mistake {patch.mistake_id} is missing or has no target")
        if patch.activation != self.settings.trainer.activation:
            raise ModelSetupError(
                f"patch {patch.id} was trained with activation {patch.activation!r}, this model runs "
                f"{self.settings.trainer.activation!r}: set [trainer] activation = {patch.activation!r} "
                "(patchd's default became 'relu-cap'), or start from an empty database"
            )
        if patch.layer != self.layer:
            raise ModelSetupError(
                f"patch {patch.id} was trained at layer {patch.layer}, this model patches "
                f"layer {self.layer}: it belongs to another base"
            )
        enc = self.encode(mistake)
        try:
            stored = patchfile.decode(patch.neurons, where=f"patch {patch.id}", edit_id=str(mistake.id))
        except patchfile.PatchStateError as exc:
            raise ModelSetupError(str(exc)) from None
        verdict = self.patcher.replay(enc, str(mistake.id), Neurons(stored.keys, stored.biases, stored.values))
        result.replayed += 1
        replayed = verdict.to_dict()
        differs = {k: (patch.gate.get(k), replayed[k]) for k in REPLAY_CHECKED if patch.gate.get(k) != replayed[k]}
        if differs:
            result.mismatches.append({"patch_id": patch.id, "mistake_id": mistake.id, "stored_vs_replayed": differs})


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    """-inf / nan are not JSON (PostgreSQL refuses them): store them as null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return {k: clean(v) for k, v in data.items()}


def edit_inputs(edit: InputValue, equivalents: Sequence[str]) -> list[InputValue]:
    """Paraphrases as model inputs of the edit's form: for a text pair, each paraphrases the first
    text and keeps the edit's second (an NLI claim reworded against the same evidence)."""
    if isinstance(edit, tuple):
        return [(text, edit[1]) for text in equivalents]
    return list(equivalents)
