"""`patchd demo`, the quickstart's core, run non-interactively against the test broker.

The same code path as `./deploy/quickstart.sh` (daemon/tools/demo.py: a producer process, `patchd run` as a
child process on embedded defaults, the downstream client), with the tiny test base instead of
fever-minilm: its corrections are tiny-vocabulary sentences whose reported label is the one the base
does not give, so every correction is a real mistake. Checked here independently of the demo's own
summary: versions were published, the fixed claims are predicted as reported through
patching.client.load_latest, recurring reports were absorbed and malformed events dead-lettered.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from daemon import cli
from daemon.tools.demo import MARKER, DemoError, build_stream, fresh_state_dir, run_demo
from patching.bases.datasets import Example
from tests.tinybase import MODEL, prepare, sentence

CORRECTIONS = 12


def test_demo_end_to_end(tmp_path: Path, kafka_bootstrap: str) -> None:
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter
    from patching.client import load_latest

    base, data = prepare(tmp_path / "tiny")
    lb = load_base(str(base))
    adapter = TaskAdapter(lb)
    rng = random.Random(7)
    texts = [sentence(rng, first) for first in range(CORRECTIONS)]
    flip = {"SUPPORTS": "REFUTES", "REFUTES": "SUPPORTS"}  # the label the base does not give
    claims = [Example(t, flip[p]) for t, p in zip(texts, adapter.predict(texts), strict=True)]
    others = [json.loads(line)["input"] for line in (data / "heldout.jsonl").read_text().splitlines()[:30]]
    env = {
        "PATCHD_DEVICE": "cpu",
        "PATCHD_MODEL_MEMORY_FILE": str(data / "memory.jsonl"),
        "PATCHD_MODEL_HELDOUT_FILE": str(data / "heldout.jsonl"),
        "PATCHD_PUBLISH_INTERVAL_S": "1",
    }
    state = tmp_path / "demo"
    lines: list[str] = []
    result = run_demo(
        CORRECTIONS, state, kafka_bootstrap, base=str(base), model=MODEL, claims=claims, others=others, env=env,
        gap=0.1, out=lines.append,
    )  # fmt: skip
    summary = "\n".join(lines)
    assert result["ok"], summary
    assert "result:       OK" in summary and "$ patchd versions" in summary

    # versions published, and what a downstream service loads now gives the reported labels
    assert result["versions"] >= 1
    served = load_latest(state / "checkpoints", MODEL, base)
    assert served.version == result["latest"]["version"]
    rows = {r["claim"]: r for r in result["rows"]}
    patched = [c for c in claims if rows[c.input]["status"] == "patched"]
    assert len(patched) >= CORRECTIONS // 2, summary
    assert {rows[c.input]["edit_id"] for c in patched} <= set(served.edits)
    predicted = TaskAdapter(replace(lb, model=served.model)).predict([c.input for c in patched])
    assert predicted == [c.target for c in patched]
    assert all(rows[c.input]["before"] != c.target for c in claims)  # each one was a mistake of the base

    # recurring reports absorbed, the re-delivery stored once, malformed events dead-lettered
    stream = build_stream(MODEL, claims)
    assert result["reports"] == CORRECTIONS + stream.recurring
    assert result["duplicates_absorbed"] == stream.recurring > 0
    assert sum(result["mistakes"].values()) == CORRECTIONS
    assert Counter(d["reason"] for d in result["dlq"]) == Counter(
        {"bad_json": 1, "missing_field": 1, "unknown_label": 1, "wrong_type": 1}
    )
    assert result["dead_lettered"] == 4

    # it ended cleanly: warm stop, nothing left running, the state says where things are
    assert result["timings"]["daemon_exit_code"] == 0
    assert not (state / "daemon.pid").exists()
    assert (state / "patchd.db").is_file() and (state / "demo.json").is_file()
    assert (state / "checkpoints" / MODEL / "LATEST").read_text().strip() == str(served.version)


def test_stream_has_recurring_resent_and_malformed_events() -> None:
    claims = [Example(f"claim number {i} is true", "SUPPORTS") for i in range(40)]
    stream = build_stream("m", claims, seed=3, run="r")
    events = [json.loads(v) for v in stream.values if v.startswith(b"{") and v.endswith(b"}")]
    ids = Counter(e["id"] for e in events)
    assert len(stream.values) == 40 + stream.recurring + 1 + 4
    assert stream.recurring == 5 + 2  # claims 0, 8, 16, 24, 32: one or two other users each
    assert [i for i, n in ids.items() if n > 1] == ["demo-r-0"]  # the one re-delivery
    assert sum(stream.malformed.values()) == 4
    first: dict[str, int] = {}
    for n, e in enumerate(events):
        if e["id"].rsplit("-", 1)[1].isdigit():
            first.setdefault(e["input"], n)
    for e in events:
        if "-again" in e["id"]:  # a recurrence comes after the first report of its claim
            assert events.index(e) > first[" ".join(e["input"].split())]
    assert len(first) == 40


def test_state_dir_is_fresh_each_run_and_foreign_dirs_are_refused(tmp_path: Path) -> None:
    state = fresh_state_dir(tmp_path / "demo")
    (state / "patchd.db").write_text("old run")
    again = fresh_state_dir(state)
    assert sorted(p.name for p in again.iterdir()) == [MARKER]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious").write_text("keep")
    with pytest.raises(DemoError, match="not made by `patchd demo`"):
        fresh_state_dir(foreign)
    assert (foreign / "precious").read_text() == "keep"


def test_demo_command_is_registered() -> None:
    args = cli.build_parser().parse_args(["demo", "--corrections", "5", "--bootstrap", "127.0.0.1:1"])
    assert (args.corrections, args.bootstrap, args.state_dir) == (5, "127.0.0.1:1", None)
