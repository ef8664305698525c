import os, sys, time, json, torch, statistics
from dataclasses import replace
from patching.bases import load_base
from patching.datasets import load_task
from patching.tasks import TaskAdapter
from patching.engine import Patcher
from patching.config import TrainConfig, GateConfig
from patching.trainer import Objective, train_cached, EditTensors
from patching.layer import activate
from patching import gate as gating
torch.set_num_threads(1)
lb = load_base("zsre-smollm2"); sp = load_task("zsre"); ad = TaskAdapter(lb)
p = Patcher(lb.model, train=TrainConfig(activation="relu"), gate=GateConfig())  # relu: the default when these numbers were made
ad.patcher(p, [e.input for e in sp.memory], [e.input for e in sp.heldout], progress=False)
items = torch.load(sys.argv[1])
configs = json.loads(sys.argv[2])
M = p.memory.view()
RIDGE = {}
for c in configs:
    r_ = c.pop('ridge', None)
    RIDGE[json.dumps(c)] = r_
    cfg = replace(TrainConfig(activation="relu"), max_steps=150, **c)  # relu: the default then
    p.train_cfg = cfg
    ridge = c.pop("ridge", None) if False else None
    p._whiten = None
    wh = p.whitening()
    if RIDGE.get(json.dumps(c)) is not None:
        from patching.init import whitening
        wh = whitening(M[: p._memory_base], RIDGE[json.dumps(c)])
    res = []
    t = time.time()
    for inp, tgt, eqs, etd, petds in items:
        et = EditTensors(**etd); pets = [EditTensors(**d) for d in petds]
        anchors = p.anchors(et)
        obj = Objective.from_config(cfg, True)
        r = train_cached(et, anchors, M, p.tail, cfg, obj, cfg.activation, 0, whiten=wh)
        nr = r.neurons
        def right(x):
            pre = x.q @ nr.keys.T + nr.biases
            out = x.ffn + activate(pre, cfg.activation) @ nr.values
            return bool((p.tail(out, x.residual).argmax(-1) == x.targets).all()), pre
        sr, _ = right(et)
        g = []; ratios = []
        for x in pets:
            ok, pre = right(x)
            g.append(ok)
            if x.rows == et.rows:
                ratios.append(float(pre[anchors, torch.arange(len(anchors))].min()))
        v = gating.check(nr, cfg.activation, et, None, p.heldout, p.tail, GateConfig())
        mm = float((M @ nr.keys.T + nr.biases).max())
        res.append(dict(sr=sr, gr=sum(g)/len(g), ratio=min(ratios) if ratios else None, changed=v.changed, steps=r.steps, mmax=mm, passed=v.passed))
    n = len(res)
    rat = [x["ratio"] for x in res if x["ratio"] is not None]
    print(json.dumps(c), "ridge", RIDGE[json.dumps(c)], f"SR {sum(x['sr'] for x in res)/n:.2f} GR {sum(x['gr'] for x in res)/n:.2f} pass {sum(x['passed'] for x in res)/n:.2f} "
          f"GR|pass {sum(x['gr'] for x in res if x['passed'])/max(1,sum(x['passed'] for x in res)):.2f} changed_mean {statistics.fmean(x['changed'] for x in res):.2f} "
          f"ratio_med {statistics.median(rat):.2f} mmax_med {statistics.median(x['mmax'] for x in res):.2f} steps_med {statistics.median(x['steps'] for x in res)} {time.time()-t:.0f}s", flush=True)
