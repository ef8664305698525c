"""What `patchd demo` shows at the end: gathered from the store, the DLQ topic, `patchd versions`
and a downstream load_latest, then printed as one summary (the quickstart's transcript)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

# claim column width in the before/after table
CLAIM_CHARS = 64
# a DLQ entry's detail as printed
DETAIL_CHARS = 90
# how long the DLQ topic is read for the dead-lettered events (they were produced before the wait ended)
DLQ_READ_S = 20.0
DONE = ("patched", "already_fixed", "gate_rejected", "failed", "conflicting")


def collect(demo: Any, stream: Any, lb: Any, before: dict[str, Any], others: list[str], out: Any) -> dict[str, Any]:
    """Everything the summary prints, as plain JSON types (also written to <state>/demo.json)."""
    from memory.fingerprint import fingerprint
    from memory.store import Store

    s = demo.settings
    texts = [c.input for c in stream.claims]
    with Store.open(s.database.url, upgrade=False) as store:
        status = store.status_summary(demo.model, s.policy.quorum).as_dict()
        mistakes = [store.find_mistake(demo.model, fingerprint(demo.model, t, s.policy.casefold)) for t in texts]
        versions = store.versions(demo.model)
    after = downstream(demo, lb, texts + others, out)
    n = len(texts)
    rows = []
    for i, (claim, m) in enumerate(zip(stream.claims, mistakes, strict=True)):
        rows.append(
            {
                "claim": claim.input,
                "reported": claim.target,
                "before": before["predictions"][i],
                "after": after["predictions"][i],
                "status": str(m.status) if m else "not stored",
                "reports": m.report_count if m else 0,
                "reporters": m.reporter_count if m else 0,
                "edit_id": m.id if m else None,
            }
        )
    other_changed = sum(a != b for a, b in zip(before["predictions"][n:], after["predictions"][n:], strict=True))
    dlq = read_dlq(demo.bootstrap, s.kafka.dlq_topic, sum(stream.malformed.values()))
    total_mistakes = sum(status["mistakes"].values())
    latest = versions[-1] if versions else None
    result: dict[str, Any] = {
        "model": demo.model,
        "state_dir": str(demo.state_dir),
        "database": s.database.url,
        "checkpoints": str(s.storage.root),
        "bootstrap": demo.bootstrap,
        "topic": s.kafka.topic,
        "events": {
            "sent": len(stream.values),
            "corrections": n,
            "recurring": stream.recurring,
            "resent": stream.resent,
            "malformed": dict(stream.malformed),
        },
        "reports": status["reports"],
        "duplicates_absorbed": status["reports"] - total_mistakes,
        "mistakes": {k: v for k, v in status["mistakes"].items() if v},
        "patches": status["patches"],
        "dead_lettered": status["rejected"],
        "dlq": dlq,
        "versions": len(versions),
        "latest": {"version": latest.number, "edits": len(latest.edit_ids)} if latest else None,
        "served": {"version": after["version"], "edits": len(after["edits"])},
        "versions_table": versions_table(demo.env),
        "rows": rows,
        "fixed": sum(r["after"] == r["reported"] for r in rows),
        "patched": sum(r["status"] == "patched" for r in rows),
        "patched_fixed": sum(r["status"] == "patched" and r["after"] == r["reported"] for r in rows),
        "others": {"claims": len(others), "changed": other_changed},
        "timings": dict(demo.timings),
    }
    result["ok"] = bool(
        result["versions"]
        and result["patched"]
        and result["patched_fixed"] == result["patched"]
        and result["reports"] == stream.valid_reports
        and result["duplicates_absorbed"] == stream.recurring
        and Counter(d["reason"] for d in dlq) == stream.malformed
        and demo.timings.get("daemon_exit_code") == 0
    )
    return result


def read_dlq(bootstrap: str, topic: str, expected: int) -> list[dict[str, Any]]:
    """The dead-lettered events on `topic`: reason, detail and the source offset, one per source record."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    by_source: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + DLQ_READ_S
    try:
        while len(by_source) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for record in batch:
                    h = {k: v.decode("utf-8", "replace") for k, v in record.headers}
                    source = f"{h.get('source_partition')}:{h.get('source_offset')}"
                    by_source[source] = {"reason": h.get("reason"), "detail": h.get("detail"), "source": source}
    finally:
        consumer.close()
    return sorted(by_source.values(), key=lambda d: d["source"])


def versions_table(env: dict[str, str]) -> str:
    """`patchd versions` on the demo's state, as an operator would run it."""
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "versions"], env=env, capture_output=True, text=True, timeout=120
    )
    return done.stdout.rstrip() if done.returncode == 0 else f"(patchd versions failed: {done.stderr.strip()})"


