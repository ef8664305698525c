"""The patch file format (patching/patchfile.py): dtype-safe, bit for bit, through every user of it:
the store's rows, a published version, the downstream client's parser and `evaluate --resume`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from daemon.publisher import BaseInfo, Publisher, concat_neurons
from memory.records import PatchIn, ReportIn
from memory.store import Store
from patching import patchfile
from patching.checkpoint import read_verified
from patching.client import patch_set
from patching.patchfile import PatchStateError, PatchTensors
from patching.storage import FileStorage

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _neurons(n: int, d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(dtype) for shape in ((n, d), (n,), (n, d)))  # type: ignore[return-value]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_for_bit_in_every_dtype(dtype: torch.dtype, tmp_path: Path) -> None:
    keys, biases, values = _neurons(5, 8, dtype, seed=1)
    ids = ["7", "7", "9", "9", "9"]
    back = patchfile.decode(patchfile.encode(keys, biases, values, ids, {"note": "x"}))
    assert back.keys.dtype == back.biases.dtype == back.values.dtype == dtype
    assert [_bits(t) for t in (back.keys, back.biases, back.values)] == [_bits(t) for t in (keys, biases, values)]
    assert back.edit_ids == ids and back.metadata == {"note": "x"}
    assert back.by_edit() == [("7", slice(0, 2)), ("9", slice(2, 5))]
    assert _bits(back.of_edit("9")[0]) == _bits(keys[2:])
    patchfile.write_file(tmp_path / "p.safetensors", back)
    again = patchfile.read_file(tmp_path / "p.safetensors")
    assert _bits(again.values) == _bits(values) and again.edit_ids == ids
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left


def test_bad_files_are_clear_errors() -> None:
    keys, biases, values = _neurons(2, 4, torch.float32, seed=0)
    with pytest.raises(PatchStateError, match="not a safetensors file"):
        patchfile.decode(b"not safetensors")
    with pytest.raises(PatchStateError, match="2 edit ids for 3 neurons|edit ids"):
        patchfile.encode(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, 4), ["a", "b"])
    with pytest.raises(PatchStateError, match="keys \\[n, d\\]"):
        patchfile.encode(keys, biases, values[:, :3], ["a", "b"])
    # a row written before the store kept edit ids in it: the caller names the edit
    from safetensors.torch import save

    old = save({"keys": keys, "biases": biases, "values": values})
    with pytest.raises(PatchStateError, match="no edit_ids"):
        patchfile.decode(old)
    assert patchfile.decode(old, edit_id="4").edit_ids == ["4", "4"]
    with pytest.raises(PatchStateError, match="not only of 5"):
        patchfile.decode(patchfile.encode(keys, biases, values, ["4", "4"]), edit_id="5")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_rows_to_a_published_version_keep_dtype_and_bits(dtype: torch.dtype, tmp_path: Path) -> None:
    """What the worker stores, the publisher concatenates and the client parses: the same bits."""
    d = 8
    with Store.open(f"sqlite:///{tmp_path}/s.db") as store:
        store.record_batch([ReportIn(f"e{i}", "m", f"{i:064x}", f"input {i}", "A", b"{}", "t", 0, i) for i in range(3)])
        written: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for i in range(3):
            mistake = store.next_mistake("m", claim=True)
            assert mistake is not None
            nr = _neurons(i + 1, d, dtype, seed=i)
            written.append(nr)
            blob = patchfile.encode(*nr, [str(mistake.id)] * (i + 1))
            store.add_patch(mistake.id, PatchIn(blob, i + 1, 1, "relu", 1, 0.0, {"passed": True}, True))
        patches = store.accepted_patches("m")
        storage = FileStorage(tmp_path / "root")
        published = Publisher("m", store, storage, BaseInfo("id", "b", "bert", d, 1, "relu")).publish_if_changed()
        assert published is not None
    version = read_verified(storage, "m", published.number)
    config, merged = patch_set(version)  # its segments, one after the other
    assert merged.keys.dtype == dtype and config.n == merged.n == 6
    assert merged.edit_ids == [str(p.mistake_id) for p in patches for _ in range(p.n_neurons)]
    for name, j in (("keys", 0), ("biases", 1), ("values", 2)):
        assert _bits(getattr(merged, name)) == b"".join(_bits(nr[j]) for nr in written)
    blob, ids = concat_neurons([], d)  # every patch removed: an empty set of the base's width
    empty = patchfile.decode(blob)
    assert empty.n == 0 and tuple(empty.keys.shape) == (0, d) and ids == []


def test_evaluate_resume_file_is_the_same_format(tmp_path: Path) -> None:
    from patching.eval.resume import ResumeError, load_patches

    keys, biases, values = _neurons(3, 4, torch.bfloat16, seed=3)
    patchfile.write_file(tmp_path / "r.patches.safetensors", PatchTensors(keys, biases, values, ["1", "2", "2"]))
    loaded = load_patches(tmp_path / "r.patches.safetensors")
    assert list(loaded.neurons) == ["1", "2"] and _bits(loaded.neurons["2"].keys) == _bits(keys[1:])
    assert loaded.detectors == {} and loaded.scale is None
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ResumeError, match="safetensors"):
        load_patches(tmp_path / "bad.safetensors")
