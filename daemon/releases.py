"""Release events (DESIGN §4): one JSON event per published version on `<topic>.releases`, keyed by model.

    {"model", "version", "parent", "patches", "neurons", "added", "removed", "uri",
     "manifest_sha256", "published_at"}

Downstream services may listen (patching.client.CheckpointWatcher with KafkaReleases) to pick a
version up at once; LATEST stays the source of truth, so an event lost or sent twice costs only
a poll interval. The publisher sends after LATEST names the version and retries with its next
publish when the broker is away: releases are at least once.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from daemon.logs import get_logger

if TYPE_CHECKING:
    from daemon.settings import KafkaSettings

log = get_logger(__name__)

# a release event not acknowledged by then is retried with the next publish (readers poll LATEST anyway)
RELEASE_TIMEOUT_S = 10.0


class ReleaseSender:
    """Release events (DESIGN §4) on `<topic>.releases`, keyed by model; one producer, made on first use."""

    def __init__(self, kafka: KafkaSettings):
        self.kafka = kafka
        self.topic = kafka.releases_topic
        self._producer: Any = None

    def send(self, event: dict[str, Any]) -> None:
        from kafka import KafkaProducer

        if self._producer is None:
            self._producer = KafkaProducer(
                acks="all", max_block_ms=int(RELEASE_TIMEOUT_S * 1000), **self.kafka.client_config()
            )
        future = self._producer.send(self.topic, key=str(event["model"]).encode(), value=json.dumps(event).encode())
        future.get(timeout=RELEASE_TIMEOUT_S)

    def close(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except Exception as exc:  # noqa: BLE001 - closing must not hide why we stop
                log.warning("release producer close failed", error=repr(exc))
            self._producer = None


def release_event(manifest: dict[str, Any], manifest_sha256: str, uri: str, published_at: float) -> dict[str, Any]:
    """The release event of DESIGN §4."""
    return {
        "model": manifest["model"],
        "version": manifest["version"],
        "parent": manifest.get("parent"),
        "patches": manifest.get("patches", len(manifest.get("patch_ids", []))),
        "neurons": manifest.get("neurons"),
        "added": manifest.get("added", []),
        "removed": manifest.get("removed", []),
        "uri": uri,
        "manifest_sha256": manifest_sha256,
        "published_at": datetime.fromtimestamp(published_at, UTC).isoformat(),
    }
