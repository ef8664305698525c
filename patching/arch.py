"""Where the last feed-forward layer of each architecture reads its input and adds its output.

ONE table, keyed by `config.model_type` (as peft's per-model_type target tables). A row names,
for the last layer of the stack that makes the prediction:

- `layers`: the ModuleList of layers, relative to `model.base_model`;
- `ffn_in`: the module (inside the last layer) whose first input is the FFN input q;
- `ffn_out`: the module whose output is the FFN output, before residual and norm. This module is
  wrapped by `layer.PatchedFFN`, which adds the patch neurons to its output;
- `residual_in`: pre-LN layers: the module whose first input is the residual stream that the FFN
  output is added to. None for post-LN layers, where the residual is q itself;
- `post_norm`: post-LN layers: the norm applied to residual + FFN output, inside the layer;
- `final_norm`: the norm after the last layer, relative to `model.base_model` (pre-LN stacks);
- `head`: the name of the function in HEADS that maps final hidden states to logits;
- `kind`: "classification" (the head reads one position, `read_first`) or "generation".

Everything after the FFN output is per position (no attention follows the last FFN), which is
why a neuron can be trained on cached tensors: see capture.py and trainer.py.

An explicit override (settings `[model] arch`) replaces fields of the row, or supplies a whole row
for a model_type that is not in the table. Every name is resolved against the loaded model at
load time, failing fast with the missing path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, cast

import torch
from torch import nn

Kind = Literal["classification", "generation"]


class ArchError(ValueError):
    """The model cannot be patched as configured; the message names the setting to use."""


@dataclass(frozen=True)
class ArchSpec:
    layers: str
    ffn_in: str
    ffn_out: str
    residual_in: str | None
    post_norm: str | None
    final_norm: str | None
    head: str
    kind: Kind


_BERT = ArchSpec(
    "encoder.layer", "intermediate", "output.dense", None, "output.LayerNorm", None, "bert_cls", "classification"
)
_LLAMA = ArchSpec("layers", "mlp", "mlp", "post_attention_layernorm", None, "norm", "lm", "generation")

ARCH_TABLE: dict[str, ArchSpec] = {
    "bert": _BERT,
    "roberta": replace(_BERT, head="roberta_cls"),
    "distilbert": ArchSpec(
        "transformer.layer", "ffn", "ffn", None, "output_layer_norm", None, "distilbert_cls", "classification"
    ),
    # GPT-2's FFN projections are Conv1D (weight stored transposed); the wrapper only needs its output
    "gpt2": ArchSpec("h", "mlp.c_fc", "mlp.c_proj", "ln_2", None, "ln_f", "lm", "generation"),
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
    # encoder-decoder models: the decoder's last layer makes the prediction
    "bart": ArchSpec("decoder.layers", "fc1", "fc2", None, "final_layer_norm", None, "bart_lm", "generation"),
    "t5": ArchSpec(
        "decoder.block",
        "layer.-1.DenseReluDense",
        "layer.-1.DenseReluDense",
        "layer.-1",
        None,
        "decoder.final_layer_norm",
        "t5_lm",
        "generation",
    ),
}

SETTING_HINT = "set `[model] arch` in the settings (fields: " + ", ".join(f.name for f in fields(ArchSpec)) + ")"


# ---------------------------------------------------------------------------------------------
# heads: final hidden states h [N, d] (one row per position) -> logits [N, C]


def _bert_cls(model: Any, h: torch.Tensor) -> torch.Tensor:
    pooled = model.bert.pooler(h[:, None, :])  # the pooler reads position 0 of [N, 1, d]
    return cast(torch.Tensor, model.classifier(model.dropout(pooled)))


def _roberta_cls(model: Any, h: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, model.classifier(h[:, None, :]))  # RobertaClassificationHead reads position 0


def _distilbert_cls(model: Any, h: torch.Tensor) -> torch.Tensor:
    pooled = torch.relu(model.pre_classifier(h))
    return cast(torch.Tensor, model.classifier(model.dropout(pooled)))


def _lm(model: Any, h: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, model.get_output_embeddings()(h))


def _bart_lm(model: Any, h: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, model.lm_head(h) + model.final_logits_bias[0].to(h.dtype))


def _t5_lm(model: Any, h: torch.Tensor) -> torch.Tensor:
    # T5 rescales decoder outputs before a tied LM head (transformers' scale_decoder_outputs)
    if getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings):
        h = h * (model.model_dim**-0.5)
    return cast(torch.Tensor, model.lm_head(h))


HEADS: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "bert_cls": _bert_cls,
    "roberta_cls": _roberta_cls,
    "distilbert_cls": _distilbert_cls,
    "lm": _lm,
    "bart_lm": _bart_lm,
    "t5_lm": _t5_lm,
}


# ---------------------------------------------------------------------------------------------


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted path; integer parts (also negative) index ModuleLists."""
    module: nn.Module = root
    if not path:
        return module
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            module = module[int(part)]  # type: ignore[index]
        else:
            module = getattr(module, part)
    return module


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear or GPT-2 Conv1D, decided by the layer's type, never by shape."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])  # Conv1D stores [in, out]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return None


