"""The patched model the daemon edits: base + memory M + held-out cache + the stored patches.

    model = PatchedModel.load(settings)              # base, M and held-out built once
    rebuilt = model.rebuild(store)                   # restart: recover, then replay every kept patch
    proposal = model.propose(mistake, equivalents)   # None = already right; nothing changes
    model.commit(proposal, patch_id, row)            # only AFTER the patch row is stored

The worker's one door to the engine: it hands over a stored mistake (its input as the producer
sent it: a text or a text pair, memory.records.InputValue) and gets the engine's typed Proposal
back; the encoding, the neurons and the caches stay behind this class.

Restart contract (memory/store.py): a mistake left in `patching` was never kept, so it goes back
to `queued`; the accepted patches are replayed in acceptance order, which recomputes exactly the
caches (retention rows, memory rows, held-out predictions) the original run had, and the gate is
run again on each so that a stored verdict that no longer holds is reported, not hidden.

Replaying 10,000 patches takes minutes, so the engine's state is also kept as a snapshot
(patching/snapshot.py) in <state.dir>/engine/, written every `state.snapshot_every` accepted
patches and at every stop. A restart restores the newest snapshot when it was made from this base,
layer, activation and inputs AND the stored patches it covers are still the first ones in the
store, unchanged (a chained sha256 over patch id, mistake id and neuron bytes says so); only the
patches after it are replayed. Restoring gives the uninterrupted run's state bit for bit
(tests/test_engine_snapshot.py). Anything else (revoked patches, another database) replays all.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.caches import ModelSetupError, build_caches, cache_key, memory_inputs
from daemon.logs import get_logger
from daemon.settings import Settings, SettingsError, resolve_device
from memory.records import InputValue, MistakeRecord, PatchIn, PatchRecord
from memory.store import Store
from patching import patchfile, snapshot
from patching.augment import augment_prefixes, chat_copies, chat_trainable, with_context
from patching.bases.load import LoadedBase, load_base, resolve_dtype
from patching.bases.tasks import TaskAdapter
from patching.encode import Encoded
from patching.engine import Patcher, Proposal
from patching.trainer import Neurons

__all__ = ["ModelSetupError", "PatchedModel", "Rebuilt", "edit_inputs"]

log = get_logger(__name__)

# gate fields compared on replay: the verdict and the counts it was based on
REPLAY_CHECKED = ("passed", "reliable", "retention_failed", "changed")


# context prefixes a generator's patches train behind when [policy] context_prefixes is unset
GENERATOR_PREFIXES = 10

# chat forms a patch also trains as when [policy] context_chat_copies is unset (a generator with a chat
# template and context prefixes). On zsre-smollm2's first 99 zsRE fixes, 3 took GR 0.69 -> 0.75, the
# in-context hit rate 0.71 -> 0.78 and paraphrases behind context 0.40 -> 0.55 at equal SR, ER and
# locality, for 1.9x the training steps (docs/results/levers-21.md)
CHAT_COPIES = 3

# the chain over no patch at all; each accepted patch extends it (PatchedModel._link)
GENESIS = hashlib.sha256(b"patchd engine snapshot").hexdigest()


@dataclass
class Rebuilt:
    recovered: list[int]  # mistakes moved back from `patching` to `queued`
    replayed: int  # accepted patches re-applied
    restored: int = 0  # accepted patches restored at once from the engine snapshot
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # stored vs replayed gate verdicts
    seconds: float = 0.0


class PatchedModel:
    def __init__(
        self,
        settings: Settings,
        base: LoadedBase,
        adapter: TaskAdapter,
        patcher: Patcher,
        setup_seconds: float,
        snapshot_path: Path | None = None,
        snapshot_meta: dict[str, str] | None = None,
        prefixes: Sequence[str] = (),
        chat_copies: int = 0,
    ):
        self.settings = settings
        self.base = base
        self.adapter = adapter
        self.patcher = patcher
        self.setup_seconds = setup_seconds
        self.snapshot_path = snapshot_path  # None: no snapshot (a model built outside the daemon)
        self.snapshot_meta = snapshot_meta or {}  # what a usable snapshot must have been written for
        self.prefixes = list(prefixes)  # context augmentation: each patch also trained behind these
        self.chat_copies = chat_copies  # and as this many chat forms (earlier questions: the prefixes)
        self._chain = GENESIS  # over the accepted patches in the model, in order
        self._patches = 0  # accepted patches in the model
        self._snapshot_at = 0  # patches the newest snapshot on disk covers

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
        key = cache_key(base, patcher, memory, heldout)
        assert settings.state.dir is not None  # resolved by load_settings
        snapshot_path = Path(settings.state.dir) / "engine" / key.relative_dir() / f"{settings.model.name}.safetensors"
        snapshot_meta = {
            "model": settings.model.name,
            "inputs": key.base_name,  # the base's name, a digest of the inputs and the dtype
            "base_sha256": key.base_sha256,
            "layer": str(key.layer),
            "activation": settings.trainer.activation,
        }
        # state the engine derives lazily from M (the fisher init's whitening) must come from the base
        # rows alone, as in an uninterrupted run, not from M after the replay added the edits' rows
        patcher.whitening()
        adapter = TaskAdapter(base)
        policy = settings.policy
        count = policy.context_prefixes
        if count is None:  # the measured default (daemon/settings.py): a classifier loses TrainR with them
            count = GENERATOR_PREFIXES if adapter.generation else 0
        prefixes = augment_prefixes(adapter, memory, count, policy.context_prefix_source)
        if prefixes:
            log.info("context augmentation: each patch also trained behind these", prefixes=prefixes)
        chat_copies = _chat_copies(policy.context_chat_copies, adapter, prefixes)
        if chat_copies:
            log.info("context augmentation: each patch also trained in chat form", copies=chat_copies)
        seconds = time.perf_counter() - t0
        log.info(
            "model ready",
            base=base.name,
            kind=base.kind,
            memory_rows=len(patcher.memory),
            from_cache=cached,
            seconds=round(seconds, 2),
        )
        return cls(settings, base, adapter, patcher, seconds, snapshot_path, snapshot_meta, prefixes, chat_copies)

    # ------------------------------------------------------------------ editing

    def encode(self, mistake: MistakeRecord, equivalents: Sequence[str] = ()) -> Encoded:
        """The mistake's input (as the producer sent it) and target, with its paraphrases as extra
        training inputs (example 0 is the edit, Patcher.propose); ValueError when it has no target."""
        if mistake.target is None:
            raise ValueError(f"mistake {mistake.id} has no target (the policy sets it when queued)")
        return self.adapter.edit(mistake.input, mistake.target, edit_inputs(mistake.input, equivalents))

    def propose(self, mistake: MistakeRecord, equivalents: Sequence[str] = ()) -> Proposal | None:
        """Train and gate neurons for one mistake (and, as extra training inputs, its paraphrases
        and its input behind each context prefix); None when the current model already gives its target."""
        return self.patcher.propose(
            self.encode(mistake, self.training_texts(mistake, equivalents)), edit_id=str(mistake.id)
        )

    def training_texts(self, mistake: MistakeRecord, equivalents: Sequence[str] = ()) -> list[str]:
        """The extra training texts of a mistake: its paraphrases, then its input (a pair's first
        text) behind each context prefix, then its chat forms (patching/augment.py; their turns
        rotate with the mistake's id)."""
        first = mistake.input[0] if isinstance(mistake.input, tuple) else mistake.input
        chats = chat_copies(self.base.tokenizer, self.adapter.text(first), self.prefixes, self.chat_copies, mistake.id)
        return [*equivalents, *(with_context(p, first) for p in self.prefixes), *chats]

    def commit(self, proposal: Proposal, patch_id: int, row: PatchIn) -> None:
        """Apply an accepted proposal whose row the store already holds as `patch_id`; every
        `state.snapshot_every` patches the engine snapshot is written (synchronously: a few
        tens of MB at 10,000 patches, well under a second)."""
        self.patcher.commit(proposal)
        self._link(patch_id, int(proposal.edit_id), row.neurons)
        every = self.settings.state.snapshot_every
        if every and self._patches - self._snapshot_at >= every:
            self.save_snapshot()

    def _link(self, patch_id: int, mistake_id: int, neurons: bytes) -> None:
        """Extend the chain with one accepted patch: sha256(previous, id, mistake, sha256(neurons))."""
        digest = hashlib.sha256(neurons).hexdigest()
        self._chain = hashlib.sha256(f"{self._chain}:{patch_id}:{mistake_id}:{digest}".encode()).hexdigest()
        self._patches += 1

    def save_snapshot(self) -> bool:
        """Write the engine snapshot when the model changed since the last one; True when written.
        A snapshot is a cache: a failure to write it is logged, never fatal."""
        if self.snapshot_path is None or self._patches == self._snapshot_at:
            return False
        t0 = time.perf_counter()
        meta = {**self.snapshot_meta, "patches": str(self._patches), "chain": self._chain}
        try:
            size = snapshot.save(self.snapshot_path, self.patcher.export_state(), meta)
        except OSError as exc:
            log.warning("engine snapshot not written; a restart replays more patches", error=repr(exc))
            return False
        self._snapshot_at = self._patches
        log.info(
            "engine snapshot written",
            patches=self._patches,
            mb=round(size / 1e6, 1),
            seconds=round(time.perf_counter() - t0, 2),
        )
        return True

    def patch_row(self, proposal: Proposal) -> PatchIn:
        """What the store keeps of a proposal: the neurons as safetensors bytes and the gate's verdict."""
        nr = self.patcher.stored(proposal)  # trainer.subject_key: with its detectors
        gate = _json_safe(proposal.gate.to_dict())
        gate["attempts"] = proposal.attempts
        gate["train_success"] = bool(proposal.train.success)
        gate["banded"] = proposal.banded
        return PatchIn(
            neurons=patchfile.encode(nr.keys, nr.biases, nr.values, nr.edit_ids, subject=nr.subject),
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
        result.restored = self._restore(patches)
        for i, patch in enumerate(patches[result.restored :]):
            self._replay(store, patch, result)
            self._link(patch.id, patch.mistake_id, patch.neurons)
            if (i + 1) % 100 == 0:
                log.info("replaying stored patches", done=i + 1, total=len(patches) - result.restored)
        if result.replayed:
            self.save_snapshot()  # the next start restores what this one had to replay
        result.seconds = time.perf_counter() - t0
        if result.mismatches:
            log.error(
                "replayed gate verdicts differ from the stored ones",
                count=len(result.mismatches),
                first=result.mismatches[0],
            )
        log.info(
            "model rebuilt from stored patches",
            restored=result.restored,
            patches=result.replayed,
            recovered=len(recovered),
            mismatches=len(result.mismatches),
            seconds=round(result.seconds, 2),
        )
        return result

    def _restore(self, patches: Sequence[PatchRecord]) -> int:
        """Restore the engine snapshot when it fits this model and a prefix of `patches`; the
        number of patches it covers (0: not used, and why is logged)."""
        if self.snapshot_path is None:
            return 0
        try:
            state, meta = snapshot.load(self.snapshot_path, self.snapshot_meta)
            covered = int(meta.get("patches", "-1"))
            if not 0 < covered <= len(patches):
                raise snapshot.SnapshotUnusable(f"it covers {covered} patches, the store holds {len(patches)}")
            for patch in patches[:covered]:
                self._link(patch.id, patch.mistake_id, patch.neurons)
            if self._chain != meta.get("chain") or state.edits != [str(p.mistake_id) for p in patches[:covered]]:
                raise snapshot.SnapshotUnusable(
                    "the store's first patches are not those it was written from (revoked or another database)"
                )
            self.patcher.restore_state(state)
        except (snapshot.SnapshotUnusable, ValueError) as exc:
            self._chain, self._patches = GENESIS, 0
            if self.snapshot_path.exists() or patches:
                log.info("engine snapshot not used; replaying every stored patch", reason=str(exc))
            return 0
        self._snapshot_at = covered
        log.info("engine snapshot restored", patches=covered, path=str(self.snapshot_path))
        return covered

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
        edit_id = str(mistake.id)
        if stored.subject is not None and self.patcher.subject is None:
            raise ModelSetupError(f"patch {patch.id} holds subject neurons: set [trainer] subject_key = true")
        scale = stored.subject.scale if stored.subject is not None else None
        neurons = Neurons(stored.keys, stored.biases, stored.values)
        try:
            verdict = self.patcher.replay(enc, edit_id, neurons, stored.subject_of_edit(edit_id), scale)
        except ValueError as exc:  # subject neurons for another memory (their column scale differs)
            raise ModelSetupError(f"patch {patch.id}: {exc}") from None
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


def _chat_copies(setting: int | None, adapter: TaskAdapter, prefixes: Sequence[str]) -> int:
    """Chat forms per patch: the setting, or unset the measured default where it applies; a count
    the base cannot train (no chat template, or no prefixes for the earlier questions) is refused."""
    usable = chat_trainable(adapter, prefixes)
    if setting is None:
        return CHAT_COPIES if usable else 0
    if setting and not usable:
        raise SettingsError(
            f"policy.context_chat_copies = {setting}: needs a generator whose tokenizer has a chat template, "
            "and context prefixes (policy.context_prefixes > 0)"
        )
    return setting