def print_summary(r: dict[str, Any], out: Any) -> None:
    e, line = r["events"], "=" * 100
    bad = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in e["malformed"].items())
    out(line)
    out(
        f"patchd demo: {e['corrections']} real corrections of {r['model']} "
        "through Kafka, the daemon and a downstream client"
    )
    out(line)
    rows = [
        (
            "events sent",
            f"{e['sent']} to topic {r['topic']}: {e['corrections']} corrections, {e['recurring']} "
            f"recurring reports by other users, {e['resent']} re-delivery, {sum(e['malformed'].values())} malformed",
        ),
        ("reports stored", f"{r['reports']} (the re-delivered event was stored once: same event id)"),
        (
            "duplicates absorbed",
            f"{r['duplicates_absorbed']} recurring reports merged into their mistake (no extra neuron)",
        ),
        ("mistakes", f"{sum(r['mistakes'].values())}: " + ", ".join(f"{k} {v}" for k, v in r["mistakes"].items())),
        ("patches kept", f"{r['patches']} neurons in the last FFN layer, each passed the locality gate"),
        ("dead-lettered (DLQ)", f"{len(r['dlq'])} on {r['topic']}.dlq ({bad})"),
        (
            "versions published",
            f"{r['versions']}; LATEST = version {(r['latest'] or {}).get('version', '-')} with "
            f"{(r['latest'] or {}).get('edits', 0)} edits",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        out(f"{key:<{width}}  {value}")
        if key.startswith("dead-lettered"):
            for d in r["dlq"]:
                out(f"{'':<{width}}    {d['reason']:<14} {str(d['detail'])[:DETAIL_CHARS]}")
    out("")
    out("$ patchd versions")
    out(r["versions_table"])
    out("")
    served = r["served"]
    out("before/after on the corrected claims, as a downstream service loads them")
    out(f"(patching.client.load_latest: the plain base before, version {served['version']} after)")
    head = ("#", "reports", "reported", "before", "after", "fixed", "daemon", "claim")
    table = [head]
    for i, row in enumerate(r["rows"], 1):
        claim = row["claim"] if len(row["claim"]) <= CLAIM_CHARS else row["claim"][: CLAIM_CHARS - 3] + "..."
        fixed = "yes" if row["after"] == row["reported"] else "no"
        table.append(
            (str(i), str(row["reports"]), row["reported"], row["before"], row["after"], fixed, row["status"], claim)
        )
    widths = [max(len(t[c]) for t in table) for c in range(len(head))]
    for t in table:
        out(
            "  ".join(
                c.rjust(w) if j < 2 else c.ljust(w) for j, (c, w) in enumerate(zip(t, widths, strict=True))
            ).rstrip()
        )
    not_patched = Counter(row["status"] for row in r["rows"] if row["status"] != "patched")
    why = "; not patched: " + ", ".join(f"{k} {v}" for k, v in not_patched.items()) if not_patched else ""
    out(
        f"fixed: {r['fixed']} of {len(r['rows'])} corrected claims now predicted as reported "
        f"({r['patched_fixed']} of {r['patched']} patched{why})"
    )
    o = r["others"]
    out(f"other claims: {o['changed']} of {o['claims']} unrelated FEVER test claims changed prediction")
    out("")
    t = r["timings"]
    out(
        f"daemon ready in {t.get('daemon_ready_s')}s; every event handled and published {t.get('handled_s')}s after "
        f"the first was sent; demo {r.get('seconds', '-')}s in all; daemon and broker stopped"
    )
    out(f"state:        {r['state_dir']}  (patchd.db, daemon.log, events.jsonl, demo.json)")
    out(f"checkpoints:  {r['checkpoints']}/{r['model']}/versions  (LATEST: {r['checkpoints']}/{r['model']}/LATEST)")
    out(f"look again:   PATCHD_STATE_DIR={r['state_dir']} {_patchd()} status   (or versions, export --out DIR)")
    out(f"result:       {'OK' if r['ok'] else 'NOT OK: see above'}")


def _patchd() -> str:
    """This environment's patchd, relative to the current directory when it is below it."""
    path = Path(sys.executable).parent / "patchd"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def downstream(demo: Any, lb: Any, texts: list[str], out: Any) -> dict[str, Any]:
    """What a downstream service serves now: load_latest on the storage root, and its predictions."""
    from patching.bases.tasks import TaskAdapter
    from patching.client import load_latest

    loaded = load_latest(demo.settings.storage.root, demo.model, lb.directory)
    predictions = TaskAdapter(replace(lb, model=loaded.model)).predict(texts)
    served = "the plain base" if loaded.version is None else f"version {loaded.version} ({len(loaded.edits)} edits)"
    out(f"downstream (patching.client.load_latest): serving {served}")
    return {"version": loaded.version, "edits": list(loaded.edits), "predictions": predictions}
