"""What every editor of `patchd evaluate` is and returns: the Editor protocol and its EditRecord.

Its own module so that editors living in other modules (patching/eval/mend/editor.py) depend on
the contract, and patching/eval/editors.py, which builds them all, depends on them: no cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class EditRecord:
    status: str  # accepted | rejected | already_fixed | applied (baselines: no gate)
    seconds: float
    steps: int = 0
    neurons: int = 0
    attempts: int = 0  # training attempts (tpatcher: gate retries, then the same without equivalents)
    equivalents: int = 0  # train equivalents the last attempt trained on to the end
    saturation: float | None = None  # relu-cap: the cap of the neurons gated last (None: relu/gelu)
    gate: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    # tpatcher: every gated try (equivalents trained, steps, cap, the gate's reasons), engine.Proposal.tries
    tries: list[dict[str, Any]] = field(default_factory=list)
    # tpatcher with trainer.subject_key: whether the edit got a subject detector (None: not that mode)
    subject: bool | None = None


class Editor(Protocol):
    name: str

    def edit(self, inp: str, target: str, edit_id: str, train_equivalents: Sequence[str] = ()) -> EditRecord: ...

    @property
    def neurons(self) -> int: ...
