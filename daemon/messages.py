"""Correction events (DESIGN §4): decode, validate, normalise, fingerprint.

`decode_event` turns one Kafka value into a `ReportIn` ready for the store, or a `RejectedIn`
with a machine-readable reason (one of `Reason`) and a human detail. It never raises on bad
input: a malformed event must reach the DLQ with its original bytes, never crash the consumer.

    {"id": "e-1", "model": "fever-minilm", "input": "The moon is made of cheese.",
     "target": "REFUTES", "observed": "SUPPORTS", "equivalents": ["..."],
     "reporter": "alice", "reported_at": "2026-01-02T03:04:05Z", "model_version": 41}

`input` may be a text or {"text": ..., "text_pair": ...}. Fields this version does not know are
ignored, so producers can add fields before the daemon reads them. Normalisation and the
fingerprint come from memory/fingerprint.py, the one definition of "the same mistake".

Several daemons may share one topic (`[kafka] known_models` names the other models served from
it). An event naming one of those is `Skipped`, not dead-lettered: it is the other daemon's. An
event no daemon can claim (not JSON, no model, a model nobody serves) is dead-lettered by exactly
one of them, the daemon whose model name sorts first, so the shared DLQ holds it once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from daemon.settings import PolicySettings
from memory.fingerprint import InputValue, fingerprint, input_key, normalise_input, normalise_text
from memory.records import RejectedIn, ReportIn

# ids and reporter names are stored in String(256) columns (NAME_LEN of the tables in memory/)
MAX_NAME_CHARS = 256
# model_version is an Integer column: 32-bit signed on PostgreSQL
MAX_MODEL_VERSION = 2**31 - 1


class Reason(StrEnum):
    """Why an event was rejected; stored with the rejected row and sent as a DLQ header."""

    EVENT_TOO_LARGE = "event_too_large"
    EMPTY_EVENT = "empty_event"  # a null (tombstone) or empty value
    NOT_UTF8 = "not_utf8"
    BAD_JSON = "bad_json"
    DUPLICATE_FIELD = "duplicate_field"  # {"target": "A", "target": "B"}: parsers disagree on which wins
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_LABEL = "unknown_label"
    EMPTY_INPUT = "empty_input"
    EMPTY_TARGET = "empty_target"
    INPUT_TOO_LONG = "input_too_long"
    FIELD_TOO_LONG = "field_too_long"  # id, reporter, target, observed
    TOO_MANY_EQUIVALENTS = "too_many_equivalents"
    BAD_TIMESTAMP = "bad_timestamp"
    BAD_VALUE = "bad_value"  # right type, impossible value (a negative model_version)
    # a named reporter's reports beyond policy.reporter_rate_limit in its window (memory/ingest.py)
    REPORTER_RATE_LIMITED = "reporter_rate_limited"
    # records the Kafka client could not decode, skipped by an operator (daemon/quarantine.py); the
    # DLQ gets one marker record naming the offsets, with no value: the bytes were unreadable
    UNDECODABLE_BATCH = "undecodable_batch"
    INTERNAL_ERROR = "internal_error"  # a bug in this module; the event stays replayable from the DLQ


class Skip(StrEnum):
    """Why an event was left alone: it is another daemon's to store or to dead-letter."""

    OTHER_MODEL = "other_model"  # names a model in kafka.known_models: that daemon stores it
    OWNER_REJECTS = "owner_rejects"  # nobody's and invalid: the owner of such events dead-letters it


@dataclass(frozen=True)
class Skipped:
    """An event this daemon commits past without storing or dead-lettering it."""

    reason: Skip
    model: str | None  # the model the event names, when it names a string


@dataclass(frozen=True)
class Limits:
    """Per-event limits; the defaults equal PolicySettings' (daemon/settings.py), which set them."""

    max_input_chars: int = 4000
    max_equivalents: int = 16
    max_event_bytes: int = 65536
    casefold: bool = False

    @classmethod
    def from_policy(cls, policy: PolicySettings) -> Limits:
        """The limits the daemon's [policy] settings set."""
        return cls(policy.max_input_chars, policy.max_equivalents, policy.max_event_bytes, policy.casefold)


