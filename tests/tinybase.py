"""Test helpers for the daemon: a tiny random BERT classifier, a known correction stream, a config.

`tiny_base(dir)` saves a 2-layer BERT (hidden 64) with a word-level tokenizer over w0..w399 as a
local Hugging Face directory with labels SUPPORTS / REFUTES (the pattern of test_evaluate.py).
Every distinct input starts with its own word: a random tiny BERT's position-0 state mostly
reflects its own first token, so shared first words would make mistakes inseparable.

`correction_stream(seed)` builds the issue's 300-event stream with its known answers:
100 distinct mistakes, 150 recurrences (2-5 reporters per mistake), 20 conflicting reports and
30 malformed events (6 each of bad JSON, missing field, unknown label, oversize input, wrong type).
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers as T
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from tokenizers import Tokenizer, models, pre_tokenizers

from memory.fingerprint import fingerprint
from memory.lifecycle import Status
from memory.store import Store

WORDS = [f"w{i}" for i in range(400)]
LABELS = ("SUPPORTS", "REFUTES")
MODEL = "tiny"
# first-word ranges: distinct mistakes, memory M, held-out set (disjoint, see the module docstring)
MISTAKE_WORDS, MEMORY_WORDS, HELDOUT_WORDS = range(0, 100), range(100, 220), range(220, 300)
MALFORMED_REASONS = ("bad_json", "missing_field", "unknown_label", "input_too_long", "wrong_type")


def tiny_base(directory: Path) -> Path:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = T.BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=2,
        max_position_embeddings=32,
        id2label={0: "SUPPORTS", 1: "REFUTES"},
        label2id={"SUPPORTS": 0, "REFUTES": 1},
    )
    out = directory / "tiny-base"
    if not (out / "config.json").exists():
        T.BertForSequenceClassification(cfg).save_pretrained(out)
        fast.save_pretrained(out)
    return out


def sentence(rng: random.Random, first: int) -> str:
    return " ".join([WORDS[first], *rng.choices(WORDS[300:], k=6)])


def write_inputs(path: Path, rng: random.Random, firsts: range) -> Path:
    path.write_text("".join(json.dumps({"input": sentence(rng, i)}) + "\n" for i in firsts))
    return path


@dataclass
class Stream:
    values: list[bytes]  # in production order
    valid_ids: set[str] = field(default_factory=set)
    malformed: Counter[str] = field(default_factory=Counter)  # reason -> count
    inputs: dict[str, str] = field(default_factory=dict)  # normalised input -> winning target
    conflicting: set[str] = field(default_factory=set)  # normalised inputs with a held conflict


def correction_stream(seed: int = 0) -> Stream:
    rng = random.Random(seed)
    events: list[dict | bytes] = []
    stream = Stream(values=[])
    n = 0

    def event(text: str, target: object, reporter: str) -> dict:
        nonlocal n
        n += 1
        return {"id": f"e-{seed}-{n}", "model": MODEL, "input": text, "target": target, "reporter": reporter}

    # 100 distinct mistakes: 80 that recur (2-5 reporters each, 150 recurrences in all), 20 conflicting
    texts = [sentence(rng, i) for i in MISTAKE_WORDS]
    recurring, conflicted = texts[:80], texts[80:]
    extra = [1] * 80  # each recurring mistake has at least 2 reporters
    for _ in range(150 - 80):
        choices = [i for i in range(80) if extra[i] < 4]
        extra[rng.choice(choices)] += 1
    for text, count in zip(recurring, extra, strict=True):
        target = rng.choice(LABELS)
        stream.inputs[text] = target
        events.append(event(text, target, "r0"))
        for k in range(count):  # recurrences: other reporters, sometimes with messier whitespace
            spelled = text.replace(" ", "  ", 1) if k % 2 else f" {text} "
            events.append(event(spelled, target, f"r{k + 1}"))
    for text in conflicted:  # one report each way: 50% is not above the 0.6 share -> conflicting
        events.append(event(text, "SUPPORTS", "r0"))
        events.append(event(text, "REFUTES", "r1"))
        stream.conflicting.add(text)

    # 30 malformed
    for i in range(6):
        events.append(b'{"id": "bad-json-%d", "model": "tiny", "input": "w1 w2' % i)
        stream.malformed["bad_json"] += 1
        events.append({"id": f"missing-{i}", "model": MODEL, "input": sentence(rng, 0)})
        stream.malformed["missing_field"] += 1
        events.append({"id": f"label-{i}", "model": MODEL, "input": sentence(rng, 1), "target": "MAYBE"})
        stream.malformed["unknown_label"] += 1
        events.append({"id": f"long-{i}", "model": MODEL, "input": "w5 " * 2000, "target": "SUPPORTS"})
        stream.malformed["input_too_long"] += 1
        events.append({"id": f"type-{i}", "model": MODEL, "input": sentence(rng, 2), "target": 3})
        stream.malformed["wrong_type"] += 1

    rng.shuffle(events)
    for e in events:
        if isinstance(e, dict):
            stream.values.append(json.dumps(e).encode())
            if not str(e["id"]).startswith(("missing", "label", "long", "type")):
                stream.valid_ids.add(str(e["id"]))
        else:
            stream.values.append(e)
    assert len(stream.values) == 300 and len(stream.valid_ids) == 270
    return stream


def write_config(
    path: Path,
    *,
    base: Path,
    data: Path,
    bootstrap: str,
    topic: str,
    state: Path,
    max_pending: int = 1000,
    poll_max_records: int = 200,
    health_port: int = 0,
    database_url: str | None = None,
    model: str = MODEL,
    group_id: str | None = None,
    known_models: tuple[str, ...] = (),
) -> Path:
    """A daemon config for the tiny base on a test broker, state (SQLite) under `state`.

    `database_url` replaces the SQLite default (a PostgreSQL test database). The health endpoint is
    off unless `health_port` is given: test daemons run side by side.
    """
    database = f'[database]\nurl = "{database_url}"\n' if database_url else ""
    path.write_text(f"""
