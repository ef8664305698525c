"""`patchd bench chaos` on the tiny base: every fault really happens, every recovery is measured,
nothing is lost, and the final model equals an uninterrupted run (the long run is the CLI's).

Real services only: the bench starts its own Kafka broker (broker.sh), PostgreSQL (initdb) and, as
root, a tmpfs; `patchd run` and the downstream watcher are child processes. The chaos run takes
about five minutes here, most of it the two SIGKILLs: a restarted daemon gets its partition back
only when the killed one's Kafka session expires (kafka-python's session_timeout_ms, 45 s).
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text

from daemon.tools.bench_chaos import Claim, Options, build_stream, compare_uninterrupted, ok_of, run_chaos
from daemon.tools.pgserver import PostgresServer
from tests.tinybase import LABELS, MISTAKE_WORDS, prepare, sentence, write_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny base, its memory and held-out inputs, and claims.jsonl: 100 claims, random targets."""
    base, data = prepare(tmp_path_factory.mktemp("tiny"))
    rng = random.Random(5)
    claims = [{"input": sentence(rng, i), "target": rng.choice(LABELS)} for i in MISTAKE_WORDS]
    (data / "claims.jsonl").write_text("".join(json.dumps(c) + "\n" for c in claims))
    return base, data


def test_the_stream_holds_each_claim_its_recurrences_after_it_and_malformed_events() -> None:
    claims = [Claim(f"w{i} w300 w301", LABELS[i % 2]) for i in range(20)]
    planned = build_stream("tiny", claims, LABELS, seed=3, run="r", malformed_each=2)
    events = [json.loads(p.value) if p.kind != "malformed" or p.reason != "bad_json" else None for p in planned]
    firsts = [i for i, p in enumerate(planned) if p.kind == "first"]
    assert len(firsts) == 20 and len({p.event_id for p in planned if p.event_id}) == len(planned) - 8
    for i, p in enumerate(planned):
        if p.kind == "recurring":  # after the first report of its claim, same target, another reporter
            first = planned.index(next(q for q in planned if q.event_id == p.event_id.split("-again")[0]))
            assert first < i
            assert events[i]["target"] == events[first]["target"] and events[i]["reporter"] != events[first]["reporter"]
            assert events[i]["input"].split() == events[first]["input"].split()
    assert sum(p.kind == "recurring" for p in planned) == 7  # claims 0, 4, ..., 16: one or two more each
    assert Counter(p.reason for p in planned if p.kind == "malformed") == {
        "bad_json": 2,
        "missing_field": 2,
        "wrong_type": 2,
        "unknown_label": 2,
    }


def test_postgres_restart_keeps_the_data_directory_and_port() -> None:
    server = PostgresServer(durable=False)
    server.start()
    try:
        port, url = server.port, server.url
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x int)"))
            conn.execute(text("INSERT INTO t VALUES (7)"))
        server.restart("fast")
        assert server.port == port and server.url == url
        engine.dispose()  # the pool's sessions ended with the restart
        with engine.begin() as conn:
            assert conn.scalar(text("SELECT x FROM t")) == 7
        engine.dispose()
    finally:
        server.stop()


