import os, sys, time, json, torch
from dataclasses import replace
from patching.bases import load_base
from patching.datasets import load_task
from patching.tasks import TaskAdapter
from patching.engine import Patcher
from patching.config import TrainConfig, GateConfig
from patching.trainer import Objective, train_cached
from patching.layer import activate
from patching import gate as gating
torch.set_num_threads(1)
lb = load_base("zsre-smollm2"); sp = load_task("zsre"); ad = TaskAdapter(lb)
p = Patcher(lb.model, train=TrainConfig(), gate=GateConfig())
ad.patcher(p, [e.input for e in sp.memory], [e.input for e in sp.heldout], progress=False)
N = int(sys.argv[1])
items = []
t = time.time()
for ex in sp.edit[:N]:
    if not ex.equivalents: continue
    et = p.cache(ad.edit(ex.input, ex.target))
    pets = [p.cache(ad.edit(q, ex.target)) for q in ex.equivalents]
    items.append((ex, et, pets))
print("cached", len(items), time.time() - t, flush=True)
torch.save([(ex.input, ex.target, list(ex.equivalents), vars(et), [vars(x) for x in pets]) for ex, et, pets in items], sys.argv[2] if len(sys.argv) > 2 else f"zsre-items{N}.pt")
