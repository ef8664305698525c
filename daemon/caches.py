"""The memory M and the held-out set of the daemon's model: which inputs, and their cached rows.

    memory, heldout = memory_inputs(settings, base.name)   # the settings' JSONL files, else the task's
    build_caches(settings, base, patcher, memory, heldout)  # from <state.dir>/activations, or computed

An input is a text or, for a text-pair model, {"text": ..., "text_pair": ...} (a JSONL line's
`input`), the same forms a correction event's `input` takes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.settings import Settings
from memory.activations import SUBJECT_SPLITS, ActivationKey, ActivationStore
from patching.bases.datasets import load_task
from patching.bases.load import TASK_OF_BASE, LoadedBase
from patching.bases.tasks import TaskAdapter
from patching.encode import ModelInput
from patching.engine import Patcher
from patching.gate import HeldoutTensors
from patching.loading import base_identity


class ModelSetupError(RuntimeError):
    """The base, its memory/held-out inputs or the stored patches cannot be used."""


def build_caches(
    settings: Settings, base: LoadedBase, patcher: Patcher, memory: Sequence[ModelInput], heldout: Sequence[ModelInput]
) -> bool:
    """Fill M and the held-out cache of a fresh Patcher; True when they came from disk.

    Computing them is the slow part of a start (minutes for fever on a CPU), so the base model's
    rows are kept in <state.dir>/activations (memory/activations.py), keyed by the base's weights,
    its layer and a digest of the inputs: a restart loads them instead of recomputing. Rows that
    accepted edits add to M are not stored: the replay of the stored patches adds them again.
    """
    assert settings.state.dir is not None  # resolved by load_settings
    stored = ActivationStore.open(Path(settings.state.dir) / "activations", cache_key(base, patcher, memory, heldout))
    device = patcher.memory.device
    subject = patcher.subject is not None  # trainer.subject_key: the rows' layer-L_s sequences too
    if stored.rows("memory") and stored.rows("heldout") and (not subject or stored.rows(SUBJECT_SPLITS[-1])):
        if subject:
            patcher.load_subject_base({split: stored.load(split, device) for split in SUBJECT_SPLITS})
        patcher.add_memory(stored.load("memory", device)["q"])
        rows = stored.load("heldout", device)
        patcher.heldout = HeldoutTensors(rows["q"], rows["ffn"], rows["residual"], rows["pred"], rows["group"])
        return True
    TaskAdapter(base).patcher(patcher, memory, heldout, progress=False)
    h = patcher.heldout
    assert h is not None
    # each split only when absent: a crash between the two writes must not duplicate M's rows
    if not stored.rows("heldout"):
        stored.append("heldout", {"q": h.q, "ffn": h.ffn, "residual": h.residual, "pred": h.pred, "group": h.group})
    if not stored.rows("memory"):
        stored.append("memory", {"q": patcher.memory.view()})
    if subject:  # last, each only when absent: the final split's rows say all of them are there
        for split, tensors in patcher.subject_base().items():
            if not stored.rows(split):
                stored.append(split, tensors)
    return False


def cache_key(
    base: LoadedBase, patcher: Patcher, memory: Sequence[ModelInput], heldout: Sequence[ModelInput]
) -> ActivationKey:
    """What the cached rows depend on: the base's weights, its layer, the inputs and the dtype."""
    digest = hashlib.sha256(json.dumps([memory, heldout]).encode()).hexdigest()[:12]
    # a bfloat16 model's activations are other numbers: their own key (float32 keeps the old name)
    dtype = str(base.model.dtype).removeprefix("torch.")
    # trainer.subject_key also keeps layer L_s's rows: their own key per L_s (M is computed again once)
    sub = patcher.subject
    subject = "" if sub is None else f"-subject{sub.site.layer_index}"
    return ActivationKey(
        f"{base.name}-inputs-{digest}" + ("" if dtype == "float32" else f"-{dtype}") + subject,
        base_identity(base.directory),
        str(base.model.config.model_type),
        int(patcher.site.layer_index),
    )


# ---------------------------------------------------------------------------- inputs


def memory_inputs(settings: Settings, base_name: str) -> tuple[list[ModelInput], list[ModelInput]]:
    """The inputs of M and of the held-out set: the settings' JSONL files, else the base's task."""
    memory_file, heldout_file = settings.model.memory_file, settings.model.heldout_file
    if memory_file is not None and heldout_file is not None:
        return read_inputs(memory_file), read_inputs(heldout_file)
    if memory_file is not None or heldout_file is not None:
        raise ModelSetupError("set both model.memory_file and model.heldout_file, or neither")
    task = TASK_OF_BASE.get(base_name)
    if task is None:
        raise ModelSetupError(
            f"base {base_name!r} has no built-in task: set model.memory_file and model.heldout_file "
            '(JSONL, one {"input": ...} per line) to the inputs the gate must keep unchanged'
        )
    splits = load_task(task)
    return [e.input for e in splits.memory], [e.input for e in splits.heldout]


def read_inputs(path: Path) -> list[ModelInput]:
    """`input` of every line of a JSONL file; a bad line stops start-up with its line number."""
    inputs: list[ModelInput] = []
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
            raise ModelSetupError(f"{path}:{number}: expected a JSON object with an 'input'") from None
        item = _input(value)
        if item is None:
            raise ModelSetupError(
                f"{path}:{number}: 'input' must be a non-empty string or "
                '{"text": ..., "text_pair": ...} with non-empty strings'
            )
        inputs.append(item)
    if not inputs:
        raise ModelSetupError(f"{path} holds no inputs")
    return inputs


def _input(value: Any) -> ModelInput | None:
    """A text, or a text pair from {"text", "text_pair"}; None when it is neither."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, dict) and set(value) == {"text", "text_pair"}:
        text, pair = value["text"], value["text_pair"]
        if isinstance(text, str) and isinstance(pair, str) and text.strip() and pair.strip():
            return text, pair
    return None
