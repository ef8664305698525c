"""Partitions the consumer cannot read past, kept out of the way of the others until an operator decides.

kafka-python decodes a record batch inside poll(). A batch it cannot decode (corrupt bytes: a CRC
mismatch; a codec whose library is missing; a batch that holds no complete record) raises out of
every poll() that reaches it, and nothing after it on that partition is ever returned. Before
this module that exception ended the daemon, and a restart met the same batch again: a crash loop
that stopped every partition for one bad batch. Now:

    poll() raises a decoding error
      -> find the partition: each assigned one is polled alone (the others paused) until it yields
         records (fine: its position is put back), raises again (the culprit: a batch that fails
         once but decodes when fetched again stops nothing) or is read to its end
      -> pause it, record the episode in the store (memory/stuck.py: topic, partition, offset,
         error), log it; every other partition goes on
      -> `patchd status`, /readyz (503, naming it) and /metrics show it until an operator runs
         `patchd kafka retry` (read it again: a library was installed) or `patchd kafka skip`
         (give up the undecodable records: the daemon moves past them one offset at a time until
         a record decodes, dead-letters one marker record naming the skipped offsets, commits)

Nothing is skipped without an operator: the records after a stuck offset wait in Kafka.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import RecordTooLargeError
from kafka.errors import CorruptRecordError, KafkaError, UnsupportedCodecError
from kafka.structs import OffsetAndMetadata
from sqlalchemy.exc import OperationalError

from daemon.logs import get_logger
from daemon.messages import Reason
from memory.records import RejectedIn, StuckRecord
from memory.store import Store

log = get_logger(__name__)

# a partition polled alone answers (records, an error, or its end) within this long on a live broker
PROBE_S = 10.0
PROBE_POLL_MS = 200
# how often the daemon looks for an operator's command while a partition is stuck
COMMAND_POLL_S = 2.0
# one skip command gives up at most this many offsets (a record batch holds far fewer); past it the
# partition is stuck again at the next offset and the operator decides again
MAX_SKIP = 100_000
# a skip reports its progress this often in the log
SKIP_LOG_EVERY = 1000


def undecodable(exc: BaseException) -> bool:
    """Is this exception from poll() a record batch that cannot be decoded (as opposed to the
    broker or the group)? The decompression libraries raise their own error types."""
    if isinstance(exc, CorruptRecordError | UnsupportedCodecError | RecordTooLargeError):
        return True
    if isinstance(exc, KafkaError):
        # fetcher.py: "Failed to make progress reading messages": bytes with no complete record
        return "Failed to make progress" in str(exc)
    return isinstance(exc, Exception)


class Quarantine:
    """The stuck partitions of one consumer, and the operator's commands for them.

    Runs in the consumer's thread (kafka-python's consumer is not thread-safe). `dead_letter`
    sends one DLQ record (with extra headers) and returns its future; `commit` commits offsets
    (both daemon/consumer.py's).
    """

    def __init__(
        self,
        store: Store,
        model: str,
        *,
        dead_letter: Callable[[RejectedIn, list[tuple[str, bytes]]], Any],
        commit: Callable[[dict[TopicPartition, OffsetAndMetadata]], bool],
        stop: threading.Event,
    ):
        self.store = store
        self.model = model
        self.dead_letter = dead_letter
        self.commit = commit
        self.stop = stop
        # partition -> its open episode (None until the store has it: the database may be down)
        self.stuck: dict[TopicPartition, StuckRecord | None] = {}
        self._errors: dict[TopicPartition, str] = {}
        self._polled = 0.0
        # open episodes in the store for partitions that read fine in this process (recorded by an
        # earlier run): resolved as soon as a batch past their offset is stored (read_past)
        self._earlier: dict[TopicPartition, StuckRecord] = {}
        self._looked = False  # the store's open episodes were read once since start

    def flowing(self, consumer: KafkaConsumer) -> set[TopicPartition]:
        """Assigned partitions that are not stuck."""
        return set(consumer.assignment()) - set(self.stuck)

    def describe(self) -> list[dict[str, Any]]:
        """For /readyz and /metrics: what is stuck where, in this process."""
        out = []
        for tp, record in sorted(self.stuck.items()):
            out.append({
                "topic": tp.topic,
                "partition": tp.partition,
                "offset": record.offset if record else None,
                "error": self._errors.get(tp, ""),
                "command": record.command if record else None,
            })  # fmt: skip
        return out

    # ------------------------------------------------------------------ detection

    def isolate(self, consumer: KafkaConsumer, exc: BaseException, backpressure: bool) -> None:
        """poll() raised `exc` while decoding: find the partition(s) it came from and stop them."""
        # every suspect is polled again, alone, even when there is one: bytes damaged on the way
        # (TCP's checksum is 16 bits) decode when fetched again, and must not stop the partition
        culprits: dict[TopicPartition, BaseException] = {}
        for tp in sorted(self.flowing(consumer)):
            found = self._probe(consumer, tp)
            if found is not None:
                culprits[tp] = found
        self.resume(consumer, backpressure)
        if not culprits:
            log.warning("a poll failed to decode, but no partition fails alone; polling again", error=repr(exc))
            self.stop.wait(1.0)
            return
        for tp, error in culprits.items():
            self._mark(consumer, tp, error)

    def _mark(self, consumer: KafkaConsumer, tp: TopicPartition, exc: BaseException) -> None:
        consumer.pause(tp)
        offset = consumer.position(tp)
        error = f"{type(exc).__name__}: {exc}"
        self.stuck[tp] = None
        self._errors[tp] = error
        log.error(
            "partition stuck: a record batch cannot be decoded; the other partitions go on",
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            error=error[:300],
            decide=f"patchd kafka retry --partition {tp.partition}  |  "
            f"patchd kafka skip --partition {tp.partition} --offset {offset}",
        )
        self._record(tp, offset)

    def _record(self, tp: TopicPartition, offset: int) -> None:
        try:
            self.stuck[tp] = self.store.record_stuck(self.model, tp.topic, tp.partition, offset, self._errors[tp])
        except Exception as exc:  # noqa: BLE001 - the database may be down: record it at the next round
            log.warning("could not record the stuck partition yet", error=repr(exc), partition=tp.partition)

    def _probe(self, consumer: KafkaConsumer, tp: TopicPartition) -> BaseException | None:
        """Poll `tp` alone until it yields a record (None), raises a decoding error (returned), or
        is read to its end (None). No record is handled: its position is put back afterwards."""
        start = consumer.position(tp)
        others = [p for p in consumer.assignment() if p != tp]
        if others:
            consumer.pause(*others)
        consumer.resume(tp)
        deadline = time.monotonic() + PROBE_S
        try:
            while time.monotonic() < deadline and not self.stop.is_set():
                try:
                    got = consumer.poll(timeout_ms=PROBE_POLL_MS, max_records=1)
                except Exception as exc:
                    if undecodable(exc):
                        return exc
                    raise
                if got.get(tp):
                    return None
                end = consumer.end_offsets([tp], timeout_ms=int(PROBE_S * 1000)).get(tp)
                if end is not None and consumer.position(tp) >= end:
                    return None
            return None
        finally:
            consumer.seek(tp, start)

    def resume(self, consumer: KafkaConsumer, backpressure: bool) -> None:
        """Back to normal after probing: flowing partitions read unless backpressure holds them."""
        stuck = [tp for tp in consumer.assignment() if tp in self.stuck]
        if stuck:
            consumer.pause(*stuck)
        flowing = self.flowing(consumer)
        if backpressure:
            if flowing:
                consumer.pause(*flowing)
        elif flowing:
            consumer.resume(*flowing)

    # ------------------------------------------------------------------ the operator's commands

    def tick(self, consumer: KafkaConsumer, backpressure: bool) -> None:
        """Drop episodes of partitions no longer ours; carry out commands (every COMMAND_POLL_S)."""
        assigned = set(consumer.assignment())
        for tp in [tp for tp in self.stuck if tp not in assigned]:  # a rebalance took it: its new owner decides
            del self.stuck[tp]
        if (self._looked and not self.stuck) or time.monotonic() - self._polled < COMMAND_POLL_S:
            return
        self._polled = time.monotonic()
        for tp, record in list(self.stuck.items()):
            if record is None:
                self._record(tp, consumer.position(tp))
        try:
            open_records = self.store.stuck_partitions(self.model)
        except Exception as exc:  # noqa: BLE001 - commands wait for the database
            log.warning("could not read operator commands", error=repr(exc))
            return
        self._looked = True
        self._earlier = {
            TopicPartition(r.topic, r.partition): r
            for r in open_records
            if TopicPartition(r.topic, r.partition) not in self.stuck
        }
        for record in open_records:
            tp = TopicPartition(record.topic, record.partition)
            if tp in self.stuck and record.command is not None:
                try:
                    self._carry_out(consumer, tp, record, backpressure)
                except (KafkaError, OperationalError) as exc:
                    # the command stays in the store and is carried out again next round: a skip
                    # finds the same records, and the marker's dead letter and row are idempotent
                    log.warning("could not carry out the command yet", command=record.command, error=repr(exc))

    def read_past(self, tp: TopicPartition, next_offset: int) -> None:
        """A batch of `tp` up to `next_offset` - 1 is stored: an earlier run's episode at an offset
        before that is over (a codec library was installed, the broker healed; a retry asked)."""
        record = self._earlier.get(tp)
        if record is None or next_offset <= record.offset:
            return
        asked = f", after {record.command} asked by {record.operator}" if record.command else ""
        resolution = f"read past offset {record.offset}: its records decoded{asked}"
        try:
            self.store.resolve_stuck(record.id, resolution)
        except Exception as exc:  # noqa: BLE001 - resolved at a later batch
            log.warning("could not resolve the stuck partition's record yet", error=repr(exc))
            return
        del self._earlier[tp]
        log.info("stuck partition reads again", topic=tp.topic, partition=tp.partition, resolution=resolution)

    def _carry_out(self, consumer: KafkaConsumer, tp: TopicPartition, record: StuckRecord, backpressure: bool) -> None:
        who = record.operator or "an operator"
        if record.command == "retry":
            consumer.seek(tp, record.offset)
            resolution = f"retried by {who}: reading again from offset {record.offset}"
        else:
            end = self._skip(consumer, tp, record.offset)
            marker = RejectedIn(
                raw=b"",
                reason=str(Reason.UNDECODABLE_BATCH),
                detail=f"offsets {record.offset}..{end - 1} skipped by {who} ({record.reason or 'no reason given'}): "
                f"{record.error}",
                topic=tp.topic,
                partition=tp.partition,
                offset=record.offset,
            )
            self.store.record_rejected([marker])
            self.dead_letter(marker, [("source_last_offset", str(end - 1).encode())]).get(timeout=30)
            self.commit({tp: OffsetAndMetadata(end, "", -1)})
            resolution = f"skipped offsets {record.offset}..{end - 1} ({end - record.offset}) for {who}"
        del self.stuck[tp]
        self._errors.pop(tp, None)
        self.store.resolve_stuck(record.id, resolution)
        self.resume(consumer, backpressure)
        log.warning("stuck partition released", topic=tp.topic, partition=tp.partition, resolution=resolution)

    def _skip(self, consumer: KafkaConsumer, tp: TopicPartition, offset: int) -> int:
        """The first offset after `offset` whose record decodes (or the partition's end)."""
        position = offset + 1
        while position - offset < MAX_SKIP and not self.stop.is_set():
            consumer.seek(tp, position)
            if self._probe(consumer, tp) is None:
                break
            position += 1
            if (position - offset) % SKIP_LOG_EVERY == 0:
                log.info("skipping undecodable records", partition=tp.partition, from_offset=offset, at=position)
        consumer.seek(tp, position)
        return position
