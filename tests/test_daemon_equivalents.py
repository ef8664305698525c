"""The worker trains a patch on the paraphrases reported with a mistake (the events' `equivalents`)."""

from __future__ import annotations

import dataclasses
import random
import threading
from pathlib import Path

import pytest

from daemon.model import PatchedModel
from daemon.settings import load_settings
from daemon.worker import Worker
from memory.store import Store
from tests.test_memory_store import report
from tests.tinybase import LABELS, MISTAKE_WORDS, MODEL, prepare, sentence, write_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return prepare(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("train_on_equivalents", [True, False])
def test_worker_fits_the_reported_equivalents(tiny, tmp_path: Path, train_on_equivalents: bool) -> None:
    base, data = tiny
    config = write_config(
        tmp_path / "p.toml", base=base, data=data, bootstrap="127.0.0.1:9", topic="t", state=tmp_path / "state"
    )
    settings = load_settings(config, {})
    # unrelated random inputs stand in for paraphrases here: they take more steps than real ones
    settings = dataclasses.replace(
        settings,
        policy=dataclasses.replace(settings.policy, train_on_equivalents=train_on_equivalents),
        trainer=dataclasses.replace(settings.trainer, equivalent_steps=400),
    )
    model = PatchedModel.load(settings)
    rng = random.Random(7)
    texts = [sentence(rng, i) for i in MISTAKE_WORDS]
    predicted = model.adapter.predict(texts)
    # three inputs the model gives the same label: the first is reported, the others are its "paraphrases"
    label = max(LABELS, key=predicted.count)
    same = [t for t, p in zip(texts, predicted, strict=True) if p == label][:3]
    target = next(x for x in LABELS if x != label)
    with Store.open(settings.database.url) as store:
        store.record_batch([report("ev-0", same[0], target, model=MODEL, equivalents=tuple(same[1:]))])
        mistake = store.next_mistake(MODEL)
        assert mistake is not None and mistake.equivalents == tuple(same[1:])
        worker = Worker(store, model, settings.policy, work_allowed=threading.Event(), ingest_done=threading.Event())
        assert worker.process(mistake) == "patched"
    after = model.adapter.predict(same)
    assert after[0] == target
    if train_on_equivalents:
        assert after[1:] == [target, target]
    else:  # one neuron for the reported wording only: unrelated inputs keep their label
        assert after[1:] == [label, label]
