"""A training step's logits without one vocabulary-sized product per row (LM heads).

While neurons train, only their contribution to the patched layer's output changes:
h = x + act @ V, with x = residual + FFN output fixed ([R, d]), act [R, n] and V [n, d]. When the
rest of the model is one norm of the form g * c(h) / r(h) + b (c: centring for LayerNorm, identity
for RMSNorm; r: the row's root mean square after c) and a linear head s * W + bias, the logits are

    s * ((c(x) * g) @ W^T + act @ ((c(V) * g) @ W^T)) / r(h) + (s * b @ W^T + bias)

because c is linear. The [R, vocab] product of the fixed rows is made once per edit; a step then
costs an [n, vocab] product for the n neurons instead of an [R, vocab] one for the R rows
(R = answer tokens x (1 + train equivalents), n <= trainer.max_neurons). SmolLM2, 3-token answer
with 8 train equivalents: ~27 rows against 3 neurons. Equal to arch.tail_logits up to float
rounding (tests/test_patching_parity.py); the gate and every check outside the training loop use
the plain tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from patching.arch import FFNSite

# norms known to compute weight * h * rsqrt(mean(h^2) + eps) exactly (Gemma's 1 + weight does not)
_RMS_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "T5LayerNorm"})


@dataclass(frozen=True)
class LinearTail:
    """The model-wide part: norm and head parameters (views of the model's own tensors)."""

    centre: bool  # LayerNorm subtracts the row mean; RMSNorm does not
    eps: float
    gain: torch.Tensor  # g [d]
    weight: torch.Tensor  # W [vocab, d]
    scale: float  # s (T5 rescales before a tied head)
    const: torch.Tensor | None  # s * b @ W^T + head bias [vocab], None when both are absent

    def bind(self, ffn: torch.Tensor, residual: torch.Tensor) -> BoundTail:
        """The per-edit part for rows ffn, residual [R, d]: one [R, vocab] product, made here."""
        x = residual + ffn
        with torch.no_grad():
            fixed = (self._c(x) * self.gain) @ self.weight.T  # [R, vocab]
        return BoundTail(self, x, fixed)

    def _c(self, t: torch.Tensor) -> torch.Tensor:
        return t - t.mean(-1, keepdim=True) if self.centre else t


@dataclass(frozen=True)
class BoundTail:
    tail: LinearTail
    x: torch.Tensor  # residual + FFN output [R, d]
    fixed: torch.Tensor  # (c(x) * g) @ W^T [R, vocab]

    def __call__(self, act: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Logits [R, vocab] with neurons of activations act [R, n] and values [n, d] added."""
        t = self.tail
        h = self.x + act @ values  # [R, d]
        r = torch.sqrt(t._c(h).pow(2).mean(-1, keepdim=True) + t.eps)  # [R, 1]
        per_neuron = (t._c(values) * t.gain) @ t.weight.T  # [n, vocab]
        logits = (self.fixed + act @ per_neuron) * (t.scale / r)
        return logits if t.const is None else logits + t.const

    def select(self, rows: torch.Tensor) -> BoundTail:
        """The same tail over the given rows only (long [k]; train equivalents dropped)."""
        return BoundTail(self.tail, self.x[rows], self.fixed[rows])


def linear_tail(site: FFNSite) -> LinearTail | None:
    """The factored tail of a generation site, or None where its norm or head is not of the form
    above (classification heads, unknown norms, two norms in a row)."""
    norms = [n for n in (site.post_norm, site.final_norm) if n is not None]
    head = site.spec.head
    if len(norms) != 1 or head not in ("lm", "bart_lm", "t5_lm"):
        return None
    norm = norms[0]
    if isinstance(norm, nn.LayerNorm):
        if norm.weight is None or tuple(norm.normalized_shape) != (site.hidden_size,):
            return None
        centre, eps, gain, shift = True, float(norm.eps), norm.weight, norm.bias
    elif type(norm).__name__ in _RMS_NORMS:
        rms: Any = norm  # a transformers RMSNorm: `variance_epsilon` and `weight` are not typed attributes
        centre, eps, gain, shift = False, float(rms.variance_epsilon), rms.weight, None
    else:
        return None
    model: Any = site.model  # a transformers model: its heads, config and model_dim are not typed attributes
    linear = model.get_output_embeddings() if head == "lm" else model.lm_head
    if not isinstance(linear, nn.Linear):
        return None
    scale = 1.0
    if head == "t5_lm" and getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings):
        scale = float(model.model_dim) ** -0.5
    # float32 like the neurons it serves (a copy only for a bfloat16 / float16 model: [vocab, d])
    weight = linear.weight.detach().float()
    const = linear.bias.detach().float() if linear.bias is not None else None
    if head == "bart_lm":
        bias = model.final_logits_bias[0].detach().float()
        const = bias if const is None else const + bias
    if shift is not None:
        moved = scale * (shift.detach().float() @ weight.T)
        const = moved if const is None else const + moved
    return LinearTail(centre, eps, gain.detach().float(), weight, scale, const)
