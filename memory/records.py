"""Plain records that cross the boundary between the daemon and the store."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

# InputValue: a text, or a (text, text_pair) pair (an NLI classifier's premise and hypothesis);
# patching/encode.py's ModelInput is the same type, so the value crosses from event to engine as is
from memory.fingerprint import InputValue as InputValue  # re-exported for the daemon
from memory.status import Status


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
    # the input as sent (validated, not normalised): what a patch for this mistake trains on;
    # None (synthetic reports) = the normalised `input_text`
    input: InputValue | None = None


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
    # new reports refused by the reporter rate limit: stored as rejected rows in the same
    # transaction; the consumer dead-letters them (reason reporter_rate_limited)
    rate_limited: tuple[RejectedIn, ...] = ()


@dataclass(frozen=True)
class RateLimit:
    """At most `limit` new reports per named reporter and model in any `window_s` (a flood guard)."""

    limit: int
    window_s: float


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
    # what to train on: the first report's input as sent (of the winning target, once there is one)
    input: InputValue = ""


@dataclass(frozen=True)
class PatchIn:
    """One trained neuron group and the gate's verdict, as the worker hands it to `Store.add_patch`."""

    neurons: bytes  # safetensors blob: keys [n,d], biases [n], values [n,d] (patching/patchfile.py's format)
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
class PatchMeta:
    """An accepted patch without its neurons: what a publish needs to plan its segments."""

    id: int
    mistake_id: int
    gate: dict[str, Any]


@dataclass(frozen=True)
class VersionRecord:
    model: str
    number: int
    parent: int | None
    created_at: datetime
    manifest_sha256: str
    edit_ids: tuple[int, ...]
    uri: str | None


@dataclass(frozen=True)
class StatusSummary:
    """`patchd status`: the store's counts for one model (its JSON keys are part of the interface)."""

    model: str
    reports: int
    rejected: int  # events that failed validation (all models: they name none reliably)
    mistakes: dict[str, int]  # status -> count, every status present
    patches: int  # accepted and not removed
    patch_tries: int  # every trained neuron group, accepted or not
    backlog: int  # what the worker still has to do
    last_version: int | None
    # open stuck-partition episodes (StuckRecord.as_dict()): records the consumer cannot decode
    stuck_partitions: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StuckRecord:
    """A partition the consumer cannot read past (memory/stuck.py), as `patchd status` shows it."""

    id: int
    model: str
    topic: str
    partition: int
    offset: int
    error: str
    first_seen: datetime
    last_seen: datetime
    command: str | None  # "skip" | "retry" once an operator asked; the daemon carries it out
    operator: str | None
    reason: str | None
    commanded_at: datetime | None
    resolved_at: datetime | None
    resolution: str | None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("first_seen", "last_seen", "commanded_at", "resolved_at"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out
