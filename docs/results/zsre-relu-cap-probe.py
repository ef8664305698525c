"""clip.py with train equivalents, and a fallback to the plain relu neuron when the clipped one fails the gate."""
import os, statistics, sys
import torch
from patching.bases import load_base
from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher, split_equivalents
from patching.evaldata import load_eval_data
from patching.tasks import TaskAdapter
from patching.trainer import Objective, train_cached, Neurons
from patching import gate as gating
import patching.gate
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
base, N, scales, teq = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3].split(",")], sys.argv[4] == "teq"
data = load_eval_data("zsre", None, seed=0)
lb = load_base(base); ad = TaskAdapter(lb)
p = Patcher(lb.model, train=TrainConfig(activation="relu"), gate=GateConfig())  # relu: the default when these numbers were made
p = ad.patcher(p, [e.input for e in data.memory], [e.input for e in data.heldout], progress=False)
M = p.memory.view(); cfg = p.train_cfg
orig = patching.gate.activate
patching.gate.activate = lambda pre, a: pre.clamp(0, 1) if a == "clip" else orig(pre, a)
answers = ad.base_predict([e.input for e in data.edits])
trained = []
for ex, a in zip(data.edits, answers):
    if len(trained) >= N: break
    if ad.right(a, ex.target) or not ex.equivalents: continue
    et, extra = split_equivalents(p.cache(ad.edit(ex.input, ex.target, ex.train_equivalents if teq else ())))
    pets = [p.cache(ad.edit(q, ex.target)) for q in ex.equivalents]
    anchors = p.anchors(et, 0, extra)
    r = train_cached(et, anchors, M, p.tail, cfg, Objective.from_config(cfg, True), cfg.activation, 0,
                     whiten=p.whitening(), extra=extra, fast=p.fast_tail)
    trained.append((et, pets, anchors, r.neurons))
print("trained", len(trained), flush=True)
def evaluate(et, pets, anchors, nr, s):
    a_e = torch.relu(et.q[anchors] @ nr.keys.T + nr.biases).diagonal().clamp_min(1e-6)
    n2, act = (nr, "relu") if s == 0 else (Neurons(nr.keys * (s / a_e)[:, None], nr.biases * s / a_e, nr.values * a_e[:, None]), "clip")
    def right(x):
        out = x.ffn + patching.gate.activate(x.q @ n2.keys.T + n2.biases, act) @ n2.values
        return bool((p.tail(out, x.residual).argmax(-1) == x.targets).all())
    v = gating.check(n2, act, et, None, p.heldout, p.tail, GateConfig())
    return dict(sr=right(et), gr=statistics.fmean(right(x) for x in pets), passed=v.passed, changed=v.changed)
for s in scales:
    res = []; fb = []
    for t in trained:
        r0 = evaluate(*t, 0); r = evaluate(*t, s)
        res.append(r); fb.append(r if r["passed"] else r0)
    for name, rr in (("clip", res), ("clip+fallback", fb)):
        n = len(rr); ok = [x for x in rr if x["passed"]]
        print(f"teq {teq} scale {s} {name}: SR {sum(x['sr'] for x in rr)/n:.2f} GR {sum(x['gr'] for x in rr)/n:.2f} pass {len(ok)/n:.2f} "
              f"GR|pass {sum(x['gr'] for x in ok)/max(1, len(ok)):.2f} changed_mean {statistics.fmean(x['changed'] for x in rr):.2f}", flush=True)
