"""Does a key whitened against paraphrase variation (LDA within-class scatter) generalise better?
Independent single edits on the unpatched base; GR by teacher forcing on the held-apart rephrase."""
import json, statistics, sys, time
import torch
from patching.bases import load_base
from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher, split_equivalents
from patching.evaldata import load_eval_data
from patching.layer import activate
from patching.tasks import TaskAdapter
from patching.trainer import Objective, train_cached
from patching import gate as gating
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
base, N, lams = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3].split(",")]
data = load_eval_data("zsre", None, seed=0)
lb = load_base(base); ad = TaskAdapter(lb)
p = Patcher(lb.model, train=TrainConfig(activation="relu"), gate=GateConfig())  # relu: the default when these numbers were made
p = ad.patcher(p, [e.input for e in data.memory], [e.input for e in data.heldout], progress=False)
M = p.memory.view(); cfg = p.train_cfg
t = time.time()
# paraphrase-variation pairs: edits 400.. (disjoint from the probed first N), edit vs its mined train equivalents
D = []
for ex in data.edits[400:400 + int(sys.argv[5]) if len(sys.argv) > 5 else 700]:
    if not ex.train_equivalents: continue
    et, extra = split_equivalents(p.cache(ad.edit(ex.input, ex.target, ex.train_equivalents)))
    K = extra.rows // et.rows
    D.append((et.q.repeat(K, 1) - extra.q).float())
D = torch.cat(D); print("pairs rows", D.shape, round(time.time() - t), "s", flush=True)
Spara = D.T @ D / D.shape[0]
mu = M.float().mean(0); X = M.float() - mu
Smem = X.T @ X / (X.shape[0] - 1)
print("trace mem", float(Smem.trace()), "trace para", float(Spara.trace()), flush=True)
answers = ad.base_predict([e.input for e in data.edits])
items = []
for ex, a in zip(data.edits, answers):
    if len(items) >= N: break
    if ad.right(a, ex.target) or not ex.equivalents: continue
    et = p.cache(ad.edit(ex.input, ex.target)); pets = [p.cache(ad.edit(q, ex.target)) for q in ex.equivalents]
    items.append((et, pets))
print("items", len(items), flush=True)
eye = torch.eye(M.shape[1])
for lam in lams:
    S = Smem + lam * Spara * (Smem.trace() / Spara.trace())
    P = torch.linalg.inv(S + 1e-2 * S.diagonal().mean() * eye)
    wh = (mu.to(M.dtype), P.to(M.dtype))
    res = []; t = time.time()
    for et, pets in items:
        anchors = p.anchors(et)
        obj = Objective.from_config(cfg, True)
        r = train_cached(et, anchors, M, p.tail, cfg, obj, cfg.activation, 0, whiten=wh, fast=p.fast_tail)
        nr = r.neurons
        def right(x):
            pre = x.q @ nr.keys.T + nr.biases
            out = x.ffn + activate(pre, cfg.activation) @ nr.values
            return bool((p.tail(out, x.residual).argmax(-1) == x.targets).all()), pre
        sr, _ = right(et)
        g = [right(x)[0] for x in pets]
        ratio = [float(right(x)[1][anchors, torch.arange(len(anchors))].min()) for x in pets if x.rows == et.rows]
        v = gating.check(nr, cfg.activation, et, None, p.heldout, p.tail, GateConfig())
        res.append(dict(sr=sr, gr=sum(g) / len(g), passed=v.passed, changed=v.changed, steps=r.steps, ratio=ratio[0] if ratio else None))
    n = len(res); ok = [x for x in res if x["passed"]]
    print(f"lam {lam}: SR {sum(x['sr'] for x in res)/n:.2f} GR {sum(x['gr'] for x in res)/n:.2f} pass {len(ok)/n:.2f} "
          f"GR|pass {sum(x['gr'] for x in ok)/max(1,len(ok)):.2f} changed_mean {statistics.fmean(x['changed'] for x in res):.2f} "
          f"ratio_med {statistics.median([x['ratio'] for x in res if x['ratio'] is not None]):.2f} steps_med {statistics.median(x['steps'] for x in res)} {time.time()-t:.0f}s", flush=True)
