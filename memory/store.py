"""The Store: all of patchd's durable state behind one object (DESIGN §6).

    store = Store.open(url=None, *, state_dir=None, upgrade=True)  # None: SQLite under the state dir
    store.record_batch(reports, rate_limit=None) -> BatchResult  # one transaction; redelivery is a no-op
    store.record_rejected(rejected) -> int      # invalid events; redelivery is a no-op
    store.next_mistake(model, quorum=1, conflict_share=0.5, claim=True, probation_s=0) -> MistakeRecord | None
    store.held_mistakes(model) -> list[MistakeRecord]; store.review(mistake_id, approve, operator, reason)
    store.reporter_counts(model, since) -> dict[str, int]     # reports per reporter since `since`
    store.get_mistake(mistake_id) -> MistakeRecord | None
    store.find_mistake(model, fingerprint) -> MistakeRecord | None
    store.set_status(mistake_id, status, note=None)          # through memory.lifecycle
    store.set_priority(mistake_id, priority)
    store.status_counts(model) -> dict[Status, int]
    store.backlog(model, quorum) -> int                       # what the worker still has to do
    store.status_summary(model, quorum) -> StatusSummary     # `patchd status`
    store.requeue(model, statuses, note) -> list[int]        # `patchd replay`: back to queued
    store.mistakes(model) -> list[MistakeRecord]; store.event_ids(model) -> set[str]
    store.verdicts(model) -> [(mistake id, status)]          # the worker's verdicts, in the order stored
    store.rejected_offsets(topic) -> {(partition, offset): reason}  # what the rejected table holds
    store.ping()                                             # SELECT 1 (readiness)
    store.add_patch(mistake_id, PatchIn(...)) -> int        # accepted: mistake -> patched
    store.patches_of(mistake_id) -> list[PatchRecord]
    store.accepted_patches(model) -> list[PatchRecord]       # not removed, in acceptance order
    store.accepted_patch_ids(model) -> [(patch id, mistake id)]  # the same, without the tensors
    store.mark_patch_removed(patch_id, reason)               # mistake patched -> revoked
    store.recover_interrupted(model) -> list[int]            # patching -> queued after a crash
    store.add_version(model, number, parent, manifest_sha256, edit_ids, uri=None, patch_ids=()) -> VersionRecord
    store.provenance(patch_ids) -> {patch id: {mistake_id, target, input, reporters, ...}}  # memory/provenance.py
    store.latest_version(model) -> VersionRecord | None
    store.versions(model) -> list[VersionRecord]
    store.table_counts() -> dict[str, int]
    store.record_stuck(model, topic, partition, offset, error) -> StuckRecord  # memory/stuck.py
    store.command_stuck(model, topic, partition, action, operator, reason, offset) -> StuckRecord
    store.resolve_stuck(stuck_id, resolution); store.stuck_partitions(model, open_only=True)
    store.close()

Every method is one transaction and returns plain frozen records (memory/records.py), never
live ORM objects, so results can cross threads. The Store is safe to share between the consumer
thread (writes) and the worker thread (reads and status changes): each call checks a pooled
connection out of the Store's one engine. On SQLite, write calls take the write lock up front
(BEGIN IMMEDIATE) and wait up to 30 s for it; reads run beside writes thanks to WAL.

After a restart the daemon calls recover_interrupted(model) (a neuron that was being trained was
never kept), then replays accepted_patches(model) in order to rebuild the exact patched model.
A claimed mistake must end in one of add_patch(accepted=True), set_status(already_fixed /
gate_rejected / failed) or, on a warm stop, set_status(queued).

Status changes happen only in memory/lifecycle.py; an illegal one raises IllegalTransition and
the whole call is rolled back. Every query patchd makes is a method here (or a function of
memory/ingest.py, policy.py, summary.py that one calls): nothing outside memory/ writes SQL.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, func, select, update
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from memory import ingest, lifecycle, migrate, policy, provenance, review, stuck, summary
from memory.engine import WRITE_OPTION, default_url, make_engine
from memory.lifecycle import Status
from memory.records import (
    BatchResult,
    MistakeRecord,
    PatchIn,
    PatchMeta,
    PatchRecord,
    RateLimit,
    RejectedIn,
    ReportIn,
    StatusSummary,
    StuckRecord,
    VersionRecord,
)
from memory.schema import Base, Mistake, Patch, Rejected, Report, StatusChange, Version

# ids per IN (...) list: well under every backend's bound-parameter limit
ID_CHUNK = 500

R = TypeVar("R")


class NotFound(LookupError):
    """A mistake, patch or version id that is not in the database."""


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False)

    @classmethod
    def open(cls, url: str | URL | None = None, *, state_dir: str | None = None, upgrade: bool = True) -> Store:
        """Open (and by default migrate) the database at `url`.

        `upgrade=True` runs pending migrations, so the embedded SQLite default needs no setup;
        with `upgrade=False` (an operator runs `patchd db upgrade`) a schema that is not at the
        newest revision raises migrate.SchemaOutOfDate instead.
        """
        engine = make_engine(url if url is not None else default_url(state_dir))
        try:
            if upgrade:
                migrate.upgrade(engine)
            else:
                migrate.require_head(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        """A write transaction (BEGIN IMMEDIATE on SQLite): commits on exit, rolls back on error."""
        with self._write() as session, session.begin():
            yield session

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        """A read transaction. Private: every query is a Store method (memory/ owns persistence)."""
        with self._read() as session, session.begin():
            yield session

    # -- ingest -------------------------------------------------------------------------------

    def record_batch(self, reports: Sequence[ReportIn], rate_limit: RateLimit | None = None) -> BatchResult:
        """Store a batch of validated reports in ONE transaction (see memory/ingest.py); with a
        rate limit, a reporter's reports over it are stored as rejected and returned."""
        if not reports:
            return BatchResult(new_reports=0, duplicates=0, mistakes_created=0, mistakes_updated=0)
        with self._writing() as session:
            return ingest.record_reports(session.connection(), reports, _now(), rate_limit)

    def record_rejected(self, rejected: Sequence[RejectedIn]) -> int:
        """Store events that failed validation; returns how many were new."""
        with self._writing() as session:
            return ingest.record_rejected(session.connection(), rejected, _now())

    # -- policy -------------------------------------------------------------------------------

    def next_mistake(
        self,
        model: str,
        quorum: int = 1,
        conflict_share: float = 0.5,
        *,
        claim: bool = True,
        probation_s: float = 0.0,
    ) -> MistakeRecord | None:
        """Settle changed mistakes (queued / conflicting), then return the one to patch next.

        With `claim=True` (the worker) it moves to `patching` in the same transaction, so two
        callers never get the same mistake and a crash leaves a trace for recover_interrupted.
        """
        policy.check_policy(quorum, conflict_share)
        with self._writing() as session:
            policy.resolve(session, model, quorum, conflict_share, probation_s)
            mistake = policy.pick(session, model)
            if mistake is None:
                return None
            if claim:
                lifecycle.transition(session, mistake, Status.PATCHING)
            return self._record(session, mistake)

    def reporter_counts(self, model: str, since: datetime) -> dict[str, int]:
        """Reports per reporter received at or after `since` (anonymous reports under "")."""
        with self._reading() as session:
            rows = session.execute(
                select(Report.reporter, func.count())
                .where(Report.model == model, Report.received_at >= since)
                .group_by(Report.reporter)
            )
            return {reporter or ingest.ANONYMOUS: count for reporter, count in rows}

    # -- mistakes -----------------------------------------------------------------------------

    def get_mistake(self, mistake_id: int) -> MistakeRecord | None:
        with self._reading() as session:
            mistake = session.get(Mistake, mistake_id)
            return None if mistake is None else self._record(session, mistake)

    def find_mistake(self, model: str, fingerprint: str) -> MistakeRecord | None:
        with self._reading() as session:
            mistake = session.scalars(
                select(Mistake).where(Mistake.model == model, Mistake.fingerprint == fingerprint)
            ).first()
            return None if mistake is None else self._record(session, mistake)

    def set_status(self, mistake_id: int, status: Status, note: str | None = None) -> None:
        """Change a mistake's status (worker outcomes, operator re-queue); illegal changes raise."""
        with self._writing() as session:
            lifecycle.transition(session, self._mistake(session, mistake_id), Status(status), note)

    def set_priority(self, mistake_id: int, priority: int) -> None:
        with self._writing() as session:
            self._mistake(session, mistake_id).priority = priority

    def status_counts(self, model: str) -> dict[Status, int]:
        """Mistakes per status, with every status present (0 when none)."""
        with self._reading() as session:
            return summary.status_counts(session, model)

    def backlog(self, model: str, quorum: int) -> int:
        """Mistakes waiting for the worker (queued, or reported by `quorum` reporters): backpressure."""
        with self._reading() as session:
            return summary.backlog(session, model, quorum)

    def status_summary(self, model: str, quorum: int) -> StatusSummary:
        """What `patchd status` prints, read in one transaction."""
        with self._reading() as session:
            return summary.status_summary(session, model, quorum)

    # -- review (memory/review.py) --------------------------------------------------------------

    def held_mistakes(self, model: str, dismissed: bool = False) -> list[MistakeRecord]:
        """Mistakes held for review (and, with `dismissed`, those an operator dismissed), oldest first."""
        with self._reading() as session:
            return [self._record(session, m) for m in review.held(session, model, dismissed)]

    def review(
        self, model: str, mistake_id: int, approve: bool, operator: str, reason: str | None = None
    ) -> MistakeRecord:
        """An operator's verdict on a held (or dismissed) mistake: approve queues it, dismiss ends it."""
        with self._writing() as session:
            return self._record(session, review.decide(session, model, mistake_id, approve, operator, reason))

    # -- stuck partitions (memory/stuck.py) ----------------------------------------------------

    def record_stuck(self, model: str, topic: str, partition: int, offset: int, error: str) -> StuckRecord:
        """Open (or refresh) the episode of a partition stuck on an undecodable batch at `offset`."""
        with self._writing() as session:
            return stuck.record(session, model, topic, partition, offset, error, _now())

    def command_stuck(
        self,
        model: str,
        topic: str,
        partition: int,
        action: str,
        operator: str,
        reason: str | None = None,
        offset: int | None = None,
    ) -> StuckRecord:
        """An operator's skip or retry for a stuck partition; raises stuck.NoStuckPartition."""
        with self._writing() as session:
            return stuck.command(session, model, topic, partition, action, operator, reason, offset, _now())

    def resolve_stuck(self, stuck_id: int, resolution: str) -> None:
        with self._writing() as session:
            stuck.resolve(session, stuck_id, resolution, _now())

    def stuck_partitions(self, model: str, open_only: bool = True) -> list[StuckRecord]:
        with self._reading() as session:
            return stuck.listed(session, model, open_only)

    def requeue(self, model: str, statuses: Sequence[Status], note: str) -> list[int]:
        """Send every mistake of `model` in one of `statuses` back to the queue (`patchd replay`)."""
        with self._writing() as session:
            mistakes = session.scalars(
                select(Mistake)
                .where(Mistake.model == model, Mistake.status.in_(list(statuses)))
                .order_by(Mistake.id)
                .with_for_update(key_share=True)
            ).all()
            for mistake in mistakes:
                lifecycle.transition(session, mistake, Status.QUEUED, note=note)
            return [m.id for m in mistakes]

    def mistakes(self, model: str) -> list[MistakeRecord]:
        """Every mistake of `model`, in id order (audits, tests comparing two runs)."""
        with self._reading() as session:
            rows = session.scalars(select(Mistake).where(Mistake.model == model).order_by(Mistake.id)).all()
            return [self._record(session, m) for m in rows]

    def event_ids(self, model: str) -> set[str]:
        """The event ids of every stored report of `model` (exactly-once checks)."""
        with self._reading() as session:
            return set(session.scalars(select(Report.event_id).where(Report.model == model)))

    def verdicts(self, model: str) -> list[tuple[int, Status]]:
        """(mistake id, status) of every change into a worker's verdict (patched, already_fixed,
        gate_rejected), in the order they were stored: the order in which the model changed, which
        an audit replays to rebuild the same model (`patchd bench chaos`)."""
        done = (Status.PATCHED, Status.ALREADY_FIXED, Status.GATE_REJECTED)
        with self._reading() as session:
            rows = session.execute(
                select(StatusChange.mistake_id, StatusChange.to_status)
                .join(Mistake, Mistake.id == StatusChange.mistake_id)
                .where(Mistake.model == model, StatusChange.to_status.in_(done))
                .order_by(StatusChange.id)
            )
            return [(int(m), Status(s)) for m, s in rows]

    def rejected_offsets(self, topic: str) -> dict[tuple[int, int], str]:
        """{(partition, offset): reason} of the rejected events read from `topic` (audits: every
        invalid event stored once)."""
        with self._reading() as session:
            rows = session.execute(
                select(Rejected.kafka_partition, Rejected.kafka_offset, Rejected.reason).where(Rejected.topic == topic)
            )
            return {(int(p), int(o)): str(r) for p, o, r in rows}

    def ping(self) -> None:
        """One round trip to the database (SELECT 1); raises when it does not answer (readiness)."""
        with self._reading() as session:
            session.execute(select(1))

    # -- patches ------------------------------------------------------------------------------

    def add_patch(self, mistake_id: int, patch: PatchIn) -> int:
        """Store one trained neuron group for a mistake in `patching`; returns the patch id.

        An accepted patch moves the mistake to `patched` in the same transaction: a crash can
        never leave a kept neuron whose mistake would be queued (and patched) again. A rejected
        try leaves the mistake in `patching` for the next try; the worker ends with set_status.
        """
        with self._writing() as session:
            mistake = self._mistake(session, mistake_id)
            if mistake.status != Status.PATCHING:
                raise ValueError(
                    f"patch for mistake {mistake_id} refused: it is {mistake.status}, not patching "
                    "(the worker claims a mistake with next_mistake before training)"
                )
            row = Patch(mistake_id=mistake_id, model=mistake.model, created_at=_now(), **asdict(patch))
            session.add(row)
            if patch.accepted:
                lifecycle.transition(session, mistake, Status.PATCHED, note=f"{patch.n_neurons} neuron(s) kept")
            session.flush()
            return row.id

    def patches_of(self, mistake_id: int) -> list[PatchRecord]:
        with self._reading() as session:
            rows = session.scalars(select(Patch).where(Patch.mistake_id == mistake_id).order_by(Patch.id))
            return [_as(PatchRecord, p) for p in rows]

    def accepted_patches(self, model: str) -> list[PatchRecord]:
        """The patches in the model now, in the order they were accepted: replay them to rebuild it."""
        with self._reading() as session:
            rows = session.scalars(
                select(Patch)
                .where(Patch.model == model, Patch.accepted.is_(True), Patch.removed_at.is_(None))
                .order_by(Patch.id)
            )
            return [_as(PatchRecord, p) for p in rows]

    def accepted_patch_meta(self, model: str) -> list[PatchMeta]:
        """accepted_patches(model) without the neuron bytes (a publish reads those only for the
        segments it writes: at 10,000 patches the blobs are ~31 MB, the rest a few hundred KB)."""
        with self._reading() as session:
            rows = session.execute(
                select(Patch.id, Patch.mistake_id, Patch.gate)
                .where(Patch.model == model, Patch.accepted.is_(True), Patch.removed_at.is_(None))
                .order_by(Patch.id)
            )
            return [PatchMeta(int(i), int(m), dict(g or {})) for i, m, g in rows]

    def patches_by_id(self, ids: Sequence[int]) -> list[PatchRecord]:
        """The patches with these ids, in id order (neurons included)."""
        found: list[PatchRecord] = []
        with self._reading() as session:
            for start in range(0, len(ids), ID_CHUNK):
                chunk = list(ids[start : start + ID_CHUNK])
                found += [_as(PatchRecord, p) for p in session.scalars(select(Patch).where(Patch.id.in_(chunk)))]
        return sorted(found, key=lambda p: p.id)

    def provenance(self, patch_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Who and what is behind each patch (what a published version carries about it, so that a
        downstream service can answer "why" without this database): the mistake, its target and
        input, its reports and reporters, when the patch was accepted, its first version."""
        with self._reading() as session:
            return provenance.of_patches(session, patch_ids)

    def accepted_patch_ids(self, model: str) -> list[tuple[int, int]]:
        """(patch id, mistake id) of accepted_patches(model), without the tensors: a cheap "changed?" check."""
        with self._reading() as session:
            rows = session.execute(
                select(Patch.id, Patch.mistake_id)
                .where(Patch.model == model, Patch.accepted.is_(True), Patch.removed_at.is_(None))
                .order_by(Patch.id)
            )
            return [(int(p), int(m)) for p, m in rows]

    def mark_patch_removed(self, patch_id: int, reason: str) -> None:
        """Take an accepted patch out of the model (revoke); its mistake becomes `revoked`."""
        with self._writing() as session:
            patch = session.get(Patch, patch_id, with_for_update={"key_share": True})
            if patch is None:
                raise NotFound(f"no patch with id {patch_id}")
            if not patch.accepted or patch.removed_at is not None:
                state = "was never accepted" if not patch.accepted else f"was removed at {patch.removed_at}"
                raise ValueError(f"patch {patch_id} cannot be removed: it {state}")
            patch.removed_at, patch.removed_reason = _now(), reason
            lifecycle.transition(session, self._mistake(session, patch.mistake_id), Status.REVOKED, note=reason)

    def recover_interrupted(self, model: str) -> list[int]:
        """After a restart: mistakes left in `patching` go back to `queued`; returns their ids.

        A mistake in `patching` with a kept patch (impossible with add_patch's single
        transaction, but cheap to guard) is completed to `patched` instead of being re-queued.
        """
        with self._writing() as session:
            stuck = session.scalars(
                select(Mistake)
                .where(Mistake.model == model, Mistake.status == Status.PATCHING)
                .order_by(Mistake.id)
                .with_for_update(key_share=True)
            ).all()
            requeued = []
            for mistake in stuck:
                kept = session.scalar(
                    select(func.count()).where(
                        Patch.mistake_id == mistake.id, Patch.accepted.is_(True), Patch.removed_at.is_(None)
                    )
                )
                if kept:
                    lifecycle.transition(session, mistake, Status.PATCHED, note="recovered: patch was kept")
                else:
                    lifecycle.transition(session, mistake, Status.QUEUED, note="recovered after interruption")
                    requeued.append(mistake.id)
            return requeued

    # -- versions -----------------------------------------------------------------------------

    def add_version(
        self,
        model: str,
        number: int,
        parent: int | None,
        manifest_sha256: str,
        edit_ids: Sequence[int],
        uri: str | None = None,
        patch_ids: Sequence[int] = (),
    ) -> VersionRecord:
        """Record a published version; a number already used for `model` raises IntegrityError.
        `patch_ids`: its patches; those never published before get it as their first version."""
        with self._writing() as session:
            for start in range(0, len(patch_ids), ID_CHUNK):
                session.execute(
                    update(Patch)
                    .where(Patch.id.in_(list(patch_ids[start : start + ID_CHUNK])), Patch.first_version.is_(None))
                    .values(first_version=number)
                )
            version = Version(
                model=model,
                number=number,
                parent=parent,
                created_at=_now(),
                manifest_sha256=manifest_sha256,
                edit_ids=list(edit_ids),
                uri=uri,
            )
            session.add(version)
            session.flush()
            return _as(VersionRecord, version, edit_ids=tuple(version.edit_ids))

    def latest_version(self, model: str) -> VersionRecord | None:
        with self._reading() as session:
            version = session.scalars(
                select(Version).where(Version.model == model).order_by(Version.number.desc()).limit(1)
            ).first()
            return None if version is None else _as(VersionRecord, version, edit_ids=tuple(version.edit_ids))

    def versions(self, model: str) -> list[VersionRecord]:
        with self._reading() as session:
            rows = session.scalars(select(Version).where(Version.model == model).order_by(Version.number))
            return [_as(VersionRecord, v, edit_ids=tuple(v.edit_ids)) for v in rows]

    def table_counts(self) -> dict[str, int]:
        """Rows per table (tests, `patchd status`)."""
        with self._reading() as session:
            return {
                name: int(session.scalar(select(func.count()).select_from(table)) or 0)
                for name, table in Base.metadata.tables.items()
            }

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _mistake(session: Session, mistake_id: int) -> Mistake:
        mistake = session.get(Mistake, mistake_id, with_for_update={"key_share": True})
        if mistake is None:
            raise NotFound(f"no mistake with id {mistake_id}")
        return mistake

    @staticmethod
    def _record(session: Session, mistake: Mistake) -> MistakeRecord:
        targets = policy.targets_of(session, [mistake.id]).get(mistake.id, {})
        equivalents = policy.equivalents_of(session, mistake.id, mistake.target)
        return _as(
            MistakeRecord,
            mistake,
            targets=targets,
            equivalents=equivalents,
            status=Status(mistake.status),
            input=policy.input_of(session, mistake),
        )


def _now() -> datetime:
    return datetime.now(UTC)


def _as(record_type: type[R], row: object, **computed: Any) -> R:
    """Copy a row's columns into the frozen record with the same field names (plus computed ones)."""
    names = [f.name for f in fields(record_type) if f.name not in computed]  # type: ignore[arg-type]
    return record_type(**{name: getattr(row, name) for name in names}, **computed)
