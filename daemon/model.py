"""The patched model the daemon edits: base + memory M + held-out cache + the stored patches.

    model = PatchedModel.load(settings)              # base, M and held-out built once
    rebuilt = model.rebuild(store)                   # restart: recover, then replay every kept patch
    proposal = model.propose(mistake, text)          # None = already right; nothing changes
    model.commit(proposal)                           # only AFTER the patch row is stored

Restart contract (memory/store.py): a mistake left in `patching` was never kept, so it goes back
to `queued`; the accepted patches are replayed in acceptance order, which recomputes exactly the
caches (retention rows, memory rows, held-out predictions) the original run had, and the gate is
run again on each so that a stored verdict that no longer holds is reported, not hidden.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.logs import get_logger
from daemon.settings import Settings, resolve_device
from memory.records import MistakeRecord, PatchIn, PatchRecord
from memory.store import Store

log = get_logger(__name__)

# gate fields compared on replay: the verdict and the counts it was based on
REPLAY_CHECKED = ("passed", "reliable", "retention_failed", "changed")


class ModelSetupError(RuntimeError):
    """The base, its memory/held-out inputs or the stored patches cannot be used."""


class UnsupportedInput(ValueError):
    """An input the patching engine cannot encode (text pairs, for now)."""


@dataclass
class Rebuilt:
    recovered: list[int]  # mistakes moved back from `patching` to `queued`
    replayed: int  # accepted patches re-applied
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # stored vs replayed gate verdicts
    seconds: float = 0.0


class PatchedModel:
    def __init__(self, settings: Settings, base: Any, adapter: Any, patcher: Any, setup_seconds: float):
        self.settings = settings
        self.base = base  # patching.bases.LoadedBase
        self.adapter = adapter  # patching.tasks.TaskAdapter
        self.patcher = patcher  # patching.engine.Patcher
        self.setup_seconds = setup_seconds

    @property
    def labels(self) -> tuple[str, ...] | None:
        return self.base.labels  # type: ignore[no-any-return]

    @property
    def layer(self) -> int:
        return int(self.patcher.site.layer_index)

    @classmethod
    def load(cls, settings: Settings) -> PatchedModel:
        """Load the base, attach the patch layer and build M and the held-out cache (the slow part)."""
        from patching.bases import load_base
        from patching.engine import Patcher
        from patching.tasks import TaskAdapter

        t0 = time.perf_counter()
        assert settings.model.base is not None  # load_settings resolves it to model.name
        base = load_base(settings.model.base)
        device = resolve_device(settings.device)
        base.model.to(device)
        patcher = Patcher(base.model, train=settings.trainer, gate=settings.gate)
        if settings.model.layer is not None and settings.model.layer != patcher.site.layer_index:
            patcher.detach()
            raise ModelSetupError(
                f"model.layer = {settings.model.layer}: patchd patches the last FFN only "
                f"(layer {patcher.site.layer_index} of this model); leave model.layer unset"
            )
        memory, heldout = memory_inputs(settings, base.name, base.kind)
        log.info(
            "preparing memory and held-out caches",
            memory_inputs=len(memory),
            heldout_inputs=len(heldout),
            base=base.name,
            device=device,
        )
        cached = build_caches(settings, base, patcher, memory, heldout)
        # state the engine derives lazily from M (the fisher init's whitening) must come from the base
        # rows alone, as in an uninterrupted run, not from M after the replay added the edits' rows
        derive = getattr(patcher, "whitening", None)
        if callable(derive):
            derive()
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

    def propose(self, mistake: MistakeRecord, text: str, equivalents: Sequence[str] = ()) -> Any:
        """Train and gate neurons for one mistake (and, as extra training inputs, its paraphrases);
        None when the current model already gives its target."""
        if mistake.target is None:
            raise ValueError(f"mistake {mistake.id} has no target (the policy sets it when queued)")
        return self.patcher.propose(self.adapter.edit(text, mistake.target, equivalents), edit_id=str(mistake.id))

    def commit(self, proposal: Any) -> None:
        self.patcher.commit(proposal)

    def patch_row(self, proposal: Any) -> PatchIn:
        """What the store keeps of a proposal: the neurons as safetensors bytes and the gate's verdict."""
        gate = _json_safe(proposal.gate.to_dict())
        gate["attempts"] = proposal.attempts
        gate["train_success"] = bool(proposal.train.success)
        return PatchIn(
            neurons=neurons_to_bytes(proposal.neurons),
            n_neurons=int(proposal.neurons.n),
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
        enc = self.adapter.edit(training_text(store, mistake), mistake.target)
        neurons = neurons_from_bytes(patch.neurons)
        verdict = self.patcher.replay(enc, str(mistake.id), neurons)
        result.replayed += 1
        stored = patch.gate
        differs = {
            k: (stored.get(k), getattr(verdict, k)) for k in REPLAY_CHECKED if stored.get(k) != getattr(verdict, k)
        }
        if differs:
            result.mismatches.append({"patch_id": patch.id, "mistake_id": mistake.id, "stored_vs_replayed": differs})


# ---------------------------------------------------------------------------- caches


def build_caches(settings: Settings, base: Any, patcher: Any, memory: list[str], heldout: list[str]) -> bool:
    """Fill M and the held-out cache of a fresh Patcher; True when they came from disk.

    Computing them is the slow part of a start (minutes for fever on a CPU), so the base model's
    rows are kept in <state.dir>/activations (memory/activations.py), keyed by the base's weights,
    its layer and a digest of the inputs: a restart loads them instead of recomputing. Rows that
    accepted edits add to M are not stored: the replay of the stored patches adds them again.
    """
    from memory.activations import ActivationKey, ActivationStore
    from patching.gate import HeldoutTensors
    from patching.state import base_identity
    from patching.tasks import TaskAdapter

    assert settings.state.dir is not None  # resolved by load_settings
    digest = hashlib.sha256(json.dumps([memory, heldout]).encode()).hexdigest()[:12]
    key = ActivationKey(
        f"{base.name}-inputs-{digest}",
        base_identity(base.directory),
        str(base.model.config.model_type),
        int(patcher.site.layer_index),
    )
    stored = ActivationStore.open(Path(settings.state.dir) / "activations", key)
    device = patcher.memory.device
    if stored.rows("memory") and stored.rows("heldout"):
        patcher.add_memory(stored.load("memory", device)["q"])
        h = stored.load("heldout", device)
        patcher.heldout = HeldoutTensors(h["q"], h["ffn"], h["residual"], h["pred"], h["group"])
        return True
    TaskAdapter(base).patcher(patcher, memory, heldout, progress=False)
    h = patcher.heldout
    assert h is not None
    # each split only when absent: a crash between the two writes must not duplicate M's rows
    if not stored.rows("heldout"):
        stored.append("heldout", {"q": h.q, "ffn": h.ffn, "residual": h.residual, "pred": h.pred, "group": h.group})
    if not stored.rows("memory"):
        stored.append("memory", {"q": patcher.memory.view()})
    return False


# ---------------------------------------------------------------------------- inputs


def memory_inputs(settings: Settings, base_name: str, kind: str) -> tuple[list[str], list[str]]:
    """The inputs of M and of the held-out set: the settings' JSONL files, else the base's task."""
    files = (settings.model.memory_file, settings.model.heldout_file)
    if all(f is not None for f in files):
        return read_inputs(files[0]), read_inputs(files[1])  # type: ignore[arg-type]
    if any(f is not None for f in files):
        raise ModelSetupError("set both model.memory_file and model.heldout_file, or neither")
    from patching.bases import TASK_OF_BASE  # torch comes with it; the model needs it next anyway

    task = TASK_OF_BASE.get(base_name)
    if task is None:
        raise ModelSetupError(
            f"base {base_name!r} has no built-in task: set model.memory_file and model.heldout_file "
            '(JSONL, one {"input": ...} per line) to the inputs the gate must keep unchanged'
        )
    from patching.datasets import load_task

    splits = load_task(task)
    return [e.input for e in splits.memory], [e.input for e in splits.heldout]


def read_inputs(path: Path) -> list[str]:
    """`input` of every line of a JSONL file; a bad line stops start-up with its line number."""
    inputs: list[str] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelSetupError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)["input"]
        except (ValueError, KeyError, TypeError):
            raise ModelSetupError(f"{path}:{number}: expected a JSON object with a string 'input'") from None
        if not isinstance(value, str) or not value.strip():
            raise ModelSetupError(f"{path}:{number}: 'input' must be a non-empty string")
        inputs.append(value)
    if not inputs:
        raise ModelSetupError(f"{path} holds no inputs")
    return inputs


