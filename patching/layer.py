"""The patched FFN: a frozen base FFN plus patch neurons (key, bias, value).

A patch neuron p adds `act(q · k_p + b_p) * v_p` to the FFN output at every position, where q is
the FFN input at that position. The base module stays intact as `base` and is never modified;
`detach` puts it back exactly where it was, so the model is restored bit for bit.

Neurons are buffers, not parameters: they are trained elsewhere (trainer.py, on cached tensors),
then added here already final. Each neuron carries the edit id it belongs to, so an edit (one or
several neurons) can be removed again.

Neurons are kept in float32 whatever the model's dtype: they are trained and gated in float32
on cached tensors cast up, and saved in float32. A bfloat16 model runs them in its own dtype, from
a copy made once per change of the neuron set: on a GPU a float32 product beside bfloat16 tensor
cores would cost more than the whole patch is worth (10,000 neurons of an 8B-size model are about
1 % of its work in bfloat16, several times that in float32). The difference is one bfloat16
rounding of the neurons (tests/test_patching_parity.py bounds it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from patching.arch import FFNSite
from patching.config import Activation


def activate(pre: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation == "relu":
        return F.relu(pre)
    if activation == "relu-cap":
        # min(relu(x), 1): a capped neuron gives its whole value, never more (patching/saturation.py)
        return pre.clamp(0.0, 1.0)
    if activation == "gelu":
        return F.gelu(pre)
    raise ValueError(f"unknown patch activation {activation!r}")


def trained_as(activation: Activation) -> Activation:
    """The activation a neuron is trained with: a relu-cap neuron is trained as a relu and capped after."""
    return "relu" if activation == "relu-cap" else activation


def neuron_output(
    q: torch.Tensor, keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor, activation: Activation
) -> torch.Tensor:
    """q [..., d_in], keys [n, d_in], biases [n], values [n, d_out] -> added output [..., d_out]."""
    return activate(q @ keys.T + biases, activation) @ values


class PatchedFFN(nn.Module):
    """Wraps the `ffn_out` module of the patched layer; see the module docstring."""

    # buffers, registered in __init__ (declared here for the type checker)
    keys: torch.Tensor  # [n, d]
    biases: torch.Tensor  # [n]
    values: torch.Tensor  # [n, d]

    def __init__(self, base: nn.Module, hidden_size: int, activation: Activation, q_from_input: bool):
        super().__init__()
        self.base = base
        self.activation: Activation = activation
        # True when the wrapped module is the whole FFN (its first input is q); otherwise a
        # forward pre-hook on the FFN's input module stores q in `_q` just before we run
        self.q_from_input = q_from_input
        self._q: torch.Tensor | None = None
        ref = next(base.parameters())
        kw: dict[str, Any] = {"dtype": torch.float32, "device": ref.device}  # see the module docstring
        self.register_buffer("keys", torch.zeros(0, hidden_size, **kw))  # [n, d]
        self.register_buffer("biases", torch.zeros(0, **kw))  # [n]
        self.register_buffer("values", torch.zeros(0, hidden_size, **kw))  # [n, d]
        self.edit_ids: list[str] = []  # one entry per neuron
        # (dtype, keys, biases, values): the neurons in the model's dtype, made when first needed
        self._cast: tuple[torch.dtype, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # a neuron being trained by the reference trainer (full forward every step); never saved
        self.candidate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return int(self.keys.shape[0])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        q = args[0] if self.q_from_input else self._q
        self._q = None
        if q is None:
            raise RuntimeError("PatchedFFN ran without its input q: the ffn_in hook did not fire")
        if self.n:
            keys, biases, values = self._neurons(q.dtype)
            out = out + neuron_output(q, keys, biases, values, self.activation).to(out.dtype)
        if self.candidate is not None:
            k, b, v = self.candidate  # trained as its activation trains (a relu-cap neuron is capped after)
            out = out + neuron_output(q.float(), k, b, v, trained_as(self.activation)).to(out.dtype)
        return out

    def _neurons(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The neurons in `dtype` (the float32 buffers themselves for a float32 model)."""
        if dtype == self.keys.dtype:
            return self.keys, self.biases, self.values
        if self._cast is None or self._cast[0] != dtype or self._cast[1].device != self.keys.device:
            self._cast = (dtype, self.keys.to(dtype), self.biases.to(dtype), self.values.to(dtype))
        return self._cast[1], self._cast[2], self._cast[3]

    def add(self, keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor, edit_id: str) -> None:
        """Append neurons keys [m, d], biases [m], values [m, d], all belonging to `edit_id`."""
        if keys.ndim != 2 or keys.shape != values.shape or biases.shape != (keys.shape[0],):
            raise ValueError(f"bad neuron shapes {tuple(keys.shape)} {tuple(biases.shape)} {tuple(values.shape)}")
        ref = self.keys
        self.keys = torch.cat([self.keys, keys.detach().to(ref)])
        self.biases = torch.cat([self.biases, biases.detach().to(ref)])
        self.values = torch.cat([self.values, values.detach().to(ref)])
        self.edit_ids.extend([edit_id] * keys.shape[0])
        self._cast = None

    def restore(self, keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor, edit_ids: Sequence[str]) -> None:
        """Put back a whole neuron set at once (a restart from a snapshot, patching/snapshot.py):
        keys [n, d], biases [n], values [n, d] and the edit id of each neuron, into an empty layer."""
        if self.n:
            raise ValueError(f"restore needs an empty layer; this one holds {self.n} neurons")
        if keys.ndim != 2 or keys.shape != values.shape or biases.shape != (keys.shape[0],):
            raise ValueError(f"bad neuron shapes {tuple(keys.shape)} {tuple(biases.shape)} {tuple(values.shape)}")
        if len(edit_ids) != keys.shape[0] or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"{len(edit_ids)} edit ids for neurons {tuple(keys.shape)} in a layer of width {self.keys.shape[1]}"
            )
        ref = self.keys
        self.keys, self.biases, self.values = keys.to(ref), biases.to(ref), values.to(ref)
        self.edit_ids = list(edit_ids)
        self._cast = None

    def remove(self, edit_ids: Sequence[str]) -> int:
        """Remove every neuron of the given edits; returns how many were removed."""
        drop = set(edit_ids)
        keep = [i for i, e in enumerate(self.edit_ids) if e not in drop]
        removed = self.n - len(keep)
        idx = torch.tensor(keep, dtype=torch.long, device=self.keys.device)
        self.keys = self.keys.index_select(0, idx)
        self.biases = self.biases.index_select(0, idx)
        self.values = self.values.index_select(0, idx)
        self.edit_ids = [self.edit_ids[i] for i in keep]
        self._cast = None
        return removed

    def clear(self) -> None:
        self.remove(list(set(self.edit_ids)))


