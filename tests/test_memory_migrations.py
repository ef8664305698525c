"""Migrations: the migrated schema equals the models; `patchd db upgrade`; the wheel ships them."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from daemon.cli import main
from memory import migrate
from memory.engine import make_engine
from memory.schema import Base

REPO = Path(__file__).resolve().parent.parent


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_migrated_schema_equals_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert migrate.upgrade(engine) == migrate.head_revision() == migrate.HEAD  # HEAD names the newest
    finally:
        engine.dispose()
    assert _diff(db_url) == []


def test_status_check_constraint_exists(migrated_url: str) -> None:
    # compare_metadata does not look at CHECK constraints, so test the migration's directly
    engine = make_engine(migrated_url)
    try:
        migrate.upgrade(engine)
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO mistakes (model, fingerprint, input_text, report_count, reporter_count, "
                    "first_seen, last_seen, status, status_changed_at, priority, needs_policy) VALUES "
                    "('m', 'f', 'x', 0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 'bogus',"
                    " CURRENT_TIMESTAMP, 0, true)"
                )
            )
    finally:
        engine.dispose()


def test_downgrade_to_base_and_back(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine)
        assert migrate.downgrade(engine, "base") is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    assert _diff(db_url) == []


def test_cli_db_upgrade_default_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATCHD_STATE_DIR", str(tmp_path / "from-env"))
    assert main(["db", "current"]) == 1  # empty database: not at head
    assert main(["db", "upgrade"]) == 0
    assert (tmp_path / "from-env" / "patchd.db").exists()
    assert main(["db", "current"]) == 0
    assert main(["db", "upgrade", "--state-dir", str(tmp_path / "explicit")]) == 0
    assert (tmp_path / "explicit" / "patchd.db").exists()
    assert f"none -> {migrate.head_revision()}" in capsys.readouterr().out


@pytest.mark.postgres
def test_cli_db_upgrade_postgres(pg_database: str) -> None:
    assert main(["db", "upgrade", "--url", pg_database]) == 0
    assert main(["db", "current", "--url", pg_database]) == 0
    assert _diff(pg_database) == []


def test_package_data_ships_every_migration_file() -> None:
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["memory"]
    needed = [p.relative_to(REPO / "memory").as_posix() for p in (REPO / "memory" / "migrations").rglob("*.py")]
    assert "migrations/env.py" in needed and any(n.startswith("migrations/versions/") for n in needed)
    missing = [n for n in needed if not any(fnmatch.fnmatch(n, pattern) for pattern in patterns)]
    assert missing == [], f"pyproject package-data does not ship {missing}"
    assert migrate.MIGRATIONS_DIR == REPO / "memory" / "migrations"


@pytest.mark.postgres
def test_bench_store_cli_writes_json(tmp_path: Path, pg_url: str) -> None:
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "store",
                "--events",
                "1500",
                "--batch-size",
                "250",
                "--pg-url",
                pg_url,
                "--scratch-dir",
                str(tmp_path),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    for backend in ("sqlite", "postgresql"):
        assert results[backend]["events"] == 1500 and results[backend]["events_per_s"] > 0
        assert results[backend]["new_reports"] == 1050  # 30% redeliveries


def test_0002_fills_the_input_of_reports_stored_before_it(db_url: str) -> None:
    """A database from before revision 0002 keeps working: each report's input comes back from its
    stored event bytes, a text pair as a pair, an unreadable event as NULL (the key is used then)."""
    from memory.store import Store

    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine, "0001")
        raws = [
            json.dumps({"id": "a", "input": "  The Moon is cheese. ", "target": "REFUTES"}).encode(),
            json.dumps({"id": "b", "input": {"text": "Claim.", "text_pair": "Evidence."}, "target": "A"}).encode(),
            b"{not json",
        ]
        with engine.begin() as conn:
            for i, (key, raw) in enumerate(zip(["the moon is cheese.", "k2", "k3"], raws, strict=True)):
                conn.execute(
                    text(
                        "INSERT INTO mistakes (model, fingerprint, input_text, target, report_count, reporter_count,"
                        " first_seen, last_seen, status, status_changed_at, priority, needs_policy) VALUES "
                        "('m', :fp, :key, 'A', 1, 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 'queued',"
                        " CURRENT_TIMESTAMP, 0, false)"
                    ),
                    {"fp": f"f{i}", "key": key},
                )
                conn.execute(
                    text(
                        "INSERT INTO reports (event_id, model, mistake_id, target, equivalents, received_at, raw,"
                        " topic, kafka_partition, kafka_offset) SELECT :eid, 'm', id, 'A', '[]', CURRENT_TIMESTAMP,"
                        " :raw, 't', 0, :off FROM mistakes WHERE fingerprint = :fp"
                    ),
                    {"eid": f"e{i}", "raw": raw, "off": i, "fp": f"f{i}"},
                )
        assert migrate.upgrade(engine) == migrate.head_revision()
    finally:
        engine.dispose()
    with Store.open(db_url) as store:
        inputs = [m.input for m in store.mistakes("m")]
    assert inputs == ["  The Moon is cheese. ", ("Claim.", "Evidence."), "k3"]


def test_0003_keeps_every_row_and_allows_held_mistakes(db_url: str) -> None:
    """0003 rebuilds the mistakes and status_changes tables on SQLite (a new CHECK): the rows that
    reference them (reports, targets, reporters, status changes) all survive it, with foreign keys
    on again afterwards, and the new statuses are accepted while an unknown one is still refused."""
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine, "0002")
        with engine.begin() as conn:
            for i in range(3):
                conn.execute(
                    text(
                        "INSERT INTO mistakes (model, fingerprint, input_text, target, report_count, reporter_count,"
                        " first_seen, last_seen, status, status_changed_at, priority, needs_policy) VALUES "
                        "('m', :fp, 'x', 'A', 1, 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 'queued',"
                        " CURRENT_TIMESTAMP, 0, false)"
                    ),
                    {"fp": f"f{i}"},
                )
                mid = conn.scalar(text("SELECT id FROM mistakes WHERE fingerprint = :fp"), {"fp": f"f{i}"})
                conn.execute(
                    text(
                        "INSERT INTO reports (event_id, model, mistake_id, target, equivalents, received_at, raw,"
                        " topic, kafka_partition, kafka_offset) VALUES (:eid, 'm', :mid, 'A', '[]',"
                        " CURRENT_TIMESTAMP, '{}', 't', 0, :off)"
                    ),
                    {"eid": f"e{i}", "mid": mid, "off": i},
                )
                conn.execute(text("INSERT INTO mistake_targets VALUES (:mid, 'A', 1)"), {"mid": mid})
                conn.execute(text("INSERT INTO mistake_reporters VALUES (:mid, 'r')"), {"mid": mid})
                conn.execute(
                    text(
                        "INSERT INTO status_changes (mistake_id, from_status, to_status, at) VALUES"
                        " (:mid, 'reported', 'queued', CURRENT_TIMESTAMP)"
                    ),
                    {"mid": mid},
                )
        tables = ("mistakes", "reports", "mistake_targets", "mistake_reporters", "status_changes")
        with engine.connect() as conn:
            before = {t: conn.scalar(text(f"SELECT count(*) FROM {t}")) for t in tables}
        assert set(before.values()) == {3}
        assert migrate.upgrade(engine) == migrate.HEAD
        with engine.connect() as conn:
            assert {t: conn.scalar(text(f"SELECT count(*) FROM {t}")) for t in tables} == before
            if conn.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        with engine.begin() as conn:
            conn.execute(text("UPDATE mistakes SET status = 'held' WHERE fingerprint = 'f1'"))
            conn.execute(text("UPDATE mistakes SET status = 'dismissed' WHERE fingerprint = 'f2'"))
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("UPDATE mistakes SET status = 'bogus' WHERE fingerprint = 'f0'"))
    finally:
        engine.dispose()
