"""The Kafka side of the daemon: poll a batch, store it, dead-letter the bad events, then commit.

One thread owns the consumer (kafka-python's poll is not thread-safe). Each step:

    poll a batch -> decode every record (daemon/messages.py)
      invalid -> produced to "<topic>.dlq" (original key and bytes; headers: reason, detail,
                 source topic / partition / offset) and stored as rejected rows
      valid   -> Store.record_batch: ONE transaction (event ids make redelivery a no-op)
    wait for the DLQ sends -> commit "last offset + 1" per partition

Delivery is at-least-once and the store makes it exactly-once in effect: a crash anywhere before
the commit redelivers the batch, whose reports are then counted as duplicates, never twice.
A batch that cannot be finished (database busy, broker gone while dead-lettering) is rewound
(seek to its first offsets) and polled again. A commit that fails (broker restart, rebalance) is
kept and retried with the next one; offsets are cumulative, so a later commit covers it.

Backpressure: while more than `kafka.max_pending` mistakes wait for the worker, every assigned
partition is paused and poll() keeps running (group membership holds); they resume below it.

A record batch the client cannot decode stops its partition only (daemon/quarantine.py): the
others go on, and an operator decides with `patchd kafka skip|retry`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata
from sqlalchemy.exc import OperationalError

from daemon import kafka_client
from daemon.logs import get_logger
from daemon.messages import Limits, Skipped, decode_event
from daemon.quarantine import Quarantine, undecodable
from daemon.settings import Settings
from memory.records import RateLimit, RejectedIn, ReportIn
from memory.store import Store

log = get_logger(__name__)
kafka_client.install()  # an undecodable batch raises on every poll instead of hanging poll() forever

# poll wait: short enough that a stop request or a backpressure change is seen within half a second
POLL_TIMEOUT_MS = 500
# a DLQ send that is not acknowledged by then is treated as failed and the batch is rewound
DLQ_TIMEOUT_S = 30.0
# a commit that takes longer is retried later (a broker restart takes ~10 s; poll must go on)
COMMIT_TIMEOUT_MS = 10_000
# end-offset / position lookups for the catch-up check: small, it runs when polls come back empty
LOOKUP_TIMEOUT_MS = 5_000
# pause before re-polling a rewound batch or re-creating the clients: lets a restarting broker come back
RETRY_BACKOFF_S = 1.0
# how long a warm stop waits for the final commit before giving up (the store has everything)
CLOSE_TIMEOUT_MS = 10_000
# consumer lag (end offsets vs positions) is looked up this often: one broker round trip, for metrics
LAG_INTERVAL_S = 15.0
# retriable batch failures: the broker (DLQ ack) or the database (write lock timeout) was unavailable
RETRIABLE = (KafkaError, OperationalError)
# a dead letter carries at most this much of the original value: a record that decompresses to
# megabytes must still fit the producer's max_request_size (1 MiB), or the DLQ send fails on every
# retry and the partition never moves. The whole value stays in the `rejected` table; the DLQ
# record says how long it was and its sha256.
DLQ_MAX_VALUE_BYTES = 512 * 1024


@dataclass
class IngestStats:
    batches: int = 0
    records: int = 0
    new_reports: int = 0
    duplicates: int = 0
    rejected: int = 0
    rewinds: int = 0
    commit_failures: int = 0
    pauses: int = 0
    max_backlog: int = 0
    last_poll_at: float = field(default_factory=time.time)
    # reason -> count; a plain dict, since dataclasses.asdict would turn a Counter's items into keys
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    # events left to another daemon on a shared topic (daemon/messages.py Skip), by reason
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    assigned: int = 0  # partitions assigned after the last poll (readiness)
    lag: int | None = None  # records not yet consumed on the assigned partitions (None: unknown yet)
    # the last end-offsets lookup answered. kafka-python keeps the assignment while the broker is
    # away and poll() just comes back empty, so this is what tells readiness the broker is gone
    broker_reachable: bool = True


class Consumer:
    """Owns a KafkaConsumer and the DLQ producer; `step()` is one poll -> store -> commit round."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        labels: Sequence[str] | None,
        *,
        on_stored: Callable[[], None] = lambda: None,
        stop: threading.Event | None = None,
    ):
        self.settings = settings
        self.kafka = settings.kafka
        self.store = store
        self.model = settings.model.name
        self.labels = labels
        self.limits = Limits.from_policy(settings.policy)
        self.known_models = frozenset(settings.kafka.known_models)
        policy = settings.policy
        self.rate_limit = RateLimit(policy.reporter_rate_limit, policy.reporter_rate_window_s)
        self.on_stored = on_stored  # wakes the worker when a batch brought new reports
        self.stop = stop or threading.Event()
        self.stats = IngestStats()
        self.caught_up = threading.Event()  # set once every assigned partition was read to its end
        # the worker starts once the backlog already in Kafka is stored (so quorum and conflicts see
        # every report of it), or as soon as backpressure pauses us (the queue is full: work on it)
        self.work_allowed = threading.Event()
        self.paused = False
        self._pending: dict[TopicPartition, OffsetAndMetadata] = {}  # processed, not yet committed
        self._lag_at = 0.0  # when the lag was last looked up
        # each partition's end offset when first looked at: the backlog the worker waits for (caught_up)
        self._backlog_end: dict[TopicPartition, int] = {}
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.quarantine = Quarantine(store, self.model, dead_letter=self._send_dead_letter, commit=self._commit,
                                     stop=self.stop)  # fmt: skip

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> bool:
        """Create the clients, retrying while the broker is unreachable; False if stopped first."""
        attempt = 0
        while not self.stop.is_set():
            try:
                common = self.kafka.client_config()
                self.consumer = KafkaConsumer(
                    self.kafka.topic,
                    group_id=self.kafka.group_id,
                    enable_auto_commit=False,  # offsets are committed only after the store has the batch
                    auto_offset_reset="earliest",  # a new group reads the whole topic: no report is skipped
                    max_poll_records=self.kafka.poll_max_records,
                    **common,
                )
                # acks=all + idempotence (kafka-python 3 defaults): a dead letter is never lost or doubled
                self.producer = KafkaProducer(acks="all", linger_ms=5, **common)
                log.info(
                    "kafka connected",
                    topic=self.kafka.topic,
                    group=self.kafka.group_id,
                    dlq=self.kafka.dlq_topic,
                )
                return True
            except KafkaError as exc:
                attempt += 1
                self.close()
                log.warning("kafka unavailable, retrying", error=repr(exc), attempt=attempt)
                self.stop.wait(min(RETRY_BACKOFF_S * attempt, 10.0))
        return False

    def close(self) -> None:
        """Final commit of anything pending, then close both clients (no autocommit: it is ours)."""
        if self.consumer is not None:
            if self._pending:
                self._commit({}, timeout_ms=CLOSE_TIMEOUT_MS)
            try:
                self.consumer.close(autocommit=False)
            except Exception as exc:  # noqa: BLE001 - closing must not hide the reason we are stopping
                log.warning("consumer close failed", error=repr(exc))
            self.consumer = None
        if self.producer is not None:
            try:
                self.producer.close(timeout=5)
            except Exception as exc:  # noqa: BLE001
                log.warning("producer close failed", error=repr(exc))
            self.producer = None

    # ------------------------------------------------------------------ one round

    def step(self, timeout_ms: int = POLL_TIMEOUT_MS) -> int:
        """One poll -> store -> commit round; returns how many records it handled."""
        assert self.consumer is not None, "connect() first"
        self._backpressure()
        self.quarantine.tick(self.consumer, self.paused)
        if self._pending:
            self._commit({})
        try:
            records = self.consumer.poll(timeout_ms=timeout_ms)
        except Exception as exc:
            if not undecodable(exc):
                raise
            self.quarantine.isolate(self.consumer, exc, self.paused)
            return 0
        self.stats.last_poll_at = time.time()
        self.stats.assigned = len(self.consumer.assignment())
        # every round while the broker does not answer: readiness comes back as soon as it does
        if time.monotonic() - self._lag_at > (LAG_INTERVAL_S if self.stats.broker_reachable else 0.0):
            self._refresh_lag()
        if not records:
            if not self.paused:
                self._check_caught_up()
            return 0
        count = sum(len(batch) for batch in records.values())
        try:
            self._handle(records)
        except RETRIABLE as exc:
            self.stats.rewinds += 1
            log.warning("batch not finished, rewinding to retry it", error=repr(exc), records=count)
            self._rewind(records)
            self.stop.wait(RETRY_BACKOFF_S)
            return count
        if not self.caught_up.is_set():
            # a steady stream (a record within every poll's wait) never leaves a poll empty: without
            # this the worker of a daemon restarted under such a stream would wait for a lull forever
            self._check_caught_up(streaming=True)
        return count

    def drained(self) -> bool:
        """Everything up to the end of every assigned partition is stored and committed."""
        return self.caught_up.is_set() and not self._pending and not self.paused and self._at_end()

    def _handle(self, records: dict[TopicPartition, list[Any]]) -> None:
        reports: list[ReportIn] = []
        rejected: list[RejectedIn] = []
        skipped: dict[str, int] = {}
        futures = []
        for tp, batch in records.items():
            for record in batch:
                item = decode_event(
                    record.value,
                    topic=tp.topic,
                    partition=tp.partition,
                    offset=record.offset,
                    model=self.model,
                    labels=self.labels,
                    limits=self.limits,
                    known_models=self.known_models,
                )
                if isinstance(item, ReportIn):
                    reports.append(item)
                elif isinstance(item, Skipped):
                    skipped[item.reason] = skipped.get(item.reason, 0) + 1
                else:
                    rejected.append(item)
                    futures.append(self._dead_letter(record, item))
        if rejected:
            self.store.record_rejected(rejected)
        result = self.store.record_batch(reports, self.rate_limit)
        # the record keys, looked up only for a batch with rate-limited reports (the rare case)
        keys = {(tp.partition, r.offset): r.key for tp, b in records.items() for r in b} if result.rate_limited else {}
        for item in result.rate_limited:  # stored as rejected with the batch; dead-lettered here
            rejected.append(item)
            futures.append(self._send_dead_letter(item, [], key=keys.get((item.partition, item.offset))))
        for future in futures:  # every dead letter acknowledged before the source offset is committed
            future.get(timeout=DLQ_TIMEOUT_S)
        self._commit({tp: OffsetAndMetadata(batch[-1].offset + 1, "", -1) for tp, batch in records.items()})
        for tp, batch in records.items():
            self.quarantine.read_past(tp, batch[-1].offset + 1)

        s = self.stats
        s.batches += 1
        s.records += sum(len(b) for b in records.values())
        s.new_reports += result.new_reports
        s.duplicates += result.duplicates
        s.rejected += len(rejected)
        for item in rejected:
            s.rejected_by_reason[item.reason] = s.rejected_by_reason.get(item.reason, 0) + 1
        for reason, count in skipped.items():
            s.skipped_by_reason[reason] = s.skipped_by_reason.get(reason, 0) + count
        log.info(
            "batch stored",
            records=len(reports) + len(rejected),
            skipped=sum(skipped.values()),
            new=result.new_reports,
            duplicates=result.duplicates,
            rejected=len(rejected),
            mistakes_new=result.mistakes_created,
        )
        if result.new_reports:
            self.on_stored()

    def _dead_letter(self, record: Any, item: RejectedIn) -> Any:
        return self._send_dead_letter(item, [], key=record.key)

    def _send_dead_letter(self, item: RejectedIn, extra: list[tuple[str, bytes]], key: bytes | None = None) -> Any:
        """Send one dead letter (the original value, cut to DLQ_MAX_VALUE_BYTES); its future."""
        assert self.producer is not None
        value = item.raw
        headers = [
            ("reason", item.reason.encode()),
            ("detail", item.detail.encode("utf-8", "replace")[:1000]),
            ("source_topic", item.topic.encode()),
            ("source_partition", str(item.partition).encode()),
            ("source_offset", str(item.offset).encode()),
            *extra,
        ]
        if len(value) > DLQ_MAX_VALUE_BYTES:
            headers += [
                ("truncated_from_bytes", str(len(value)).encode()),
                ("sha256", hashlib.sha256(value).hexdigest().encode()),
            ]
            value = value[:DLQ_MAX_VALUE_BYTES]
        log.info(
            "dead-lettered",
            reason=item.reason,
            partition=item.partition,
            offset=item.offset,
            detail=item.detail[:200],
        )
        return self.producer.send(self.kafka.dlq_topic, value=value, key=key, headers=headers)

    # ------------------------------------------------------------------ offsets

    def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata], timeout_ms: int = COMMIT_TIMEOUT_MS) -> bool:
        """Commit `offsets` plus any earlier ones that failed; on failure keep them for the next try."""
        assert self.consumer is not None
        self._pending.update(offsets)
        try:
            self.consumer.commit(dict(self._pending), timeout_ms=timeout_ms)
        except CommitFailedError as exc:
            # the group rebalanced: the partitions' new owner re-reads from the last commit, and the
            # store turns those redeliveries into duplicates; our stale offsets are useless now
            self.stats.commit_failures += 1
            log.warning("commit refused after a rebalance; the batch will be redelivered", error=repr(exc))
            self._pending.clear()
            return False
        except KafkaError as exc:
            self.stats.commit_failures += 1
            log.warning("commit failed, will retry", error=repr(exc), partitions=len(self._pending))
            return False
        self._pending.clear()
        return True

    def _rewind(self, records: dict[TopicPartition, list[Any]]) -> None:
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        for tp, batch in records.items():
            if tp in assigned:  # a partition taken away by a rebalance is its new owner's to re-read
                self.consumer.seek(tp, batch[0].offset)

    def _end_offsets(self) -> dict[TopicPartition, tuple[int, int]] | None:
        """(position, end offset) per assigned partition; None while unknown (rebalance, broker down)."""
        assert self.consumer is not None
        assigned = list(self.consumer.assignment())
        if not assigned:
            return None
        try:
            ends = self.consumer.end_offsets(assigned, timeout_ms=LOOKUP_TIMEOUT_MS)
            found = {tp: (self.consumer.position(tp, timeout_ms=LOOKUP_TIMEOUT_MS), ends[tp]) for tp in assigned}
        except (KafkaError, KeyError) as exc:
            if isinstance(exc, KafkaError) and self.stats.broker_reachable:
                log.warning("the broker does not answer; not ready until it does", error=repr(exc))
                self.stats.broker_reachable = False
            log.debug("end offsets unavailable", error=repr(exc))
            return None
        if not self.stats.broker_reachable:
            log.info("the broker answers again")
            self.stats.broker_reachable = True
        return found

    def _refresh_lag(self) -> None:
        self._lag_at = time.monotonic()
        offsets = self._end_offsets()
        if offsets is not None and all(pos is not None for pos, _ in offsets.values()):
            self.stats.lag = sum(max(0, end - pos) for pos, end in offsets.values())

    def _at_end(self) -> bool:
        """Every flowing partition read to its end (a stuck one waits for an operator, not for us)."""
        offsets = self._end_offsets()
        return offsets is not None and all(
            pos is not None and pos >= end for tp, (pos, end) in offsets.items() if tp not in self.quarantine.stuck
        )

    def _past_backlog(self) -> bool:
        """Every flowing partition read past the end it had when first looked at: the backlog that was
        in Kafka at start is stored, however fast new records keep moving the end. The ends are looked
        up once (at the first batch); after that this costs no broker round trip."""
        assert self.consumer is not None
        flowing = [tp for tp in self.consumer.assignment() if tp not in self.quarantine.stuck]
        if not flowing:
            return False
        try:
            unknown = [tp for tp in flowing if tp not in self._backlog_end]
            if unknown:
                self._backlog_end.update(self.consumer.end_offsets(unknown, timeout_ms=LOOKUP_TIMEOUT_MS))
            return all(
                self.consumer.position(tp, timeout_ms=LOOKUP_TIMEOUT_MS) >= self._backlog_end[tp] for tp in flowing
            )
        except (KafkaError, KeyError) as exc:
            log.debug("backlog end unavailable", error=repr(exc))
            return False

    def _check_caught_up(self, streaming: bool = False) -> None:
        """The worker may start: at an empty poll when every partition is read to its end, after a
        batch (`streaming`) when every partition is read past the backlog it had at start."""
        if self.caught_up.is_set():
            return
        if self._past_backlog() if streaming else self._at_end():
            self.caught_up.set()
            self.work_allowed.set()
            log.info("caught up with the topic", partitions=len(self.consumer.assignment()) if self.consumer else 0)

    # ------------------------------------------------------------------ backpressure

    def _backpressure(self) -> None:
        assert self.consumer is not None
        pending = self.store.backlog(self.model, self.settings.policy.quorum)
        self.stats.max_backlog = max(self.stats.max_backlog, pending)
        assigned = self.consumer.assignment()
        if pending >= self.kafka.max_pending:
            if not self.paused:
                self.stats.pauses += 1
                log.info("backpressure: pausing consumption", backlog=pending, bound=self.kafka.max_pending)
            self.paused = True
            self.work_allowed.set()
            # every step, not once: a rebalance may have assigned partitions that are not paused yet
            unpaused = assigned - self.consumer.paused()
            if unpaused:
                self.consumer.pause(*unpaused)
        elif self.paused:
            self.paused = False
            self.quarantine.resume(self.consumer, backpressure=False)  # stuck partitions stay paused
            log.info("backpressure: resuming consumption", backlog=pending, bound=self.kafka.max_pending)