def test_the_uninterrupted_rerun_catches_a_neuron_that_differs(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from daemon.model import PatchedModel
    from daemon.settings import load_settings
    from daemon.worker import Worker
    from memory.fingerprint import fingerprint, input_key, normalise_input
    from memory.records import ReportIn
    from memory.store import Store
    from patching import patchfile

    base, data = tiny
    config = write_config(
        tmp_path / "patchd.toml", base=base, data=data, bootstrap="127.0.0.1:1", topic="t", state=tmp_path / "state"
    )
    settings = load_settings(config, {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the bench's daemon runs, and its re-run
    try:
        model = PatchedModel.load(settings)
        model.snapshot_path = None
        done = threading.Event()
        done.set()
        assert settings.database.url is not None
        with Store.open(settings.database.url) as store:
            rng = random.Random(9)
            worker = Worker(store, model, settings.policy, work_allowed=done, ingest_done=done)
            for i in MISTAKE_WORDS[:12]:
                claim = sentence(rng, i)
                key = input_key(normalise_input(claim))
                target = rng.choice(LABELS)
                report = ReportIn(f"e{i}", "tiny", fingerprint("tiny", claim), key, target, b"{}", "t", 0, i,
                                  reporter=f"u{i}", input=claim)  # fmt: skip
                store.record_batch([report])
                mistake = store.next_mistake("tiny", claim=True)
                assert mistake is not None
                worker.process(mistake)
            assert worker.stats.outcomes["patched"] >= 2
            same = compare_uninterrupted(settings, store)
            assert same["equal"] and same["verdicts"] == 12 and same["compared_neurons"] == same["stored_neurons"] > 0

            # one bit of one kept neuron flipped in the store: the re-run must name that mistake
            victim = store.accepted_patches("tiny")[1]
            nr = patchfile.decode(victim.neurons, edit_id=str(victim.mistake_id))
            keys = nr.keys.clone()
            keys.view(torch.int32)[0, 0] ^= 1
            tampered = patchfile.encode(keys, nr.biases, nr.values, nr.edit_ids)
        engine = create_engine(settings.database.url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE patches SET neurons = :n WHERE id = :id"), {"n": tampered, "id": victim.id})
        engine.dispose()
        with Store.open(settings.database.url) as store:
            differs = compare_uninterrupted(settings, store)
    finally:
        torch.set_num_threads(threads)
    assert not differs["equal"] and not differs["neurons_equal"] and differs["verdicts_equal"]
    assert differs["mismatches"] == [{"mistake_id": victim.mistake_id, "neurons": "differ"}]


def test_chaos_run_on_the_tiny_base(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = tiny
    report_path = tmp_path / "chaos.json"
    report = run_chaos(
        Options(
            base=str(base),
            data=data,
            minutes=0.1,
            min_kills=2,
            broker_down_s=8.0,
            kill_every_s=(5.0, 10.0),
            malformed_each=2,
            seed=1,
            json_path=report_path,
            work=tmp_path / "work",
        )
    )
    assert json.loads(report_path.read_text())["totals"] == report["totals"]
    faults = {f["name"].split(" ")[0]: f for f in report["faults"]}
    assert list(faults) == ["broker", "PostgreSQL", "storage", "daemon", "downstream"]
    t = report["totals"]
    summary = {k: t[k] for k in ("lost", "duplicates", "left_open", "latest_failures", "final_exit")}
    assert summary == {"lost": 0, "duplicates": 0, "left_open": 0, "latest_failures": 0, "final_exit": 0}, report

    # every fault happened, bit, and was recovered from with nothing lost
    for fault in report["faults"]:
        assert fault["run"] is False or (fault["recovery_s"] is not None and fault["lost"] == 0), fault
        # and the worker at work again: its queue emptied (a restarted daemon once stored but never patched)
        assert fault["run"] is False or fault["backlog_cleared_s"] is not None, fault
    assert faults["broker"]["peak_lag"] > 0  # events waited while the broker was away
    assert len(faults["daemon"]["kills"]) >= 2
    assert all(k["last_line"] and k["recovery_s"] is not None for k in faults["daemon"]["kills"])
    killed = [e for e in t["daemon_exits"] if e["killed_by_bench"]]
    assert len(killed) == len(faults["daemon"]["kills"]) and all(e["code"] == -9 for e in killed)
    storage = faults["storage"]
    if os.geteuid() == 0:  # the tmpfs needs root; without it the fault says why it did not run
        assert storage["run"], storage["notes"]
    if storage["run"]:
        assert "ENOSPC" in storage["notes"] or "No space" in str(storage["publish_error"])
        assert storage["daemon_alive_while_full"] and storage["latest_unchanged_and_verified"]
        assert storage["next_version"] > storage["latest_while_full"]
    else:
        assert "not run" in storage["notes"]
    assert faults["downstream"]["recovery_s"] is not None

    # the stream: every valid event stored once, every malformed one dead-lettered and rejected once
    assert t["produced"] == report["config"]["events"] == t["valid"] + t["malformed"]
    assert t["stored"] == t["valid"] and t["stored_not_sent"] == 0 and t["malformed"] == 8
    assert t["dead_letters_as_expected"] and t["rejected_as_expected"] and t["dead_lettered"] == 8
    assert t["mistakes"] == t["distinct_claims_sent"] == 100 and t["duplicate_neurons"] == 0
    # the model: the re-run in the same order gives the same verdicts and the same neuron bytes
    assert t["neurons_equal_to_uninterrupted"] and t["uninterrupted"]["verdicts"] == 100
    assert t["uninterrupted"]["compared_neurons"] == t["neurons"] == t["patches_kept"] > 0
    assert t["published"]["equal"] and t["published"]["neurons"] == t["neurons"]
    assert t["latest_checks"] > 50 and t["watcher"]["loads"] > 0 and t["watcher"]["processes"] == 2
    assert ok_of(report) and report["ok"]