_HOOKS: dict[int, RemovableHandle] = {}  # id(PatchedFFN) -> the pre-hook on its ffn_in module


def attach(site: FFNSite, activation: Activation) -> PatchedFFN:
    """Wrap the site's ffn_out module (idempotent). Returns the wrapper."""
    current = site.ffn_out
    if isinstance(current, PatchedFFN):
        if current.activation != activation:
            raise ValueError(f"model already patched with activation {current.activation!r}, not {activation!r}")
        return current
    q_from_input = site.ffn_in is current
    wrapper = PatchedFFN(current, site.hidden_size, activation, q_from_input)
    if not q_from_input:

        def store_q(_module: nn.Module, args: tuple[Any, ...]) -> None:
            wrapper._q = args[0]

        _HOOKS[id(wrapper)] = site.ffn_in.register_forward_pre_hook(store_q)
    setattr(site.ffn_out_parent, site.ffn_out_name, wrapper)
    return wrapper


def patched(site: FFNSite) -> PatchedFFN | None:
    module = site.ffn_out
    return module if isinstance(module, PatchedFFN) else None


def detach(site: FFNSite) -> None:
    """Remove the wrapper and its hook, putting the original module back (bit-for-bit restore)."""
    wrapper = patched(site)
    if wrapper is None:
        return
    handle = _HOOKS.pop(id(wrapper), None)
    if handle is not None:
        handle.remove()
    setattr(site.ffn_out_parent, site.ffn_out_name, wrapper.base)
