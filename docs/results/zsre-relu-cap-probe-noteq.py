"""Saturating patch activation: act = clamp(s * pre / a_e, 0, 1), value * a_e. s = 1 is the edit's own
output everywhere the relu neuron gives <= a_e; s > 1 gives paraphrases (pre >= a_e / s) the edit's full output."""
import os, statistics, sys, time
import torch
from patching.bases import load_base
from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher
from patching.evaldata import load_eval_data
from patching.tasks import TaskAdapter
from patching.trainer import Objective, train_cached, Neurons, EditTensors
from patching import gate as gating
import patching.gate
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
base, N, scales = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3].split(",")]
thr = float(sys.argv[4]) if len(sys.argv) > 4 else None
data = load_eval_data("zsre", None, seed=0)
lb = load_base(base); ad = TaskAdapter(lb)
tc = TrainConfig(activation="relu") if thr is None else TrainConfig(activation="relu", init_threshold=thr)
p = Patcher(lb.model, train=tc, gate=GateConfig())
p = ad.patcher(p, [e.input for e in data.memory], [e.input for e in data.heldout], progress=False)
M = p.memory.view(); cfg = p.train_cfg
path = f"/tmp/lda/items-{base}-{N}.pt"
if os.path.exists(path):
    items = [(EditTensors(**a), [EditTensors(**b) for b in bs]) for a, bs in torch.load(path, weights_only=True)]
else:
    answers = ad.base_predict([e.input for e in data.edits])
    items = []
    for ex, a in zip(data.edits, answers):
        if len(items) >= N: break
        if ad.right(a, ex.target) or not ex.equivalents: continue
        items.append((p.cache(ad.edit(ex.input, ex.target)), [p.cache(ad.edit(q, ex.target)) for q in ex.equivalents]))
    torch.save([(vars(a), [vars(b) for b in bs]) for a, bs in items], path)
print("items", len(items), flush=True)
orig = patching.gate.activate
patching.gate.activate = lambda pre, a: pre.clamp(0, 1) if a == "clip" else orig(pre, a)
trained = []
for et, pets in items:
    anchors = p.anchors(et)
    r = train_cached(et, anchors, M, p.tail, cfg, Objective.from_config(cfg, True), cfg.activation, 0,
                     whiten=p.whitening(), fast=p.fast_tail)
    trained.append((et, pets, anchors, r.neurons))
for s in scales:
    res = []
    for et, pets, anchors, nr in trained:
        a_e = torch.relu(et.q[anchors] @ nr.keys.T + nr.biases).diagonal().clamp_min(1e-6)  # [n]
        if s == 0:
            n2, act = nr, "relu"
        else:
            n2, act = Neurons(nr.keys * (s / a_e)[:, None], nr.biases * s / a_e, nr.values * a_e[:, None]), "clip"
        def right(x):
            out = x.ffn + patching.gate.activate(x.q @ n2.keys.T + n2.biases, act) @ n2.values
            return bool((p.tail(out, x.residual).argmax(-1) == x.targets).all())
        v = gating.check(n2, act, et, None, p.heldout, p.tail, GateConfig())
        res.append(dict(sr=right(et), gr=statistics.fmean(right(x) for x in pets), passed=v.passed, changed=v.changed))
    n = len(res); ok = [x for x in res if x["passed"]]
    print(f"scale {s} ({'relu' if s == 0 else 'clip'}): SR {sum(x['sr'] for x in res)/n:.2f} GR {sum(x['gr'] for x in res)/n:.2f} "
          f"pass {len(ok)/n:.2f} GR|pass {sum(x['gr'] for x in ok)/max(1, len(ok)):.2f} "
          f"changed_mean {statistics.fmean(x['changed'] for x in res):.2f}", flush=True)
