"""Probe (levers-21.md, "What subject neurons cost at inference"): the serving forward of
zsre-smollm2 with N random relu-cap neurons, plain or with subject detectors (4 neurons per edit
sharing one detector, as the engine writes them), against the base, on fixed batches of 1 and 16
held-out questions in generate()'s prefill form; alternating rounds, median of 12. Kind
"distinct" gives every neuron its own detector: what every subject neuron cost before the layer
scored each distinct detector once (layer.PatchedFFN.detectors).

    OMP_NUM_THREADS=1 python docs/results/levers-21/probe-subject-overhead.py 1000,10000 > out.json
"""
import json, sys
import torch
sys.path.insert(0, ".")  # run from the repository root
from patching.bases.datasets import load_task
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.config import TrainConfig
from patching.engine import Patcher
from patching.eval.timing import alternating

torch.set_num_threads(1)
sizes = [int(x) for x in sys.argv[1].split(",")]
lb = load_base("zsre-smollm2", dtype=torch.float32)
ad = TaskAdapter(lb)
questions = [e.input for e in load_task("zsre").heldout[:16]]
patcher = Patcher(lb.model, train=TrainConfig(subject_key=True))
wrapper, net = patcher.wrapper, lb.model
d, d_s = patcher.site.hidden_size, patcher.subject.site.hidden_size
g = torch.Generator().manual_seed(0)
batches = {b: ad.serving_batch(questions[:b]) for b in (1, 16)}
for n in sizes:
    for kind in ("plain", "subject", "distinct"):
        wrapper.clear()
        edits = n // 4
        # silent almost everywhere: a bias well below the keys' reach
        keys = torch.randn(4 * edits, d, generator=g) / d**0.5
        values = torch.randn(4 * edits, d, generator=g) * 0.01
        biases = torch.full((4 * edits,), -50.0)
        wrapper.restore(keys, biases, values, [f"e{e}" for e in range(edits) for _ in range(4)])
        if kind != "plain":  # one detector per edit, repeated for its 4 neurons
            w = (torch.randn(edits, d_s, generator=g) / d_s**0.5).repeat_interleave(4, 0)
            if kind == "distinct":
                w = w + 1e-6 * torch.randn(w.shape, generator=g)
            wrapper.restore_subject((w, torch.full((4 * edits,), -3.0), torch.full((4 * edits,), 0.5)))
        out = {"neurons": wrapper.n, "kind": kind}
        for b, batch in batches.items():
            p, q, _ = alternating(lambda: net(**batch).logits, wrapper.without_neurons, 12)
            out[f"overhead_b{b}"] = round(p / q - 1, 4)
            out[f"forward_ms_b{b}"] = round(p * 1000, 2)
            out[f"base_forward_ms_b{b}"] = round(q * 1000, 2)
        print(json.dumps(out), flush=True)