def training_text(store: Store, mistake: MistakeRecord) -> str:
    """The input to train on: the first report's original input (the stored key may be casefolded)."""
    from sqlalchemy import select

    from memory.schema import Report

    with store.reading() as session:
        raw = session.scalars(
            select(Report.raw)
            .where(Report.mistake_id == mistake.id, Report.target == mistake.target)
            .order_by(Report.id)
            .limit(1)
        ).first()
    value: Any = None
    if raw is not None:
        try:
            value = json.loads(bytes(raw).decode("utf-8-sig"))["input"]
        except (ValueError, KeyError, TypeError):
            value = None  # validated when it arrived; fall back to the stored key
    if isinstance(value, dict):
        if value.get("text_pair") is not None:
            raise UnsupportedInput("text-pair inputs cannot be patched yet (patching.tasks encodes one text)")
        value = value.get("text")
    if isinstance(value, str) and value.strip():
        return value
    if mistake.input_text.startswith("{"):
        raise UnsupportedInput("text-pair inputs cannot be patched yet (patching.tasks encodes one text)")
    return mistake.input_text


# ---------------------------------------------------------------------------- tensors


def neurons_to_bytes(neurons: Any) -> bytes:
    """keys [n,d], biases [n], values [n,d] as one safetensors blob (never pickle)."""
    from safetensors.torch import save

    tensors = {"keys": neurons.keys, "biases": neurons.biases, "values": neurons.values}
    return bytes(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def neurons_from_bytes(blob: bytes) -> Any:
    """Stored neurons, on the CPU (Patcher.replay moves them to its device)."""
    from safetensors.torch import load

    from patching.trainer import Neurons

    tensors = load(bytes(blob))
    missing = {"keys", "biases", "values"} - set(tensors)
    if missing:
        raise ModelSetupError(f"stored neurons lack {sorted(missing)}")
    return Neurons(*(tensors[k] for k in ("keys", "biases", "values")))


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    """-inf / nan are not JSON (PostgreSQL refuses them): store them as null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return {k: clean(v) for k, v in data.items()}
