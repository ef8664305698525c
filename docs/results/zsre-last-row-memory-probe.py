"""Memory of last-prompt rows only (the rows that produce an answer) vs every prompt position."""
import os, statistics, sys
import torch
from patching import encode
from patching.bases import load_base
from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher
from patching.evaldata import load_eval_data
from patching.tasks import TaskAdapter
from patching.trainer import Objective, train_cached, EditTensors
from patching.layer import activate
from patching import gate as gating
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
base, N, thrs = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3].split(",")]
data = load_eval_data("zsre", None, seed=0)
lb = load_base(base); ad = TaskAdapter(lb)
p = Patcher(lb.model, train=TrainConfig(activation="relu"), gate=GateConfig())  # relu: the default when these numbers were made
p = ad.patcher(p, [e.input for e in data.memory], [e.input for e in data.heldout], progress=False)
M = p.memory.view(); wh = p.whitening()
mem = [e.input for e in data.memory]; last = []
for i in range(0, len(mem), 64):
    enc = encode.generation(lb.tokenizer, [ad.text(x) for x in mem[i:i+64]], ["x"] * len(mem[i:i+64]))
    et = p.cache(enc); first = torch.ones_like(et.group, dtype=torch.bool); first[1:] = et.group[1:] != et.group[:-1]
    last.append(et.q[first])
ML = torch.cat(last); print("memory rows", M.shape[0], "last-prompt rows", ML.shape[0], flush=True)
items = [(EditTensors(**a), [EditTensors(**b) for b in bs]) for a, bs in torch.load(f"/tmp/lda/items-{base}-{N}.pt", weights_only=True)]
from dataclasses import replace
for thr in thrs:
  for name, mm in (("all", M), ("last", ML)):
    cfg = replace(p.train_cfg, init_threshold=thr)
    res = []
    for et, pets in items:
        anchors = p.anchors(et)
        r = train_cached(et, anchors, mm, p.tail, cfg, Objective.from_config(cfg, True), cfg.activation, 0, whiten=wh, fast=p.fast_tail)
        nr = r.neurons
        def right(x):
            out = x.ffn + activate(x.q @ nr.keys.T + nr.biases, "relu") @ nr.values
            return bool((p.tail(out, x.residual).argmax(-1) == x.targets).all())
        v = gating.check(nr, "relu", et, None, p.heldout, p.tail, GateConfig())
        res.append(dict(sr=right(et), gr=statistics.fmean(right(x) for x in pets), passed=v.passed, changed=v.changed, steps=r.steps))
    n = len(res); ok = [x for x in res if x["passed"]]
    print(f"thr {thr} memory {name}: SR {sum(x['sr'] for x in res)/n:.2f} GR {sum(x['gr'] for x in res)/n:.2f} pass {len(ok)/n:.2f} "
          f"GR|pass {sum(x['gr'] for x in ok)/max(1, len(ok)):.2f} changed_mean {statistics.fmean(x['changed'] for x in res):.2f} steps_med {statistics.median(x['steps'] for x in res)}", flush=True)