device = "cpu"
[model]
name = "{model}"
base = "{base}"
memory_file = "{data / "memory.jsonl"}"
heldout_file = "{data / "heldout.jsonl"}"
[kafka]
bootstrap_servers = ["{bootstrap}"]
topic = "{topic}"
group_id = "{group_id or f"g-{topic}"}"
known_models = {list(known_models)!r}
max_pending = {max_pending}
poll_max_records = {poll_max_records}
[state]
dir = "{state}"
[health]
port = {health_port}
[log]
level = "INFO"
{database}""")
    return path


def llama_daemon_config(directory: Path, memory_texts: int, chat_template: str | None = None) -> tuple[Path, Path]:
    """A tiny random Llama (tests/fixtures_models.tiny_llama_dir) under directory/base, question-like
    memory and held-out inputs, and a daemon config for them (no broker reached); returns the
    config and the base directory."""
    from tests.fixtures_models import tiny_llama_dir

    base = tiny_llama_dir(directory / "base", chat_template)
    data = directory / "data"
    data.mkdir()
    memory = [f"what is thing {i}? and how {i}" for i in range(memory_texts)]
    for name, texts in (("memory", memory), ("heldout", ["what?", "and how?", "no"])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"input": t}) + "\n" for t in texts))
    config = write_config(
        directory / "p.toml", base=base, data=data, bootstrap="127.0.0.1:9", topic="t", state=directory / "state"
    )
    return config, base


def prepare(directory: Path) -> tuple[Path, Path]:
    """The tiny base and its memory / held-out JSONL files under `directory` (idempotent)."""
    directory.mkdir(parents=True, exist_ok=True)
    base = tiny_base(directory)
    data = directory / "data"
    data.mkdir(exist_ok=True)
    rng = random.Random(1)
    write_inputs(data / "memory.jsonl", rng, MEMORY_WORDS)
    write_inputs(data / "heldout.jsonl", rng, HELDOUT_WORDS)
    return base, data


# ---------------------------------------------------------------------------- kafka and checks


def produce(bootstrap: str, topic: str, values: list[bytes], keyed: bool = False) -> None:
    """A separate kafka-python producer, as a client application would use.

    keyed=True gives every event its own key, which spreads events over a topic's partitions.
    """
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    try:
        for i, value in enumerate(values):
            producer.send(topic, value=value, key=f"k{i}".encode() if keyed else None)
        producer.flush(timeout=60)
    finally:
        producer.close()


def kcat(
    bootstrap: str,
    topic: str,
    values: list[bytes],
    codec: str = "none",
    partition: int | None = None,
    options: tuple[str, ...] = (),
) -> None:
    """Send records with kcat (librdkafka, a producer no one here wrote), compressed with `codec`.

    Each value goes through a file of its own, which kcat sends as one record whatever its bytes.
    """
    binary = shutil.which("kcat")
    assert binary, "kcat is installed by deploy/system-deps.sh"
    where = ["-p", str(partition)] if partition is not None else []
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, value in enumerate(values):
            files.append(Path(tmp) / f"record-{i}")
            files[-1].write_bytes(value)
        command = [binary, "-P", "-b", bootstrap, "-t", topic, *where, "-z", codec, "-X", "linger.ms=0", *options]
        done = subprocess.run(
            [*command, *map(str, files)],
            capture_output=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr.decode()


def read_topic(bootstrap: str, topic: str, count: int, timeout_s: float = 30.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    records: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


def committed(bootstrap: str, group: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {tp.partition: om.offset for tp, om in admin.list_group_offsets(group)[group].items()}
    finally:
        admin.close()


def assert_final_state(store: Store, stream, dlq: list) -> dict[str, Status]:
    """The checks every daemon test shares; returns input -> final status."""
    counts = store.table_counts()
    assert counts["reports"] == len(stream.valid_ids)
    assert counts["rejected"] == sum(stream.malformed.values())
    reasons = Counter(dict(r.headers)["reason"].decode() for r in dlq_unique(dlq))
    assert reasons == stream.malformed
    status = store.status_counts(MODEL)
    assert status[Status.CONFLICTING] == len(stream.conflicting)
    assert status[Status.QUEUED] == status[Status.PATCHING] == status[Status.FAILED] == 0
    assert status[Status.REPORTED] == 0
    done = status[Status.PATCHED] + status[Status.ALREADY_FIXED] + status[Status.GATE_REJECTED]
    assert done == len(stream.inputs)
    final: dict[str, Status] = {}
    for text in [*stream.inputs, *stream.conflicting]:
        mistake = store.find_mistake(MODEL, fingerprint(MODEL, text))
        assert mistake is not None
        final[text] = mistake.status
        if mistake.status == Status.PATCHED:
            assert len([p for p in store.patches_of(mistake.id) if p.accepted]) == 1  # no duplicate neuron
    return final


def dlq_unique(records: list) -> list:
    """DLQ delivery is at-least-once: one record per source offset."""
    by_source = {}
    for r in records:
        h = dict(r.headers)
        by_source[(h["source_partition"], h["source_offset"])] = r
    return list(by_source.values())


# ---------------------------------------------------------------------------- the daemon as a process


class Daemon:
    """`python -m daemon run ...` as a child process, its JSON log lines collected as they come."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None):
        env = {**os.environ, **(env or {}), "OMP_WAIT_POLICY": "PASSIVE"}  # before torch is imported (2 busy cores)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            cwd=Path(__file__).parents[1],
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        self.log: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"event": line.rstrip()}
            if isinstance(entry, dict):
                self.lines.put(entry)

    def wait_for(self, events: tuple[str, ...], count: int = 1, timeout_s: float = 120.0) -> bool:
        """Block until `count` log lines with one of `events` were seen; False if the process ended first."""
        seen = 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                entry = self.lines.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    return False
                continue
            self.log.append(entry)
            if entry.get("event") in events:
                seen += 1
                if seen >= count:
                    return True
        raise TimeoutError(f"no {count} x {events} within {timeout_s}s")

    def finish(self, timeout_s: float = 120.0) -> int:
        rc = self.proc.wait(timeout=timeout_s)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return rc

    def events(self, name: str) -> list[dict]:
        return [e for e in self.log if e.get("event") == name]


def final_state(store: Store) -> dict[str, tuple[str, bytes | None]]:
    """fingerprint -> (status, the kept neurons' tensor bytes or None): what two runs must agree on.

    The neurons are compared bit for bit; the stored row also names its edit (the mistake id), which
    two runs may number differently, so the tensors are compared, not the rows' bytes."""
    from patching import patchfile

    out = {}
    for mistake in store.mistakes(MODEL):
        kept = [p.neurons for p in store.patches_of(mistake.id) if p.accepted]
        assert len(kept) <= 1, f"mistake {mistake.id} has {len(kept)} kept neurons"
        tensors = None
        if kept:
            nr = patchfile.decode(kept[0], edit_id=str(mistake.id))
            tensors = b"".join(
                t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in (nr.keys, nr.biases, nr.values)
            )
        out[mistake.fingerprint] = (str(mistake.status), tensors)
    return out


def event_ids(store: Store) -> set[str]:
    return store.event_ids(MODEL)


def run_once(config: Path) -> Any:
    """`patchd run --once` in this process (no signal handlers: pytest keeps its own); the Service."""
    from daemon.service import Service
    from daemon.settings import load_settings

    service = Service(load_settings(config, os.environ), once=True, handle_signals=False)
    assert service.run() == 0
    return service
