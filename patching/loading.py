"""A patch set onto a base: the base's identity, loading a base directory, attaching neurons.

A patch set is `patches.safetensors` + `patch_config.json` (their format: patching/patchfile.py).
Only patch tensors are ever written; base weights never. The config records the base's identity
(sha256 over its weight files), so a patch set made for another base is refused.

`patchfile.parse_patch_set` / `attach_patches` split `load_patched` into "bytes -> checked tensors"
and "tensors -> patched model", so the checkpoint client can verify bytes it read once and never
re-open a file between checking and loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patching.patchfile import (
    CONFIG_FILE,
    PATCHES_FILE,
    PatchConfig,
    PatchStateError,
    PatchTensors,
    config_bytes,
    of_layer,
    parse_patch_set,
    write_file,
)

if TYPE_CHECKING:
    import torch

    from patching.layer import PatchedFFN

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def base_identity(base_dir: str | Path) -> str:
    """sha256 over the base's weight files (names and bytes, in name order).

    Cached in a sidecar keyed by the files' sizes and mtimes, so checking a 500 MB base is
    instant after the first time.
    """
    base = Path(base_dir)
    # a patch set exported beside its base (patchd export) is not part of the base's identity
    files = sorted(p for p in base.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file() and p.name != PATCHES_FILE)
    if not files:
        raise PatchStateError(f"no weight files (*.safetensors, *.bin, *.gguf) in {base}")
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    sidecar = base / ".patchd-identity.json"
    try:
        cached = json.loads(sidecar.read_text())
        if cached.get("stamp") == stamp:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        sidecar.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:
        pass  # a read-only base directory only loses the cache
    return digest


def save_patches(wrapper: PatchedFFN, out_dir: str | Path, config: PatchConfig) -> None:
    """A wrapper's neurons and their config as a patch set in `out_dir` (load_patched reads it back)."""
    out = Path(out_dir)
    write_file(out / PATCHES_FILE, of_layer(wrapper))
    (out / CONFIG_FILE).write_bytes(config_bytes(config))


def read_patches(patch_dir: str | Path) -> tuple[PatchConfig, PatchTensors]:
    d = Path(patch_dir)
    try:
        raw_config, raw_patches = (d / CONFIG_FILE).read_bytes(), (d / PATCHES_FILE).read_bytes()
    except OSError as exc:
        raise PatchStateError(f"cannot read the patch set in {d}: {exc}") from exc
    return parse_patch_set(raw_config, raw_patches, where=str(d))


def check_compatible(config: PatchConfig, identity: str, model_type: str, hidden_size: int) -> None:
    if config.base_identity != identity:
        raise PatchStateError(
            f"patch set was made for base {config.base_identity[:12]}… ({config.base_name or 'unnamed'}), "
            f"but this base is {identity[:12]}…: refusing to load it"
        )
    if config.model_type != model_type or config.hidden_size != hidden_size:
        raise PatchStateError(
            f"patch set is for {config.model_type} d={config.hidden_size}, model is {model_type} d={hidden_size}"
        )


def load_base_model(base_dir: str | Path, dtype: torch.dtype | None = None) -> Any:
    """Load a local HF model directory with the class its config names (no hub access); fp32 by default."""
    import torch
    import transformers

    dtype = dtype or torch.float32
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = transformers.AutoConfig.from_pretrained(str(base_dir))
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(str(base_dir), dtype=dtype).eval()


def load_patched(base_dir: str | Path, patch_dir: str | Path, arch: dict[str, Any] | None = None) -> Any:
    """A ready model: the base from `base_dir` with the patch set from `patch_dir` attached."""
    config, patches = read_patches(patch_dir)
    return attach_patches(load_base_model(base_dir), config, patches, base_identity(base_dir), arch)


def attach_patches(
    model: Any,
    config: PatchConfig,
    patches: PatchTensors,
    identity: str,
    arch: dict[str, Any] | None = None,
) -> Any:
    """Attach a parsed patch set to an unpatched `model` whose weights have identity `identity`.

    Everything is checked before the model is touched: a refused patch set leaves it unpatched.
    """
    from patching.arch import locate
    from patching.layer import attach, attach_subject

    site = locate(model, arch)
    check_compatible(config, identity, model.config.model_type, site.hidden_size)
    if site.layer_index != config.layer:
        raise PatchStateError(f"patch set targets layer {config.layer}, this base's last layer is {site.layer_index}")
    sub = patches.subject
    subject_site = None
    if sub is not None:  # subject neurons (patching/subject.py) read layer L_s's input too
        if not 0 <= sub.layer < site.layer_index:
            raise PatchStateError(f"the patch set's detectors read layer {sub.layer}, not one below {site.layer_index}")
        subject_site = locate(model, arch, layer=sub.layer)
        if int(sub.w.shape[1]) != subject_site.hidden_size:
            width = subject_site.hidden_size
            raise PatchStateError(f"detectors of width {sub.w.shape[1]} for layer {sub.layer} of width {width}")
    wrapper = attach(site, config.activation)  # type: ignore[arg-type]
    if subject_site is not None:
        attach_subject(site, wrapper, subject_site)
    for edit_id, rows in patches.by_edit():  # edit by edit, in their saved order
        det = None if sub is None else (sub.w[rows], sub.a[rows], sub.c[rows])
        wrapper.add(patches.keys[rows], patches.biases[rows], patches.values[rows], edit_id, subject=det)
    return model