class _Reject(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def decode_event(
    raw: bytes | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    model: str,
    labels: Sequence[str] | None,
    limits: Limits,
    known_models: frozenset[str] = frozenset(),
) -> ReportIn | RejectedIn | Skipped:
    """One Kafka value -> a validated report, a rejection, or (on a shared topic) another daemon's.

    `labels` None = a generator model. `known_models`: the other models served from this topic.
    """
    data = bytes(raw) if isinstance(raw, bytes | bytearray | memoryview) else b""
    named: str | None = None  # the model the event names, once it parsed as an object
    try:
        event = _parse(raw, limits)
        named = event["model"] if isinstance(event.get("model"), str) else None
        if named is not None and named != model and named in known_models:
            return Skipped(Skip.OTHER_MODEL, named)
        return _validate(
            event,
            data,
            topic=topic,
            partition=partition,
            offset=offset,
            model=model,
            labels=labels,
            limits=limits,
        )
    except _Reject as rej:
        if named != model and model != min(known_models | {model}):
            return Skipped(Skip.OWNER_REJECTS, named)
        return RejectedIn(
            raw=data,
            reason=str(rej.reason),
            detail=rej.detail,
            topic=topic,
            partition=partition,
            offset=offset,
        )
    except Exception as exc:  # noqa: BLE001 - a bug here must cost one event, never the consumer
        return RejectedIn(
            raw=data,
            reason=str(Reason.INTERNAL_ERROR),
            detail=f"could not validate: {exc!r}"[:500],
            topic=topic,
            partition=partition,
            offset=offset,
        )


def _parse(raw: bytes | None, limits: Limits) -> dict[str, Any]:
    if raw is None or (isinstance(raw, bytes | bytearray | memoryview) and len(raw) == 0):
        raise _Reject(Reason.EMPTY_EVENT, "the message value is empty (null or zero bytes)")
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise _Reject(Reason.WRONG_TYPE, f"the message value is {type(raw).__name__}, not bytes")
    # size first: a huge value is refused before any work is spent decoding it
    if len(raw) > limits.max_event_bytes:
        raise _Reject(Reason.EVENT_TOO_LARGE, f"{len(raw)} bytes, limit {limits.max_event_bytes}")
    try:
        text = bytes(raw).decode("utf-8-sig")  # a leading BOM is tolerated (RFC 8259 lets parsers ignore it)
    except UnicodeDecodeError as exc:
        raise _Reject(Reason.NOT_UTF8, f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        event = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _Reject:
        raise
    except json.JSONDecodeError as exc:
        raise _Reject(Reason.BAD_JSON, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (RecursionError, ValueError) as exc:  # absurd nesting, or a number too long to convert
        raise _Reject(Reason.BAD_JSON, f"invalid JSON: {type(exc).__name__}") from None
    if not isinstance(event, dict):
        raise _Reject(Reason.NOT_OBJECT, f"the event must be a JSON object, got {_json_type(event)}")
    return event


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Reject(Reason.DUPLICATE_FIELD, f"field {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Reject(Reason.BAD_JSON, f"invalid JSON: {name} is not a JSON number")


def _validate(
    event: dict[str, Any],
    raw: bytes,
    *,
    topic: str,
    partition: int,
    offset: int,
    model: str,
    labels: Sequence[str] | None,
    limits: Limits,
) -> ReportIn:
    for name in ("id", "model", "input", "target"):
        if event.get(name) is None:
            raise _Reject(Reason.MISSING_FIELD, f"required field {name!r} is missing")

    event_id = event["id"]
    if isinstance(event_id, int) and not isinstance(event_id, bool):
        event_id = str(event_id)  # numeric ids are common (row ids) and unambiguous as text
    event_id = _short_text(event_id, "id")

    if not isinstance(event["model"], str):
        raise _wrong_type("model", "a string", event["model"])
    if event["model"] != model:
        raise _Reject(Reason.UNKNOWN_MODEL, f"model {_show(event['model'])} is not this daemon's ({model!r})")

    value = _input(event["input"], limits)
    normalised = normalise_input(value, limits.casefold)
    if (normalised[0] == "" or normalised[1] == "") if isinstance(normalised, tuple) else normalised == "":
        raise _Reject(Reason.EMPTY_INPUT, "'input' is empty after whitespace normalisation")

    target = _target(event["target"], labels, limits)
    observed = event.get("observed")
    if observed is not None:
        if not isinstance(observed, str):
            raise _wrong_type("observed", "a string", observed)
        _check_length("observed", observed, limits.max_input_chars)

    return ReportIn(
        event_id=event_id,
        model=model,
        fingerprint=fingerprint(model, value, limits.casefold),
        input_text=input_key(normalised),
        target=target,
        raw=raw,
        topic=topic,
        partition=partition,
        offset=offset,
        reporter=_reporter(event.get("reporter")),
        reported_at=_timestamp(event.get("reported_at")),
        observed=observed,
        equivalents=_equivalents(event.get("equivalents"), normalised, limits),
        model_version=_model_version(event.get("model_version")),
        input=value,
    )


def _input(value: Any, limits: Limits) -> InputValue:
    if isinstance(value, str):
        result: InputValue = value
        length = len(value)
    elif isinstance(value, dict):
        extra = set(value) - {"text", "text_pair"}
        if extra:
            raise _Reject(Reason.WRONG_TYPE, f"'input' object may hold only text and text_pair, got {sorted(extra)}")
        text, pair = value.get("text"), value.get("text_pair")
        if text is None:
            raise _Reject(Reason.MISSING_FIELD, "required field 'input.text' is missing")
        if not isinstance(text, str):
            raise _wrong_type("input.text", "a string", text)
        if pair is not None and not isinstance(pair, str):
            raise _wrong_type("input.text_pair", "a string", pair)
        result = text if pair is None else (text, pair)  # {"text": t} alone is a plain text input
        length = len(text) + len(pair or "")
    else:
        raise _wrong_type("input", 'a string or {"text", "text_pair"}', value)
    if length > limits.max_input_chars:
        raise _Reject(Reason.INPUT_TOO_LONG, f"'input' has {length} characters, limit {limits.max_input_chars}")
    return result


def _target(value: Any, labels: Sequence[str] | None, limits: Limits) -> str:
    if not isinstance(value, str):
        raise _wrong_type("target", "a string", value)
    if labels is not None:
        # a classifier's target must name a class exactly: a near miss is a producer bug to surface
        if value not in labels:
            raise _Reject(Reason.UNKNOWN_LABEL, f"target {_show(value)} is not a label of this model {list(labels)}")
        return value
    _check_length("target", value, limits.max_input_chars)
    target = normalise_text(value)  # "Paris " and "Paris" are one answer, not a conflict
    if not target:
        raise _Reject(Reason.EMPTY_TARGET, "'target' is empty after whitespace normalisation")
    return target


def _equivalents(value: Any, normalised: InputValue, limits: Limits) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _wrong_type("equivalents", "a list of strings", value)
    if len(value) > limits.max_equivalents:
        raise _Reject(Reason.TOO_MANY_EQUIVALENTS, f"{len(value)} equivalents, limit {limits.max_equivalents}")
    seen: dict[str, None] = {}
    own = normalised[0] if isinstance(normalised, tuple) else normalised
    for i, text in enumerate(value):
        if len(text) > limits.max_input_chars:
            raise _Reject(
                Reason.INPUT_TOO_LONG,
                f"equivalents[{i}] has {len(text)} characters, limit {limits.max_input_chars}",
            )
        item = normalise_text(text, limits.casefold)
        if not item:
            raise _Reject(Reason.EMPTY_INPUT, f"equivalents[{i}] is empty after whitespace normalisation")
        if item != own:  # the input itself is no paraphrase; repeats add nothing
            seen.setdefault(item)
    return tuple(seen)


def _reporter(value: Any) -> str | None:
    if value is None:
        return None
    reporter = _short_text(value, "reporter")
    return reporter or None  # "" = anonymous, as when the field is absent


def _timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _wrong_type("reported_at", "an ISO-8601 string", value)
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise _Reject(Reason.BAD_TIMESTAMP, f"reported_at {_show(value)} is not ISO-8601") from None
    # no offset given: read as UTC, the only zone a service should emit without saying so
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


def _model_version(value: Any) -> int | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()))
    ):
        raise _wrong_type("model_version", "an integer", value)
    if not 0 <= value <= MAX_MODEL_VERSION:
        raise _Reject(Reason.BAD_VALUE, f"model_version {value} is outside 0..{MAX_MODEL_VERSION}")
    return int(value)


def _short_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _wrong_type(name, "a string", value)
    _check_length(name, value, MAX_NAME_CHARS)
    if name == "id" and not value.strip():
        raise _Reject(Reason.MISSING_FIELD, "required field 'id' is empty")
    return value


def _check_length(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise _Reject(Reason.FIELD_TOO_LONG, f"{name!r} has {len(value)} characters, limit {limit}")


def _wrong_type(name: str, expected: str, value: Any) -> _Reject:
    return _Reject(Reason.WRONG_TYPE, f"{name!r} must be {expected}, got {_json_type(value)} {_show(value)}")


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _show(value: Any, limit: int = 60) -> str:
    """A short printable form of a value for a detail message (details must stay small)."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
