"""Activation sets on disk: round trip, keyed by base identity, crash-safe shards, revocation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from memory.activations import ActivationKey, ActivationKeyMismatch, ActivationStore, _sha256

KEY = ActivationKey(base_name="org/MiniLM-L6", base_sha256="ab" * 32, model_type="bert", layer=5)


def test_append_and_load_round_trip(tmp_path: Path) -> None:
    store = ActivationStore.open(tmp_path, KEY)
    q1, q2 = torch.randn(4, 8), torch.randn(3, 8)
    assert store.append("memory", {"q": q1}) == 4
    assert store.append("memory", {"q": q2}, edit_id=17) == 7
    store.append("heldout", {"q": torch.randn(5, 8), "label": torch.arange(5)})
    loaded = ActivationStore.open(tmp_path, KEY).load("memory")
    assert torch.equal(loaded["q"], torch.cat([q1, q2]))
    assert ActivationStore.open(tmp_path, KEY).load("heldout")["label"].tolist() == [0, 1, 2, 3, 4]
    assert store.rows("heldout") == 5 and store.edit_ids("memory") == [17]
    assert store.load("memory", device="cpu")["q"].dtype == torch.float32


def test_empty_split_loads_empty(tmp_path: Path) -> None:
    assert ActivationStore.open(tmp_path, KEY).load("memory") == {}


def test_another_base_never_sees_them(tmp_path: Path) -> None:
    ActivationStore.open(tmp_path, KEY).append("memory", {"q": torch.randn(2, 8)})
    other_weights = ActivationKey(KEY.base_name, "cd" * 32, KEY.model_type, KEY.layer)
    other_layer = ActivationKey(KEY.base_name, KEY.base_sha256, KEY.model_type, 4)
    assert ActivationStore.open(tmp_path, other_weights).rows("memory") == 0
    assert ActivationStore.open(tmp_path, other_layer).rows("memory") == 0


def test_copied_directory_is_refused(tmp_path: Path) -> None:
    source = ActivationStore.open(tmp_path, KEY)
    source.append("memory", {"q": torch.randn(2, 8)})
    # same first 16 hex digits, different full sha256: the directory name matches, the index does not
    impostor = ActivationKey(KEY.base_name, "ab" * 8 + "ef" * 24, KEY.model_type, KEY.layer)
    with pytest.raises(ActivationKeyMismatch, match="holds activations of"):
        ActivationStore.open(tmp_path, impostor)
    # a shard copied into another key's directory is refused by its own metadata
    other = ActivationKey("another/base", "12" * 32, "bert", 5)
    target = ActivationStore.open(tmp_path, other)
    target.append("memory", {"q": torch.randn(1, 8)})
    shard = target._index["splits"]["memory"][0]["file"]
    shutil.copy(source.directory / source._index["splits"]["memory"][0]["file"], target.directory / shard)
    target._index["splits"]["memory"][0]["sha256"] = _sha256(target.directory / shard)  # pass the checksum
    with pytest.raises(ActivationKeyMismatch, match="captured from"):
        target.load("memory")


def test_shapes_and_splits_are_checked(tmp_path: Path) -> None:
    store = ActivationStore.open(tmp_path, KEY)
    store.append("memory", {"q": torch.randn(2, 8)})
    with pytest.raises(ValueError, match="do not match"):
        store.append("memory", {"q": torch.randn(2, 9)})
    with pytest.raises(ValueError, match="same first dimension"):
        store.append("heldout", {"q": torch.randn(2, 8), "y": torch.zeros(3)})
    with pytest.raises(ValueError, match="unknown activation split"):
        store.append("train", {"q": torch.randn(1, 8)})
    with pytest.raises(ValueError, match="64 lowercase hex"):
        ActivationKey("b", "not-a-sha", "bert", 1)


def test_corrupted_shard_is_refused(tmp_path: Path) -> None:
    store = ActivationStore.open(tmp_path, KEY)
    store.append("memory", {"q": torch.randn(2, 8)})
    shard = store.directory / store._index["splits"]["memory"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="checksum"):
        store.load("memory")


def test_unlisted_shard_from_a_crash_is_ignored_and_removed(tmp_path: Path) -> None:
    store = ActivationStore.open(tmp_path, KEY)
    store.append("memory", {"q": torch.ones(2, 8)})
    index_before = (store.directory / "index.json").read_text()
    store.append("memory", {"q": torch.zeros(3, 8)})
    # simulate a crash after the shard was renamed into place but before the index was replaced
    (store.directory / "index.json").write_text(index_before)
    (store.directory / ".memory-000003.safetensors.tmp").write_bytes(b"half a file")
    reopened = ActivationStore.open(tmp_path, KEY)
    assert reopened.rows("memory") == 2 and torch.equal(reopened.load("memory")["q"], torch.ones(2, 8))
    assert sorted(p.name for p in reopened.directory.iterdir()) == ["index.json", "memory-000001.safetensors"]


def test_drop_edit_removes_its_rows(tmp_path: Path) -> None:
    store = ActivationStore.open(tmp_path, KEY)
    store.append("memory", {"q": torch.ones(2, 8)})
    store.append("memory", {"q": torch.zeros(1, 8)}, edit_id=5)
    store.append("memory", {"q": torch.full((1, 8), 2.0)}, edit_id=6)
    assert store.drop_edit("memory", 5) == 1 and store.drop_edit("memory", 5) == 0
    assert store.edit_ids("memory") == [6]
    assert ActivationStore.open(tmp_path, KEY).load("memory")["q"][:, 0].tolist() == [1.0, 1.0, 2.0]
    assert json.loads((store.directory / "index.json").read_text())["key"]["layer"] == 5
