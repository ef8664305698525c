"""A trained MEND editor on disk: `mend.safetensors` + `mend_config.json` (+ training state to resume).

The config records exactly which matrices are edited (full names and shapes), the net's sizes and
the base's identity, so an editor is never applied to another model by accident. Tensors are read
with safetensors only; the optimiser state is flattened into safetensors too (nothing unpickled).
Every file is written to a temporary name and renamed into place; the config goes last.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from patching.eval.mend.nets import MendNet

WEIGHTS_FILE = "mend.safetensors"
CONFIG_FILE = "mend_config.json"
OPTIM_FILE = "optim.safetensors"
FORMAT = "patchd-mend/1"


class MendStateError(ValueError):
    """An editor directory that is missing, incomplete or made for another model."""


def _atomic_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def net_config(net: MendNet, rank: int, n_layers: int) -> dict[str, Any]:
    return {
        "names": net.names,
        "shapes": [list(s) for s in net.shapes],
        "modes": net.modes,
        "rank": rank,
        "mlp_layers": n_layers,
    }


def save(
    directory: Path, net: MendNet, config: dict[str, Any], optimizers: dict[str, torch.optim.Optimizer] | None = None
) -> None:
    """Write the editor (and, for resuming, the optimisers' state) and then its config."""
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_tensors(dict(net.state_dict()), directory / WEIGHTS_FILE)
    if optimizers:
        flat: dict[str, torch.Tensor] = {}
        for tag, opt in optimizers.items():
            for idx, state in opt.state_dict()["state"].items():
                for key, value in state.items():
                    flat[f"{tag}.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        _atomic_tensors(flat, directory / OPTIM_FILE)
    _atomic_json({"format": FORMAT, **config}, directory / CONFIG_FILE)


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise MendStateError(
            f"{directory} holds no trained MEND editor ({CONFIG_FILE} + {WEIGHTS_FILE}); "
            "train one with `patchd mend train`"
        )
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise MendStateError(f"{path}: unknown format {config.get('format')!r} (expected {FORMAT})")
    return config


def load(directory: Path) -> tuple[MendNet, dict[str, Any]]:
    config = read_config(directory)
    nc = config["net"]
    net = MendNet(nc["names"], nc["shapes"], rank=nc["rank"], n_layers=nc["mlp_layers"])
    state = load_file(str(directory / WEIGHTS_FILE))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MendStateError(
            f"{directory}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return net, config


def load_optimizers(directory: Path, optimizers: dict[str, torch.optim.Optimizer]) -> bool:
    """Restore optimiser state written by `save`; False when there is none."""
    path = directory / OPTIM_FILE
    if not path.is_file():
        return False
    flat = load_file(str(path))
    for tag, opt in optimizers.items():
        sd = opt.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            t, idx, name = key.split(".", 2)
            if t == tag:
                state.setdefault(int(idx), {})[name] = value
        sd["state"] = state
        opt.load_state_dict(sd)
    return True


def check_matches(config: dict[str, Any], model: torch.nn.Module) -> None:
    """The editor's matrices exist in `model` with the recorded shapes."""
    params = dict(model.named_parameters())
    for name, shape in zip(config["net"]["names"], config["net"]["shapes"], strict=True):
        if name not in params:
            raise MendStateError(f"the editor edits {name}, which this model does not have")
        if list(params[name].shape) != list(shape):
            raise MendStateError(f"{name}: the editor expects shape {shape}, the model has {list(params[name].shape)}")
