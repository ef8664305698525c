"""Continuing an interrupted `patchd evaluate` stream exactly where it stopped.

A zsRE stream is ~1,285 edits, hours on a CPU. A run stopped with Ctrl-C (or `kill`) writes its
partial report and, next to it, the neurons of every accepted edit (`<report>.patches.safetensors`,
safetensors only). `--resume REPORT` loads the base again, re-applies those neurons in their
original order through `Patcher.replay` (which rebuilds the memory, held-out and retention caches
exactly as the edits had left them) and goes on with the next mistake of the same stream: the same
model, so one stream, not a restart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patching import patchfile
from patching.engine import Patcher
from patching.eval.compare import CONFIG_DEFAULTS
from patching.eval.editorstate import EditorState, read_state, state_path
from patching.trainer import Neurons

if TYPE_CHECKING:
    import torch


class ResumeError(ValueError):
    """The stopped run cannot be continued by this command line (the message says why)."""


# what must match between the stopped run and the resumed one (else it is another stream); the
# settings named in a report only when set off their default are equal (None) when both are unset
SAME = (
    "editor",
    "base",
    "data",
    "seed",
    "train_equivalents",
    "train_config",
    "gate_config",
    "editor_config",
    "context_augment",
    "augment_source",
    "chat_copies",
    "dtype",
    "site_depth",
)
STATEFUL = ("grace", "wise")  # editors resumed from their state file (editorstate.py), not from neurons


def differences(key: str, there: Any, now: Any) -> list[str]:
    """What differs in setting `key` between the stopped run and this one; [] = the same run.
    Inside train_config and gate_config, a field the stopped run's report lacks counts as the same
    when its value now is the one that run had (compare.CONFIG_DEFAULTS: the field's default, or
    how runs went before it existed where it was turned on later)."""
    if there == now:
        return []
    defaults = CONFIG_DEFAULTS.get(key)
    if defaults is None or not isinstance(there, Mapping) or not isinstance(now, Mapping):
        return [f"{key} differs from the stopped run ({there!r} there, {now!r} now)"]
    out = []
    for field in sorted(set(there) | set(now)):
        if field not in now:
            out.append(f"{key}.{field} is no setting now ({there[field]!r} there)")
        elif field not in there:
            if field not in defaults or now[field] != defaults[field]:
                out.append(f"{key}.{field} is {now[field]!r} now; the stopped run had no such setting")
        elif there[field] != now[field]:
            out.append(f"{key}.{field} differs from the stopped run ({there[field]!r} there, {now[field]!r} now)")
    return out


def patches_path(report: Path) -> Path:
    """report.json -> report.patches.safetensors"""
    return report.with_name(report.stem + ".patches.safetensors")


def save_patches(path: Path, patcher: Patcher) -> None:
    """Every neuron of the patched layer with the edit id it belongs to, and with trainer.subject_key
    the detectors and the column scale they were trained with (patching/patchfile.py)."""
    scale = patcher.subject_scale() if patcher.subject is not None else None
    patchfile.write_file(path, patchfile.of_layer(patcher.wrapper, scale))


@dataclass
class Saved:
    """A stopped run's neurons: edit id -> (keys [m, d], biases [m], values [m, d]), and for subject
    neurons edit id -> their detectors (w [m, d_s], a [m], c [m]) with the column scale."""

    neurons: dict[str, Neurons]
    detectors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    scale: float | None = None


def load_patches(path: Path) -> Saved:
    try:
        saved = patchfile.read_file(path)
    except patchfile.PatchStateError as exc:
        raise ResumeError(f"{path}: not a patchd evaluate patches file ({exc})") from exc
    edits = list(dict.fromkeys(saved.edit_ids))
    detectors = {e: d for e in edits if (d := saved.subject_of_edit(e)) is not None}
    scale = saved.subject.scale if saved.subject is not None else None
    if detectors and scale is None:
        raise ResumeError(f"{path}: subject neurons without the column scale they were trained with")
    return Saved({e: Neurons(*saved.of_edit(e)) for e in edits}, detectors, scale)


@dataclass
class Resume:
    """A stopped run: its report and the neurons of its accepted edits (tpatcher) or its editor's
    state (grace, wise)."""

    report: dict[str, Any]
    saved: Saved
    state: EditorState | None = None

    @classmethod
    def read(cls, report_path: Path) -> Resume:
        try:
            report = json.loads(report_path.read_text())
        except json.JSONDecodeError as exc:
            raise ResumeError(f"cannot resume {report_path}: not a JSON report ({exc})") from exc
        if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
            raise ResumeError(f"cannot resume {report_path}: not a patchd evaluate report (no rows)")
        editor = report.get("editor", "tpatcher")
        if editor in STATEFUL:
            path = state_path(report_path)
            if not path.is_file():
                raise ResumeError(f"cannot resume {report_path}: {path.name} is missing (written since 2026-12-06)")
            try:
                state = read_state(path)
            except ValueError as exc:
                raise ResumeError(f"cannot resume: {exc}") from exc
            if state.editor != editor or state.rows != len(report["rows"]):
                raise ResumeError(
                    f"cannot resume: {path.name} holds {state.editor} after {state.rows} mistakes, the report "
                    f"{editor} after {len(report['rows'])} (was the report written by another run?)"
                )
            return cls(report, Saved({}, {}), state)
        if editor != "tpatcher":
            raise ResumeError(f"cannot resume {report_path}: --editor {editor} runs cannot be resumed (tpatcher, "
                              f"{', '.join(STATEFUL)} can)")  # fmt: skip
        path = patches_path(report_path)
        if not path.is_file():
            raise ResumeError(
                f"cannot resume {report_path}: {path.name} is missing (reports written before "
                "resuming existed have none)"
            )
        return cls(report, load_patches(path))

    def check(self, now: dict[str, Any]) -> None:
        """Refuse a resume whose settings differ from the stopped run's (`now`: the same keys)."""
        for key in SAME:
            found = differences(key, self.report.get(key), now.get(key))
            if found:
                raise ResumeError("cannot resume: " + "; ".join(found))
        if not self.report.get("sequential", True):
            raise ResumeError("cannot resume a single-edit (--single) run")

    def rows(self, stream_inputs: Sequence[str]) -> list[dict[str, Any]]:
        """The stopped run's rows, checked to be the start of this stream."""
        rows: list[dict[str, Any]] = self.report.get("rows", [])
        if len(rows) > len(stream_inputs):
            raise ResumeError(
                f"cannot resume: the stopped run went through {len(rows)} mistakes, this stream "
                f"has {len(stream_inputs)} (raise --edits)"
            )
        for j, r in enumerate(rows):
            if r["i"] != j or r["input"] != stream_inputs[j]:
                raise ResumeError(f"cannot resume: mistake {j} of the stopped run is not mistake {j} of this stream")
        return rows
