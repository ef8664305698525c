"""daemon/messages.py: every rejection reason, normalisation, and the ReportIn it builds."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from daemon.messages import Limits, Reason, decode_event
from daemon.settings import PolicySettings
from memory.fingerprint import fingerprint, input_key
from memory.records import RejectedIn, ReportIn

MODEL = "fever-minilm"
LABELS = ("SUPPORTS", "REFUTES")
LIMITS = Limits(max_input_chars=100, max_equivalents=3, max_event_bytes=2000)
WHERE = {"topic": "corrections", "partition": 2, "offset": 41}


def event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "e-1", "model": MODEL, "input": "The moon is cheese.", "target": "REFUTES"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def decode(value: Any, *, labels: tuple[str, ...] | None = LABELS, limits: Limits = LIMITS) -> Any:
    raw = value if isinstance(value, bytes) or value is None else json.dumps(value).encode()
    return decode_event(raw, model=MODEL, labels=labels, limits=limits, **WHERE)


def rejected(value: Any, reason: Reason, **kwargs: Any) -> RejectedIn:
    result = decode(value, **kwargs)
    assert isinstance(result, RejectedIn), result
    assert result.reason == reason.value, result.detail
    assert result.detail  # a human reason beside the machine one
    assert (result.topic, result.partition, result.offset) == ("corrections", 2, 41)
    return result


def test_a_full_event_becomes_a_report() -> None:
    value = event(
        input="  The   moon is\tcheese. ",
        observed="SUPPORTS",
        equivalents=["The moon consists of cheese.", "the moon is made of cheese", "The moon is cheese."],
        reporter="alice",
        reported_at="2026-01-02T03:04:05+01:00",
        model_version=41,
        future_field={"ignored": True},
    )
    raw = json.dumps(value).encode()
    report = decode(raw)
    assert isinstance(report, ReportIn)
    assert report.event_id == "e-1" and report.model == MODEL and report.target == "REFUTES"
    assert report.input_text == "The moon is cheese."
    assert report.fingerprint == fingerprint(MODEL, "The moon is cheese.")
    assert report.raw == raw and (report.topic, report.partition, report.offset) == ("corrections", 2, 41)
    assert report.observed == "SUPPORTS" and report.reporter == "alice" and report.model_version == 41
    assert report.reported_at == datetime(2026, 1, 2, 2, 4, 5, tzinfo=UTC)
    # the input itself is dropped from its paraphrases
    assert report.equivalents == ("The moon consists of cheese.", "the moon is made of cheese")


def test_minimal_event_and_text_pair_input() -> None:
    report = decode(event(input={"text": "Claim.", "text_pair": " Evidence  text "}))
    assert isinstance(report, ReportIn)
    assert report.input_text == input_key(("Claim.", "Evidence text"))
    assert report.fingerprint == fingerprint(MODEL, ("Claim.", "Evidence text"))
    assert (report.reporter, report.reported_at, report.observed, report.model_version) == (
        None,
        None,
        None,
        None,
    )
    assert report.equivalents == ()
    only_text = decode(event(input={"text": "Claim."}))
    assert only_text.input_text == "Claim." and only_text.fingerprint == fingerprint(MODEL, "Claim.")


def test_same_mistake_same_fingerprint_and_casefold_setting() -> None:
    a, b = decode(event(input="Paris is in Italy")), decode(event(id="e-2", input=" Paris  is in Italy"))
    assert a.fingerprint == b.fingerprint
    c = decode(event(input="PARIS is in Italy"))
    assert c.fingerprint != a.fingerprint
    folded = Limits(max_input_chars=100, max_equivalents=3, max_event_bytes=2000, casefold=True)
    assert (
        decode(event(input="PARIS is in Italy"), limits=folded).fingerprint
        == decode(event(input="paris is in italy"), limits=folded).fingerprint
    )


def test_generator_target_is_free_text_and_normalised() -> None:
    report = decode(event(model=MODEL, target="  Rome \n"), labels=None)
    assert report.target == "Rome"
    rejected(event(target="   "), Reason.EMPTY_TARGET, labels=None)
    rejected(event(target="x" * 101), Reason.FIELD_TOO_LONG, labels=None)


def test_numeric_id_and_anonymous_reporter() -> None:
    report = decode(event(id=12345, reporter=""))
    assert report.event_id == "12345" and report.reporter is None


def test_naive_timestamp_is_utc_and_z_suffix_parses() -> None:
    assert decode(event(reported_at="2026-01-02T03:04:05")).reported_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    stamp = decode(event(reported_at="2026-01-02T03:04:05Z")).reported_at
    assert stamp == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(0)))


@pytest.mark.parametrize(
    ("value", "reason", "in_detail"),
    [
        (None, Reason.EMPTY_EVENT, "empty"),
        (b"", Reason.EMPTY_EVENT, "empty"),
        (b"x" * 2001, Reason.EVENT_TOO_LARGE, "2001"),
        (b'{"id": "\xff\xfe"}', Reason.NOT_UTF8, "UTF-8"),
        (b'{"id": "e-1", ', Reason.BAD_JSON, "line 1"),
        (b'{"id": NaN}', Reason.BAD_JSON, "NaN"),
        (b'{"id": "a", "id": "b", "model": "m"}', Reason.DUPLICATE_FIELD, "'id'"),
        (b'["id", "model"]', Reason.NOT_OBJECT, "array"),
        (b'"just a string"', Reason.NOT_OBJECT, "string"),
        (event(id=_DROP), Reason.MISSING_FIELD, "'id'"),
        (event(model=_DROP), Reason.MISSING_FIELD, "'model'"),
        (event(input=None), Reason.MISSING_FIELD, "'input'"),
        (event(target=_DROP), Reason.MISSING_FIELD, "'target'"),
        (event(id="  "), Reason.MISSING_FIELD, "'id'"),
        (event(input={"text_pair": "b"}), Reason.MISSING_FIELD, "input.text"),
        (event(id=["e"]), Reason.WRONG_TYPE, "'id'"),
        (event(id=True), Reason.WRONG_TYPE, "'id'"),
        (event(model=7), Reason.WRONG_TYPE, "'model'"),
        (event(input=42), Reason.WRONG_TYPE, "'input'"),
        (event(input={"text": "a", "pair": "b"}), Reason.WRONG_TYPE, "pair"),
        (event(input={"text": "a", "text_pair": 3}), Reason.WRONG_TYPE, "input.text_pair"),
        (event(target=1), Reason.WRONG_TYPE, "'target'"),
        (event(observed=0), Reason.WRONG_TYPE, "'observed'"),
        (event(equivalents="one paraphrase"), Reason.WRONG_TYPE, "'equivalents'"),
        (event(equivalents=["ok", 3]), Reason.WRONG_TYPE, "'equivalents'"),
        (event(reporter={"name": "x"}), Reason.WRONG_TYPE, "'reporter'"),
        (event(reported_at=1767323045), Reason.WRONG_TYPE, "'reported_at'"),
        (event(model_version="41"), Reason.WRONG_TYPE, "'model_version'"),
        (event(model_version=4.5), Reason.WRONG_TYPE, "'model_version'"),
        (event(model_version=True), Reason.WRONG_TYPE, "'model_version'"),
        (event(model_version=-1), Reason.BAD_VALUE, "-1"),
        (event(model="other-model"), Reason.UNKNOWN_MODEL, "other-model"),
        (event(target="supports"), Reason.UNKNOWN_LABEL, "SUPPORTS"),
        (event(input=" \t\n "), Reason.EMPTY_INPUT, "'input'"),
        (event(input={"text": "a", "text_pair": "  "}), Reason.EMPTY_INPUT, "'input'"),
        (event(equivalents=["fine", " "]), Reason.EMPTY_INPUT, "equivalents[1]"),
        (event(input="x" * 101), Reason.INPUT_TOO_LONG, "101"),
        (event(input={"text": "x" * 60, "text_pair": "y" * 60}), Reason.INPUT_TOO_LONG, "120"),
        (event(equivalents=["x" * 101]), Reason.INPUT_TOO_LONG, "equivalents[0]"),
        (event(equivalents=["a", "b", "c", "d"]), Reason.TOO_MANY_EQUIVALENTS, "4"),
        (event(id="e" * 257), Reason.FIELD_TOO_LONG, "'id'"),
        (event(reporter="r" * 257), Reason.FIELD_TOO_LONG, "'reporter'"),
        (event(observed="o" * 101), Reason.FIELD_TOO_LONG, "'observed'"),
        (event(reported_at="yesterday"), Reason.BAD_TIMESTAMP, "yesterday"),
        (event(reported_at="2026-13-01T00:00:00Z"), Reason.BAD_TIMESTAMP, "2026-13-01"),
    ],
)
def test_rejections_carry_a_reason(value: Any, reason: Reason, in_detail: str) -> None:
    result = rejected(value, reason)
    assert in_detail in result.detail
    assert len(result.detail) < 600  # details stay small whatever the event held
    expected_raw = b"" if value is None else value if isinstance(value, bytes) else json.dumps(value).encode()
    assert result.raw == expected_raw  # the original bytes go to the DLQ untouched


def test_limits_come_from_policy_settings() -> None:
    policy = PolicySettings(max_input_chars=10, max_equivalents=1, max_event_bytes=500, casefold=True)
    limits = Limits.from_policy(policy)
    assert limits == Limits(max_input_chars=10, max_equivalents=1, max_event_bytes=500, casefold=True)
    defaults = PolicySettings()
    assert Limits() == Limits.from_policy(defaults)  # one set of defaults, not two
    rejected(event(input="x" * 11), Reason.INPUT_TOO_LONG, limits=limits)


def test_never_raises_on_arbitrary_bytes() -> None:
    import random

    rng = random.Random(5)
    samples = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))) for _ in range(300)]
    samples += [b"{}", b"null", b"1e999999", b"-" * 10, b'{"id": 1e400}', b"\xef\xbb\xbf{}", b"\x00"]
    for raw in samples:
        assert isinstance(decode(raw), RejectedIn | ReportIn)


def test_absurd_nesting_is_bad_json_not_a_crash() -> None:
    roomy = Limits(max_event_bytes=100_000)
    result = rejected(b"[" * 40_000 + b"]" * 40_000, Reason.BAD_JSON, limits=roomy)
    assert "RecursionError" in result.detail


def test_leading_bom_is_tolerated() -> None:
    assert isinstance(decode(b"\xef\xbb\xbf" + json.dumps(event()).encode()), ReportIn)


# ---------------------------------------------------------------------------- a shared topic


def test_events_of_known_models_are_skipped_and_unclaimed_ones_rejected_by_one_owner() -> None:
    """On a topic shared with "zsre-smollm2" (which sorts after "fever-minilm"), fever-minilm owns
    the events nobody can claim; the zsre daemon skips those and fever-minilm skips zsre's."""
    from daemon.messages import Skip, Skipped

    others = frozenset({"zsre-smollm2"})

    def route(value: Any, model: str, known: frozenset[str]) -> Any:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return decode_event(raw, model=model, labels=None, limits=LIMITS, known_models=known, **WHERE)

    zsre = event(model="zsre-smollm2", target="Paris")
    assert route(zsre, MODEL, others) == Skipped(Skip.OTHER_MODEL, "zsre-smollm2")
    assert isinstance(route(zsre, "zsre-smollm2", frozenset({MODEL})), ReportIn)
    # without known_models, another model's event is dead-lettered as before
    assert route(zsre, MODEL, frozenset()).reason == Reason.UNKNOWN_MODEL

    # an invalid event that names its model goes to that model's daemon only, whichever sorts first
    bad_zsre = event(model="zsre-smollm2", input="")
    assert route(bad_zsre, MODEL, others) == Skipped(Skip.OTHER_MODEL, "zsre-smollm2")
    assert route(bad_zsre, "zsre-smollm2", frozenset({MODEL})).reason == Reason.EMPTY_INPUT

    # unclaimable events: fever-minilm (first by sort order) dead-letters, zsre-smollm2 skips
    for value, reason in [
        (b"{not json", Reason.BAD_JSON),
        (event(model=_DROP), Reason.MISSING_FIELD),
        (event(model=7), Reason.WRONG_TYPE),
        (event(model="nobody-serves-this"), Reason.UNKNOWN_MODEL),
    ]:
        assert route(value, MODEL, others).reason == reason
        skipped = route(value, "zsre-smollm2", frozenset({MODEL}))
        assert isinstance(skipped, Skipped) and skipped.reason == Skip.OWNER_REJECTS


def test_known_models_must_name_other_models() -> None:
    from daemon.settings import SettingsError, load_settings

    env = {"PATCHD_KAFKA_KNOWN_MODELS": "zsre-smollm2, other"}
    assert load_settings(None, env).kafka.known_models == ("zsre-smollm2", "other")
    with pytest.raises(SettingsError, match="kafka.known_models"):
        load_settings(None, {"PATCHD_MODEL_NAME": "a", "PATCHD_KAFKA_KNOWN_MODELS": "a,b"})
