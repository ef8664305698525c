"""A fix for kafka-python 3.0.12's consumer, applied once when daemon/consumer.py is imported.

The bug: when a record batch fails to decode inside poll() (a CRC mismatch, a codec whose library
is missing), kafka-python raises the error once, but keeps the batch's spent record iterator in
the fetcher's in-line slot. `PartitionRecords.take()` then returns no records without draining
it, and `Fetcher.fetched_records()` loops on that slot forever: the next poll() never returns,
and the daemon hangs with the consumer thread at 100 % CPU (seen with a corrupted batch on a
real broker, tests/test_daemon_faults.py). The Java client instead raises the same error on
every poll until the application seeks past it (KAFKA-5211 / KAFKA-5630).

The fix gives kafka-python that behaviour: a `take()` that raises drains its PartitionRecords, so
the next poll fetches the batch again and raises again (daemon/quarantine.py handles that).
Draining loses nothing: the partition's position stays at the failed batch.
"""

from __future__ import annotations

from typing import Any

from kafka.consumer.fetcher import Fetcher

_records: Any = Fetcher.PartitionRecords
_take = _records.take


def _take_or_drain(self: Any, n: int | None = None) -> list[Any]:
    try:
        return list(_take(self, n))
    except Exception:
        self.drain()
        raise


def install() -> None:
    """Idempotent: replace PartitionRecords.take with the draining one."""
    _records.take = _take_or_drain
