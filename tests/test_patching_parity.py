"""The keystone: the cached path gives the same logits as a full forward of the patched model."""

from __future__ import annotations

import pytest
import torch

from patching.arch import tail_logits
from patching.config import TrainConfig
from patching.encode import Encoded, generation_ids
from patching.engine import Patcher
from patching.layer import activate, neuron_output
from tests.fixtures_models import VOCAB, tiny_model


def tiny_batch(model, seed: int = 1) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    if model.config.model_type in ("bert", "roberta", "distilbert"):
        ids = torch.randint(3, VOCAB, (4, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # one padded example
        B = ids.shape[0]
        return Encoded(
            {"input_ids": ids, "attention_mask": mask},
            torch.arange(B),
            torch.zeros(B, dtype=torch.long),
            torch.zeros(B, dtype=torch.long),
        )
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (5, 3, 6)]
    targets = [torch.randint(3, VOCAB, (n,), generator=g) for n in (3, 4, 2)]
    seq2seq = bool(model.config.is_encoder_decoder)
    return generation_ids(
        prompts,
        targets,
        seq2seq=seq2seq,
        pad_id=int(model.config.pad_token_id or 0),
        decoder_start_id=getattr(model.config, "decoder_start_token_id", None),
    )


def full_logits(model, enc: Encoded) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**enc.batch).logits
    if logits.ndim == 2:  # classification: one row per example
        return logits[enc.rows_b]
    return logits[enc.rows_b, enc.rows_t]


def random_neurons(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g) * 0.3,
        torch.randn(n, generator=g) * 0.5,
        torch.randn(n, d, generator=g) * 0.5,
    )


@pytest.mark.parametrize("activation", ["relu", "gelu", "relu-cap"])
@pytest.mark.parametrize("earlier", [0, 1, 50])
def test_cached_path_equals_full_forward(arch_name: str, activation: str, earlier: int) -> None:
    model = tiny_model(arch_name)
    patcher = Patcher(model, train=TrainConfig(activation=activation))
    d = patcher.site.hidden_size
    for i in range(earlier):
        k, b, v = random_neurons(1, d, seed=100 + i)
        patcher.wrapper.add(k, b, v, edit_id=f"e{i}")
    enc = tiny_batch(model)
    cached = patcher.cache(enc)
    # the current model (base + earlier patches) through the cached tail
    assert torch.allclose(tail_logits(patcher.site, cached.ffn, cached.residual), full_logits(model, enc), atol=1e-4)
    # a new neuron evaluated on cached tensors == the full model with that neuron added
    k, b, v = random_neurons(2, d, seed=7)
    new_ffn = cached.ffn + neuron_output(cached.q, k, b, v, activation)
    cached_logits = tail_logits(patcher.site, new_ffn, cached.residual)
    patcher.wrapper.add(k, b, v, edit_id="new")
    assert torch.allclose(cached_logits, full_logits(model, enc), atol=1e-4)
    # and the new neuron really changes something, so the comparison is not vacuous
    patcher.wrapper.remove(["new"])
    assert not torch.allclose(cached_logits, full_logits(model, enc), atol=1e-4)


def test_detach_restores_the_base_exactly(arch_name: str) -> None:
    model = tiny_model(arch_name)
    enc = tiny_batch(model)
    before = full_logits(model, enc)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    patcher = Patcher(model)
    k, b, v = random_neurons(3, patcher.site.hidden_size, seed=3)
    patcher.wrapper.add(k, b, v, edit_id="x")
    assert not torch.equal(full_logits(model, enc), before)
    patcher.detach()
    assert torch.equal(full_logits(model, enc), before)
    after = model.state_dict()
    assert after.keys() == state_before.keys()
    assert all(torch.equal(after[k], state_before[k]) for k in after)


def test_factored_tail_equals_the_plain_tail(arch_name: str) -> None:
    """patching.fasttail: the training loop's logits equal arch.tail_logits (generation heads), with
    norm gains, shifts and biases made non-trivial so every term of the factorisation counts."""
    from patching.fasttail import linear_tail

    model = tiny_model(arch_name)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.add_(torch.randn(model.final_logits_bias.shape, generator=g))
    patcher = Patcher(model)
    tail = linear_tail(patcher.site)
    if patcher.site.spec.kind == "classification":
        assert tail is None
        return
    assert tail is not None
    cached = patcher.cache(tiny_batch(model))
    act = torch.relu(torch.randn(cached.rows, 3, generator=g))
    values = torch.randn(3, patcher.site.hidden_size, generator=g)
    want = tail_logits(patcher.site, cached.ffn + act @ values, cached.residual)
    bound = tail.bind(cached.ffn, cached.residual)
    assert torch.allclose(bound(act, values), want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(bound.select(torch.tensor([2, 0]))(act[[2, 0]], values), want[[2, 0]], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(bound(act * 0, values), want, atol=1e-3)  # the neurons' term counts


def _close_bf16(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to bfloat16 rounding: 8 bits of mantissa (relative 2^-8 ~ 0.4 %) at each of the
    few operations after the patched layer, scaled by the logits' own size."""
    scale = float(b.abs().max()) + 1e-6
    return bool(((a.float() - b.float()).abs() <= 0.04 * scale).all())


@pytest.mark.parametrize("activation", ["relu", "relu-cap"])
def test_cached_path_equals_full_forward_in_bfloat16(arch_name: str, activation: str) -> None:
    """A bfloat16 model: the cached path (tensors cast up to float32, float32 neurons, the model's
    own tail in bfloat16) equals the full bfloat16 forward within bfloat16 rounding."""
    model = tiny_model(arch_name).to(torch.bfloat16)
    patcher = Patcher(model, train=TrainConfig(activation=activation))
    d = patcher.site.hidden_size
    for i in range(3):
        k, b, v = random_neurons(1, d, seed=100 + i)
        patcher.wrapper.add(k, b, v, edit_id=f"e{i}")
    assert patcher.wrapper.keys.dtype == torch.float32  # neurons stay float32 in a bfloat16 model
    enc = tiny_batch(model)
    cached = patcher.cache(enc)
    assert cached.q.dtype == cached.ffn.dtype == cached.residual.dtype == torch.float32
    assert _close_bf16(patcher.tail(cached.ffn, cached.residual), full_logits(model, enc))
    k, b, v = random_neurons(2, d, seed=7)
    cached_logits = patcher.tail(cached.ffn + neuron_output(cached.q, k, b, v, activation), cached.residual)
    patcher.wrapper.add(k, b, v, edit_id="new")
    full = full_logits(model, enc)
    assert full.dtype == torch.bfloat16 and _close_bf16(cached_logits, full)
    patcher.wrapper.remove(["new"])
    assert not _close_bf16(cached_logits, full_logits(model, enc))  # the new neurons count
    # the factored tail of the training loop (float32 parameters) agrees too
    if patcher.fast_tail is not None:
        act = activate(cached.q @ k.T + b, activation)
        assert _close_bf16(patcher.fast_tail.bind(cached.ffn, cached.residual)(act, v), cached_logits)
