"""patchd's editing engine: Transformer-Patcher neurons trained on cached tensors.

Public API (imported lazily, so `import patching.config` does not pull in torch):

    from patching import Patcher, TrainConfig, GateConfig, load_patched, save_patches

The engine is the top level of this package, and a reader of it needs nothing else:
arch.py (the architecture table), layer.py, capture.py, encode.py, losses.py, init.py,
trainer.py, fasttail.py, saturation.py, memory_bank.py, gate.py, engine.py (the Patcher owns the
neurons), reference.py. Beside it: patchfile.py (the one patch file format), loading.py (a patch
set onto a base), checkpoint.py, storage.py and client.py (versions on shared storage and the
downstream loader; a new storage kind is a Storage subclass in storage.py). Two rooms of their
own: bases/ (preparing and loading bases, TaskAdapter) and eval/ (`patchd evaluate`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Patcher": "patching.engine",
    "TrainConfig": "patching.config",
    "GateConfig": "patching.config",
    "load_patched": "patching.loading",
    "save_patches": "patching.loading",
    "PatchConfig": "patching.patchfile",
    "locate": "patching.arch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'patching' has no attribute {name!r}")
