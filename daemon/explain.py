"""`patchd why`: which published corrections shape the model's answer to an input.

Reads what a downstream service reads: a published version (LATEST's, or the one asked for),
verified (and its signature checked against `[publish] signing_key`'s public half when versions
are signed), attached to the base; then patching/provenance.py names the edits that fire where
the model reads its answer, with what the version carries about each (mistake, target, reports
and reporters, when accepted, first version). The database is not read: the answer is the same
one `Loaded.why` gives a service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon.history import HistoryError, version_and_base
from daemon.settings import Settings
from patching.provenance import Firing


@dataclass(frozen=True)
class Explanation:
    version: int
    answer: str  # the patched model's answer (a label, or the greedy completion)
    firings: list[Firing]


def explain(settings: Settings, text: str, pair: str | None = None, number: int | None = None) -> Explanation:
    """Why version `number` (None: LATEST's) answers `text` (with `pair`, a classifier's text pair) as it does."""
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter
    from patching.client import patch_set
    from patching.loading import attach_patches, base_identity
    from patching.patchfile import PatchStateError
    from patching.provenance import why

    number, v, directory = version_and_base(settings, number)
    lb = load_base(str(directory))
    try:
        config, patches = patch_set(v)
        attach_patches(lb.model, config, patches, base_identity(directory))
    except PatchStateError as exc:  # made for another base, or its segments disagree with it
        raise HistoryError(f"version {number}: {exc}") from None
    adapter = TaskAdapter(lb)
    if adapter.generation:
        if pair is not None:
            raise HistoryError("a text pair cannot be asked of a generator: give the question as one text")
        inputs: Any = lb.tokenizer([adapter.text(text)], return_tensors="pt")
    else:
        inputs = lb.tokenizer([text], [pair] if pair is not None else None, return_tensors="pt", truncation=True)
    firings = why(lb.model, inputs, v.provenance)[0]
    answer = adapter.predict([text if pair is None else (text, pair)])[0]
    return Explanation(number, str(answer), firings)
