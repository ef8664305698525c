"""Device discipline in the edit loop, checked on a CPU: nothing is created on an implicit device,
and the training loop copies nothing to the host per step.

On a GPU a tensor made without `device=` lands on the CPU, and every `.item()`, `float(t)`,
`bool(t)` or `.tolist()` waits for the GPU. Here the default device is set to "meta" while an edit
trains and is gated: a tensor created without an explicit device becomes a meta tensor and the
first arithmetic with a real one fails. Host copies made by patchd's code are counted by
wrapping the Tensor methods that make them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher
from patching.trainer import train_cached
from tests.fixtures_models import tiny_model
from tests.test_patching_parity import tiny_batch


@contextmanager
def host_copies() -> Iterator[list[str]]:
    """Count the Tensor -> Python conversions (each a GPU sync) made inside the block."""
    calls: list[str] = []
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name: str):  # noqa: ANN202 - a wrapper of any of the five
        original = saved[name]

        def wrapped(self: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            # patchd's own code only: torch's Adam reads its step count with .item(), but keeps that
            # count on the CPU unless capturable, so it is no GPU sync
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}patching{os.sep}" in caller:
                calls.append(name)
            return original(self, *args, **kwargs)

        return wrapped

    for name in names:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _patcher(model_type: str) -> tuple[Patcher, object]:
    model = tiny_model(model_type)
    patcher = Patcher(model, train=TrainConfig(max_steps=60), gate=GateConfig())
    patcher.build_memory([tiny_batch(model, seed=s) for s in range(2, 6)])
    patcher.build_heldout([tiny_batch(model, seed=s) for s in range(6, 9)])
    edit = patcher.cache(tiny_batch(model, seed=1))
    one = edit.group == 0  # the first example of the batch is the edit
    from patching.trainer import EditTensors

    et = EditTensors(edit.q[one], edit.ffn[one], edit.residual[one], edit.targets[one], group=edit.group[one])
    # a real mistake: every row asks for a token (label) the model does not predict now
    predicted = patcher.tail(et.ffn, et.residual).argmax(-1)
    n_out = patcher.tail(et.ffn[:1], et.residual[:1]).shape[-1]
    return patcher, replace(et, targets=(predicted + 1) % n_out)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_an_edit_creates_no_tensor_on_an_implicit_device(model_type: str) -> None:
    patcher, et = _patcher(model_type)
    cp = patcher.checkpoint()
    expected = patcher.propose(et, edit_id="x")
    patcher.rollback(cp)
    with torch.device("meta"):  # any tensor made without device= is a meta tensor in here
        proposal = patcher.propose(et, edit_id="x")
    assert (proposal is None) == (expected is None)
    if proposal is not None and expected is not None:
        assert proposal.neurons.keys.device.type == "cpu"
        assert proposal.accepted == expected.accepted and proposal.train.steps == expected.train.steps
        assert torch.equal(proposal.neurons.keys, expected.neurons.keys)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_the_training_loop_copies_nothing_to_the_host_per_step(model_type: str) -> None:
    patcher, et = _patcher(model_type)
    anchors = patcher.anchors(et)
    counts = {}
    for steps in (10, 40):
        cfg = replace(patcher.train_cfg, max_steps=steps, fixed_steps=True)
        with host_copies() as calls:
            train_cached(et, anchors, patcher.memory.view(), patcher.tail, cfg, _objective(patcher), "relu")
        counts[steps] = len(calls)
    # the same few conversions (init, the one final check) whether 10 or 40 steps run
    assert counts[10] == counts[40], counts
    # with the stop rule checked every 5 steps: one host copy per check (of all its numbers at once)
    cfg = replace(patcher.train_cfg, max_steps=40, fixed_steps=False, check_every=5, stall_steps=0)
    with host_copies() as calls:
        result = train_cached(et, anchors, patcher.memory.view(), patcher.tail, cfg, _objective(patcher), "relu")
    checks = result.steps // 5 + 1
    assert calls.count("tolist") <= checks + 1 and len(calls) <= counts[10] + 2 * checks, (calls, result.steps)


def _objective(patcher: Patcher):  # noqa: ANN202
    from patching.trainer import Objective

    return Objective.from_config(patcher.train_cfg, patcher.generation, 1.0)
