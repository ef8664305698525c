"""Patch sets on disk: `patches.safetensors` + `patch_config.json`, and loading them onto a base.

Only patch tensors are ever written (keys [n, d], biases [n], values [n, d]); base weights never.
The config records the base's identity (sha256 over its weight files), so a patch set made for
another base is refused. Tensors are read with safetensors only: nothing is ever unpickled.

torch is imported only where tensors are made, so the publisher (daemon/publisher.py) and
`base_identity` work without it. `parse_patches` / `attach_patches` split `load_patched` into
"bytes -> checked tensors" and "tensors -> patched model", so the checkpoint client can verify
bytes it read once and never re-open a file between checking and loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from patching.layer import PatchedFFN

CODE_VERSION = "0.1.0"
PATCHES_FILE = "patches.safetensors"
CONFIG_FILE = "patch_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


class PatchStateError(ValueError):
    """A patch set that cannot be used with this base (identity, architecture or shape mismatch)."""


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


@dataclass
class PatchConfig:
    base_identity: str
    model_type: str
    layer: int
    activation: str
    hidden_size: int
    n: int
    edit_ids: list[str]
    code_version: str = CODE_VERSION
    base_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def config_bytes(config: PatchConfig) -> bytes:
    """patch_config.json as written to disk (sorted keys: the same config gives the same bytes)."""
    return (json.dumps(asdict(config), indent=2, sort_keys=True) + "\n").encode()


def parse_config(raw: bytes, where: str = CONFIG_FILE) -> PatchConfig:
    try:
        return PatchConfig(**json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise PatchStateError(f"cannot read {where}: {exc}") from exc


def save_patches(wrapper: PatchedFFN, out_dir: str | Path, config: PatchConfig) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "keys": wrapper.keys.detach().cpu().contiguous(),
        "biases": wrapper.biases.detach().cpu().contiguous(),
        "values": wrapper.values.detach().cpu().contiguous(),
    }
    save_file(tensors, str(out / PATCHES_FILE), metadata={"edit_ids": json.dumps(wrapper.edit_ids)})
    (out / CONFIG_FILE).write_bytes(config_bytes(config))


def read_patches(patch_dir: str | Path) -> tuple[PatchConfig, dict[str, torch.Tensor]]:
    d = Path(patch_dir)
    try:
        raw_config, raw_patches = (d / CONFIG_FILE).read_bytes(), (d / PATCHES_FILE).read_bytes()
    except OSError as exc:
        raise PatchStateError(f"cannot read the patch set in {d}: {exc}") from exc
    return parse_patches(raw_config, raw_patches, where=str(d))


def parse_patches(
    raw_config: bytes, raw_patches: bytes, where: str = ""
) -> tuple[PatchConfig, dict[str, torch.Tensor]]:
    """patch_config.json and patches.safetensors bytes -> the config and tensors, shapes checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    config = parse_config(raw_config, f"{where}/{CONFIG_FILE}" if where else CONFIG_FILE)
    try:
        tensors = load(raw_patches)
    except (SafetensorError, ValueError) as exc:
        raise PatchStateError(f"{where or PATCHES_FILE}: not a safetensors file: {exc}") from exc
    n = config.n
    if set(tensors) != {"keys", "biases", "values"}:
        raise PatchStateError(f"{where}: expected tensors keys, biases, values, got {sorted(tensors)}")
    if (
        tensors["keys"].shape != (n, config.hidden_size)
        or tensors["values"].shape != (n, config.hidden_size)
        or tensors["biases"].shape != (n,)
    ):
        raise PatchStateError(f"{where}: tensor shapes do not match patch_config.json (n={n}, d={config.hidden_size})")
    if len(config.edit_ids) != n:
        raise PatchStateError(f"{where}: {len(config.edit_ids)} edit ids for {n} neurons")
    return config, tensors


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
    config, tensors = read_patches(patch_dir)
    return attach_patches(load_base_model(base_dir), config, tensors, base_identity(base_dir), arch)


def attach_patches(
    model: Any,
    config: PatchConfig,
    tensors: dict[str, torch.Tensor],
    identity: str,
    arch: dict[str, Any] | None = None,
) -> Any:
    """Attach a parsed patch set to an unpatched `model` whose weights have identity `identity`.

    Everything is checked before the model is touched: a refused patch set leaves it unpatched.
    """
    from patching.arch import locate
    from patching.layer import attach

    site = locate(model, arch)
    check_compatible(config, identity, model.config.model_type, site.hidden_size)
    if site.layer_index != config.layer:
        raise PatchStateError(f"patch set targets layer {config.layer}, this base's last layer is {site.layer_index}")
    wrapper = attach(site, config.activation)  # type: ignore[arg-type]
    apply_tensors(wrapper, tensors, config.edit_ids)
    return model


def apply_tensors(wrapper: PatchedFFN, tensors: dict[str, torch.Tensor], edit_ids: list[str]) -> None:
    """Add the saved neurons to a wrapper, edit by edit, in their saved order."""
    start = 0
    while start < len(edit_ids):
        end = start
        while end < len(edit_ids) and edit_ids[end] == edit_ids[start]:
            end += 1
        wrapper.add(
            tensors["keys"][start:end], tensors["biases"][start:end], tensors["values"][start:end], edit_ids[start]
        )
        start = end
