"""trainer.subject_key in the daemon: subject neurons are stored with their detectors, come back
the same from the engine snapshot and from a replay of the stored patches, and go out as a
patchd-checkpoint/3 version that a downstream service loads into the same model."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from daemon.model import PatchedModel
from daemon.publisher import BaseInfo, Publisher, storage_of
from daemon.settings import load_settings
from daemon.worker import Worker
from memory.store import Store
from patching import patchfile
from patching.client import load_latest
from tests.test_memory_store import report
from tests.tinybase import MODEL, llama_daemon_config

ENV = {
    "PATCHD_TRAINER_SUBJECT_KEY": "true",
    "PATCHD_TRAINER_SUBJECT_FLOOR": "true",
    "PATCHD_TRAINER_SUBJECT_LAYER": "0.25",  # layer 0 of the tiny llama's 2
    # the locator that reads the text (encode.name_pieces through the daemon's own encoding); on the
    # byte-level vocabulary its walk can end on a letter every memory text holds (fit_detector: None)
    "PATCHD_TRAINER_SUBJECT_LOCATOR": "name",
    "PATCHD_STATE_SNAPSHOT_EVERY": "0",  # snapshots only when asked for below
    "PATCHD_POLICY_CONTEXT_PREFIXES": "2",
}
EDITS = [("Where is Zorblat?", "1"), ("Who built Quuxhall?", "2"), ("When did Vexmoor fall?", "3")]


def layer_tensors(model: PatchedModel) -> list[torch.Tensor]:
    w = model.patcher.wrapper
    assert w.det is not None
    return [w.keys, w.biases, w.values, *w.det]


def test_subject_neurons_survive_the_store_a_restart_and_a_published_version(tmp_path: Path) -> None:
    config, base = llama_daemon_config(tmp_path, 60)
    settings = load_settings(config, ENV)  # the daemon takes the subject key now
    model = PatchedModel.load(settings)
    assert model.patcher.subject is not None
    with Store.open(settings.database.url) as store:
        store.record_batch([report(f"ev-{i}", q, t, model=MODEL) for i, (q, t) in enumerate(EDITS)])
        worker = Worker(store, model, settings.policy, work_allowed=threading.Event(), ingest_done=threading.Event())
        for _ in EDITS:
            mistake = store.next_mistake(MODEL)
            assert mistake is not None
            assert worker.process(mistake) == "patched"
        rows = [patchfile.decode(p.neurons) for p in store.accepted_patches(MODEL)]
        assert len(rows) == len(EDITS) and any(r.subject is not None for r in rows)
        assert model.patcher.wrapper.det is not None
        want = layer_tensors(model)

        assert model.save_snapshot()
        restored = PatchedModel.load(settings)  # M and the subject rows from the activation cache now
        got = restored.rebuild(store)
        assert got.restored == len(EDITS) and got.replayed == 0
        assert all(torch.equal(x, y) for x, y in zip(layer_tensors(restored), want, strict=True))

        assert model.snapshot_path is not None
        model.snapshot_path.unlink()
        replayed = PatchedModel.load(settings)
        got = replayed.rebuild(store)
        assert got.replayed == len(EDITS) and got.mismatches == []
        assert all(torch.equal(x, y) for x, y in zip(layer_tensors(replayed), want, strict=True))

        publisher = Publisher(MODEL, store, storage_of(settings), BaseInfo.of_model(model))
        published = publisher.publish_if_changed()
        assert published is not None
    loaded = load_latest(settings.storage.root, MODEL, base)
    assert loaded.version == published.number and loaded.manifest is not None
    assert loaded.manifest["format"] == "patchd-checkpoint/3" and loaded.manifest["config"]["subject_layer"] == 0
    ids = model.base.tokenizer([q for q, _ in EDITS], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(loaded.model(**ids).logits, model.base.model(**ids).logits)


def test_a_store_of_plain_patches_restarts_under_the_default_subject_key(tmp_path: Path) -> None:
    """An operator upgrading to the default subject key: the plain patches an older patchd stored
    replay into the subject model with the same gate verdicts and outputs, and new patches get
    their detectors beside them."""
    config, _ = llama_daemon_config(tmp_path, 60)
    plain_env = {**ENV, "PATCHD_TRAINER_SUBJECT_KEY": "false"}
    auto_env = {k: v for k, v in ENV.items() if k != "PATCHD_TRAINER_SUBJECT_KEY"}  # unset: the default
    plain = PatchedModel.load(load_settings(config, plain_env))
    assert plain.patcher.subject is None
    settings = load_settings(config, auto_env)
    assert settings.trainer.subject_key is None
    with Store.open(settings.database.url) as store:
        store.record_batch([report(f"ev-{i}", q, t, model=MODEL) for i, (q, t) in enumerate(EDITS)])
        worker = Worker(store, plain, settings.policy, work_allowed=threading.Event(), ingest_done=threading.Event())
        for _ in EDITS[:2]:
            mistake = store.next_mistake(MODEL)
            assert mistake is not None
            assert worker.process(mistake) == "patched"
        ids = plain.base.tokenizer([q for q, _ in EDITS], return_tensors="pt", padding=True)
        with torch.no_grad():
            want = plain.base.model(**ids).logits

        upgraded = PatchedModel.load(settings)
        assert upgraded.patcher.subject is not None  # a generator with a layer below the patched one
        got = upgraded.rebuild(store)
        assert got.replayed == 2 and got.mismatches == []
        with torch.no_grad():
            torch.testing.assert_close(upgraded.base.model(**ids).logits, want, rtol=0, atol=1e-5)

        worker = Worker(store, upgraded, settings.policy, work_allowed=threading.Event(), ingest_done=threading.Event())
        mistake = store.next_mistake(MODEL)
        assert mistake is not None
        assert worker.process(mistake) == "patched"
        assert len(store.accepted_patches(MODEL)) == 3