def resolve_spec(model_type: str, override: Mapping[str, Any] | None = None) -> ArchSpec:
    """The table row for `model_type`, with explicit fields from `override` replacing it."""
    override = dict(override or {})
    unknown = set(override) - {f.name for f in fields(ArchSpec)}
    if unknown:
        raise ArchError(f"unknown `[model] arch` field(s) {sorted(unknown)}; {SETTING_HINT}")
    row = ARCH_TABLE.get(model_type)
    if row is None:
        missing = [f.name for f in fields(ArchSpec) if f.name not in override]
        if missing:
            raise ArchError(
                f"model_type {model_type!r} is not in patchd's architecture table "
                f"({', '.join(sorted(ARCH_TABLE))}); {SETTING_HINT}"
            )
        spec = ArchSpec(**override)
    else:
        spec = replace(row, **override)
    if spec.head not in HEADS:
        raise ArchError(f"unknown head {spec.head!r} (known: {', '.join(HEADS)}); {SETTING_HINT}")
    return spec


@dataclass
class FFNSite:
    """The resolved modules of one model's patched layer (see the module docstring)."""

    model: nn.Module
    spec: ArchSpec
    layer_index: int
    layer: nn.Module
    ffn_in: nn.Module
    ffn_out_parent: nn.Module
    ffn_out_name: str
    residual_in: nn.Module | None
    post_norm: nn.Module | None
    final_norm: nn.Module | None
    hidden_size: int
    layers: int = 0  # layers in the stack; 0 = unknown (the site is taken to be the last)

    @property
    def last(self) -> bool:
        """The site is the last layer's FFN: its output reaches each position's logits alone.
        Below it, attention carries a patch at one position into every later one."""
        return self.layers == 0 or self.layer_index == self.layers - 1

    @property
    def ffn_out(self) -> nn.Module:
        return cast(nn.Module, getattr(self.ffn_out_parent, self.ffn_out_name))

    @property
    def head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        fn = HEADS[self.spec.head]
        return lambda h: fn(self.model, h)


def locate(model: nn.Module, override: Mapping[str, Any] | None = None, layer: int = -1) -> FFNSite:
    """Resolve the table row against a loaded model; every path is checked before anything changes.

    `layer`: the patched layer's index in the stack (negative counts from the end; -1, the last, is
    the daemon's site; a lower one is `patchd evaluate --site-depth`, patching/eval/deepsite.py)."""
    config: Any = model.config  # a transformers config: model_type, hidden_size are not typed attributes
    spec = resolve_spec(config.model_type, override)
    base = cast(nn.Module, model.base_model)

    def find(root: nn.Module, path: str, what: str) -> nn.Module:
        try:
            return get_module(root, path)
        except (AttributeError, IndexError, TypeError) as exc:
            raise ArchError(
                f"{what} path {path!r} does not exist in {type(model).__name__} "
                f"(model_type {config.model_type!r}); {SETTING_HINT}"
            ) from exc

    layers = find(base, spec.layers, "layers")
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ArchError(f"layers path {spec.layers!r} is not a non-empty ModuleList; {SETTING_HINT}")
    if not -len(layers) <= layer < len(layers):
        raise ArchError(f"layer {layer} is outside the stack of {len(layers)} layers")
    index = layer % len(layers)
    layer_module = layers[index]
    ffn_in = find(layer_module, spec.ffn_in, "ffn_in")
    parent_path, _, out_name = spec.ffn_out.rpartition(".")
    parent = find(layer_module, parent_path, "ffn_out")
    find(parent, out_name, "ffn_out")
    hidden = int(config.hidden_size)
    feats = linear_features(getattr(parent, out_name))
    if feats is not None and feats[1] != hidden:
        raise ArchError(f"ffn_out {spec.ffn_out!r} outputs {feats[1]} features, expected {hidden}")
    return FFNSite(
        model=model,
        spec=spec,
        layer_index=index,
        layer=layer_module,
        ffn_in=ffn_in,
        ffn_out_parent=parent,
        ffn_out_name=out_name,
        residual_in=find(layer_module, spec.residual_in, "residual_in") if spec.residual_in else None,
        post_norm=find(layer_module, spec.post_norm, "post_norm") if spec.post_norm else None,
        final_norm=find(base, spec.final_norm, "final_norm") if spec.final_norm else None,
        hidden_size=hidden,
        layers=len(layers),
    )


def tail_logits(site: FFNSite, ffn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Logits from the patched layer's FFN output and residual, position by position.

    ffn_out, residual: [N, d] (any leading shape works) -> logits [N, C].
    This is the rest of the last layer (residual add, post-LN norm), the final norm and the head:
    all a training step has to run.
    """
    h = residual + ffn_out
    if site.post_norm is not None:
        h = site.post_norm(h)
    if site.final_norm is not None:
        h = site.final_norm(h)
    return site.head(h)
