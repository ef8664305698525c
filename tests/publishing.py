"""Helpers for the publishing tests: synthetic accepted patches in a store, and a crash-test publisher.

`add_patches(store, n, hidden)` stores n accepted one-neuron patches of random weights (what the
worker would store), without a model: publishing only moves bytes. `Zygote` is a child process
that imported the publisher once and forks one grandchild per publish, which dies by SIGKILL at the
step named (daemon/publisher.py publish_steps): fork is the cheap
way to get a fresh process per step; the zygote itself has no threads and opened no database.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from daemon.publisher import BaseInfo
from memory.fingerprint import fingerprint
from memory.records import PatchIn, ReportIn
from memory.store import Store
from patching.storage import Storage

MODEL = "tiny"
GATE = {"passed": True, "changed": 0, "regressed": 0, "retention_failed": 0, "heldout_active": 0.0125, "attempts": 1}
_counter = {"n": 0}


def neuron_blob(hidden: int, rng: np.random.Generator, count: int = 1) -> bytes:
    """One patch's neurons as databases written before patchfile kept edit ids in each row (numpy's
    safetensors, no metadata): the publisher must still read them, with the row's mistake as edit."""
    return save(
        {
            "keys": rng.standard_normal((count, hidden)).astype(np.float32),
            "biases": rng.standard_normal(count).astype(np.float32),
            "values": rng.standard_normal((count, hidden)).astype(np.float32),
        }
    )


def add_patches(store: Store, count: int, hidden: int, layer: int = 1, seed: int = 0, model: str = MODEL) -> list[int]:
    """Store `count` accepted patches for new mistakes; returns their mistake ids (the edit ids)."""
    rng = np.random.default_rng(seed)
    reports = []
    for _ in range(count):
        _counter["n"] += 1
        text = f"synthetic input {seed}-{_counter['n']}"
        reports.append(
            ReportIn(
                event_id=f"syn-{seed}-{_counter['n']}",
                model=model,
                fingerprint=fingerprint(model, text),
                input_text=text,
                target="SUPPORTS",
                raw=json.dumps({"input": text}).encode(),
                topic="synthetic",
                partition=0,
                offset=_counter["n"],
            )
        )
    store.record_batch(reports)
    ids = []
    for _ in range(count):
        mistake = store.next_mistake(model, claim=True)
        assert mistake is not None
        row = PatchIn(neuron_blob(hidden, rng), 1, layer, "relu", 3, 0.01, dict(GATE), True)
        store.add_patch(mistake.id, row)
        ids.append(mistake.id)
    return ids


def tiny_info(base_dir: Path) -> BaseInfo:
    """The tiny test base (tests/tinybase.py): BERT, hidden 64, two layers (the last is 1)."""
    from patching.loading import base_identity

    return BaseInfo(base_identity(base_dir), "tiny-base", "bert", 64, 1, "relu")


class Zygote:
    """`python -m tests.publish_child`: one publish per request, each in a fresh forked process."""

    def __init__(self, database_url: str, storage: Storage, info: BaseInfo, model: str = MODEL):
        from tests.media import storage_spec

        spec = json.dumps(
            {"database": database_url, "storage": storage_spec(storage), "model": model, "base": asdict(info)}
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.publish_child", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[1],
        )

    def publish(self, kill_at: str | None) -> int:
        """Publish once, SIGKILLed right after step `kill_at` (None: run to the end); the exit status
        as os.waitstatus_to_exitcode gives it (-9 = killed by SIGKILL)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((kill_at or "-") + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the publish zygote died (exit {self.proc.wait()})")
        return int(json.loads(line)["status"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
