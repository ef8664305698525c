"""Patch sets round-trip bit for bit, hold only patch tensors, and refuse another base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from patching.config import TrainConfig
from patching.engine import Patcher
from patching.loading import base_identity, load_patched, save_patches
from patching.patchfile import PATCHES_FILE, PatchConfig, PatchStateError
from tests.fixtures_models import tiny_model
from tests.test_patching_parity import full_logits, random_neurons, tiny_batch


def saved_base(tmp_path, arch: str, seed: int = 0):
    model = tiny_model(arch, seed=seed)
    base_dir = tmp_path / f"base-{arch}-{seed}"
    model.save_pretrained(base_dir)
    return model, base_dir


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "relu-cap"])
def test_save_load_round_trip_bit_for_bit(tmp_path, arch: str, activation: str) -> None:
    model, base_dir = saved_base(tmp_path, arch)
    patcher = Patcher(model, train=TrainConfig(activation=activation))
    d = patcher.site.hidden_size
    for i, n in enumerate((1, 3, 2)):  # edits with several neurons keep their grouping
        k, b, v = random_neurons(n, d, seed=i)
        patcher.wrapper.add(k, b, v, edit_id=f"edit-{i}")
    cfg = PatchConfig(
        base_identity(base_dir),
        model.config.model_type,
        patcher.site.layer_index,
        activation,
        d,
        patcher.wrapper.n,
        list(patcher.wrapper.edit_ids),
    )
    out = tmp_path / "patch"
    save_patches(patcher.wrapper, out, cfg)
    # only patch tensors are written: no base weights, no model config
    assert sorted(p.name for p in out.iterdir()) == ["patch_config.json", "patches.safetensors"]
    with safe_open(str(out / PATCHES_FILE), "pt") as f:
        assert sorted(f.keys()) == ["biases", "keys", "values"]
        assert json.loads(f.metadata()["edit_ids"]) == patcher.wrapper.edit_ids
    loaded = load_patched(base_dir, out)
    from patching.arch import locate
    from patching.layer import patched

    w2 = patched(locate(loaded))
    assert w2 is not None
    for name in ("keys", "biases", "values"):
        assert torch.equal(getattr(w2, name), getattr(patcher.wrapper, name))
    assert w2.edit_ids == patcher.wrapper.edit_ids
    enc = tiny_batch(model)
    assert torch.equal(full_logits(loaded, enc), full_logits(model, enc))


def test_patch_set_for_another_base_is_refused(tmp_path) -> None:
    model, base_dir = saved_base(tmp_path, "bert", seed=0)
    _, other_dir = saved_base(tmp_path, "bert", seed=1)
    patcher = Patcher(model)
    k, b, v = random_neurons(1, patcher.site.hidden_size, seed=0)
    patcher.wrapper.add(k, b, v, edit_id="x")
    cfg = PatchConfig(
        base_identity(base_dir), "bert", patcher.site.layer_index, "relu", patcher.site.hidden_size, 1, ["x"]
    )
    save_patches(patcher.wrapper, tmp_path / "p", cfg)
    with pytest.raises(PatchStateError, match="refusing"):
        load_patched(other_dir, tmp_path / "p")
    assert base_identity(base_dir) != base_identity(other_dir)
