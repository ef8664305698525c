"""Plain records that cross the boundary between the daemon and the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from memory.lifecycle import Status


@dataclass(frozen=True)
class ReportIn:
    """One validated correction event, ready for `Store.record_batch`.

    `input_text` is the normalised input (memory.fingerprint.input_key form) and
    `fingerprint` is memory.fingerprint.fingerprint(model, input).
    """

    event_id: str
    model: str
    fingerprint: str
    input_text: str
    target: str
    raw: bytes
    topic: str
    partition: int
    offset: int
    reporter: str | None = None
    reported_at: datetime | None = None
    observed: str | None = None
    equivalents: tuple[str, ...] = field(default_factory=tuple)
    model_version: int | None = None


@dataclass(frozen=True)
class RejectedIn:
    """An event that failed validation; it goes to the DLQ and to the rejected table."""

    raw: bytes
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class BatchResult:
    """What `Store.record_batch` did: new vs duplicate reports, new vs updated mistakes."""

    new_reports: int
    duplicates: int  # event ids already stored (or repeated inside the batch): redelivery
    mistakes_created: int
    mistakes_updated: int  # existing mistakes that got at least one new report


@dataclass(frozen=True)
class MistakeRecord:
    """A mistake as the worker sees it; a plain value, safe to hand to another thread."""

    id: int  # the edit id of its patch neurons
    model: str
    fingerprint: str
    input_text: str
    target: str | None  # the winning target once queued
    targets: dict[str, int]  # every reported target with its count
    report_count: int
    reporter_count: int
    first_seen: datetime
    last_seen: datetime
    status: Status
    priority: int
    equivalents: tuple[str, ...] = ()  # paraphrases reported with the winning target, first seen first


@dataclass(frozen=True)
class PatchIn:
    """One trained neuron group and the gate's verdict, as the worker hands it to `Store.add_patch`."""

    neurons: bytes  # safetensors blob: keys [n,d], biases [n], values [n,d] (patching.state's layout)
    n_neurons: int
    layer: int
    activation: str
    steps: int
    seconds: float
    gate: dict[str, Any]  # the gate's metrics and verdict, JSON-serialisable
    accepted: bool


@dataclass(frozen=True)
class PatchRecord:
    """One stored neuron group (one patch); `neurons` is the safetensors blob as given."""

    id: int
    mistake_id: int
    model: str
    neurons: bytes
    n_neurons: int
    layer: int
    activation: str
    steps: int
    seconds: float
    gate: dict[str, Any]
    accepted: bool
    created_at: datetime
    removed_at: datetime | None
    removed_reason: str | None


@dataclass(frozen=True)
class VersionRecord:
    model: str
    number: int
    parent: int | None
    created_at: datetime
    manifest_sha256: str
    edit_ids: tuple[int, ...]
    uri: str | None
