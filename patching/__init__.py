"""patchd's editing engine: Transformer-Patcher neurons trained on cached tensors.

Public API (imported lazily, so `import patching.config` does not pull in torch):

    from patching import Patcher, TrainConfig, GateConfig, load_patched, save_patches
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
