"""Where MEND edits, how its gradients are captured, and the top of the stack run on a cached input.

- `select_targets`: the FFN weight matrices MEND edits (the last `n_layers` layers, both matrices;
  Llama-style models: up and down, gate optional), with their full parameter names.
- `GradCapture`: forward hooks on those Linears keep each one's input u and output y; after a
  loss, δ = ∂loss/∂y comes from `torch.autograd.grad`. Rows where u or δ is all zero are dropped.
  Σ_t δ_t u_tᵀ is exactly the weight gradient (tests/test_patching_mend.py).
- `TopStack`: the layers below the lowest edited one never change, so the residual stream entering
  it (and the exact arguments the model passed to that layer) is captured once per input; a step
  then runs only the top layers, the final norm and the head, and only at the supervised rows.
  Edited weights go in with `torch.func.functional_call`, never by patching modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call

from patching.arch import ArchError, FFNSite, get_module, locate

# the FFN Linears of one layer, relative to the layer, by model_type
FFN_LINEARS: dict[str, tuple[str, ...]] = {
    "bert": ("intermediate.dense", "output.dense"),
    "roberta": ("intermediate.dense", "output.dense"),
    "distilbert": ("ffn.lin1", "ffn.lin2"),
    "llama": ("mlp.up_proj", "mlp.down_proj"),
    "qwen2": ("mlp.up_proj", "mlp.down_proj"),
    "mistral": ("mlp.up_proj", "mlp.down_proj"),
}
GATED = ("llama", "qwen2", "mistral")  # these also have mlp.gate_proj


@dataclass(frozen=True)
class Target:
    name: str  # full parameter name, e.g. bert.encoder.layer.3.intermediate.dense.weight
    layer: int  # index in the layer stack
    local: str  # parameter name relative to that layer, e.g. intermediate.dense.weight
    shape: tuple[int, int]  # [out, in]


def _layers(model: nn.Module) -> tuple[FFNSite, nn.ModuleList, str]:
    site = locate(model)
    layers = get_module(model.base_model, site.spec.layers)  # type: ignore[arg-type]
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return site, layers, prefix  # type: ignore[return-value]


def select_targets(model: nn.Module, n_layers: int = 3, gate: bool = False) -> list[Target]:
    config: Any = model.config  # a transformers config: model_type is not a typed attribute
    model_type = config.model_type
    if model_type not in FFN_LINEARS:
        raise ArchError(f"MEND supports model types {', '.join(sorted(FFN_LINEARS))}, not {model_type!r}")
    locals_ = list(FFN_LINEARS[model_type])
    if gate and model_type in GATED:
        locals_.insert(0, "mlp.gate_proj")
    _, layers, prefix = _layers(model)
    n = len(layers)
    if not 1 <= n_layers <= n:
        raise ValueError(f"n_layers must be in 1..{n}")
    out = []
    for i in range(n - n_layers, n):
        for loc in locals_:
            mod = get_module(layers[i], loc)
            if not isinstance(mod, nn.Linear):
                raise ArchError(f"{prefix}.{i}.{loc} is {type(mod).__name__}, not nn.Linear")
            shape = cast("tuple[int, int]", tuple(mod.weight.shape))  # a Linear's weight is 2-D
            out.append(Target(f"{prefix}.{i}.{loc}.weight", i, f"{loc}.weight", shape))
    return out


def target_modules(model: nn.Module, targets: Sequence[Target]) -> dict[str, nn.Linear]:
    mods = dict(model.named_modules())
    return {t.name: mods[t.name.removesuffix(".weight")] for t in targets}


def drop_zero_rows(u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, delta = u.reshape(-1, u.shape[-1]), delta.reshape(-1, delta.shape[-1])
    keep = (u != 0).any(-1) & (delta != 0).any(-1)
    return u[keep], delta[keep]


class GradCapture:
    """Use as a context manager around a forward; then `rows(loss)` -> {name: (u [N, in], δ [N, out])}."""

    def __init__(self, modules: Mapping[str, nn.Linear]):
        self.modules = dict(modules)
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> GradCapture:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            if not out.requires_grad:  # frozen weights and input: make the output a leaf we can differentiate to
                out = out.detach().requires_grad_(True)
            self.inputs[name] = args[0].detach()
            self.outputs[name] = out
            return out

        return hook

    def rows(self, loss: torch.Tensor, retain_graph: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        names = [n for n in self.modules if n in self.outputs]
        grads = torch.autograd.grad(
            loss, [self.outputs[n] for n in names], retain_graph=retain_graph, allow_unused=True
        )
        out = {}
        for n, g in zip(names, grads, strict=True):
            if g is None:
                g = torch.zeros_like(self.outputs[n])
            out[n] = drop_zero_rows(self.inputs[n], g.detach())
        return out


class _Stop(Exception):
    pass


@dataclass
class Cached:
    """The residual stream entering the lowest edited layer for one batch, and the other arguments
    the model passed to that layer (attention mask, rotary embeddings, ...), replayed as they were."""

    hidden: torch.Tensor  # [B, T, d]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class TopStack:
    def __init__(self, model: nn.Module, lowest: int):
        self.model = model
        self.site, self.layers, self.prefix = _layers(model)
        self.lowest = lowest
        self._extra = {"use_cache": False} if hasattr(model.config, "use_cache") else {}

    @torch.no_grad()
    def capture(self, batch: Mapping[str, torch.Tensor]) -> Cached:
        seen: dict[str, Any] = {}

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen["args"], seen["kwargs"] = args, kwargs
            raise _Stop  # the layers above are not needed

        handle = self.layers[self.lowest].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            self.model(**batch, **self._extra)
        except _Stop:
            pass
        finally:
            handle.remove()
        args, kwargs = seen["args"], dict(seen["kwargs"])
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return Cached(args[0].detach(), tuple(args[1:]), kwargs)

    def hidden(
        self, cached: Cached, params: Mapping[str, torch.Tensor] | None = None, targets: Sequence[Target] = ()
    ) -> torch.Tensor:
        """Final hidden states [B, T, d] from the cached input; `params` maps target names to the
        weights to use instead of the model's (functional_call), e.g. W + ΔW."""
        per_layer: dict[int, dict[str, torch.Tensor]] = {}
        if params:
            for t in targets:
                if t.name in params:
                    per_layer.setdefault(t.layer, {})[t.local] = params[t.name]
        h = cached.hidden
        for i in range(self.lowest, len(self.layers)):
            layer = self.layers[i]
            if i in per_layer:
                out = functional_call(layer, per_layer[i], (h, *cached.args), cached.kwargs)
            else:
                out = layer(h, *cached.args, **cached.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def logits(
        self,
        cached: Cached,
        rows_b: torch.Tensor,
        rows_t: torch.Tensor,
        params: Mapping[str, torch.Tensor] | None = None,
        targets: Sequence[Target] = (),
    ) -> torch.Tensor:
        """Logits [R, C] at the given rows only (classification: position 0)."""
        h = self.hidden(cached, params, targets)[rows_b, rows_t]
        if self.site.final_norm is not None:
            h = self.site.final_norm(h)
        return self.site.head(h)
