"""Do an edit's neurons fire on each other's answer rows, as the layer runs them (capped)?
Single edits, the daemon's defaults, 10 memory prefixes, over the first N zsRE mistakes with
more than one neuron. Run from the repository root: python docs/results/levers-21/probe-cross-rows.py 20"""
import json, sys, torch
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.eval.evaldata import load_eval_data
from patching.eval.contexts import contexts_for
from patching.augment import augment_prefixes, with_context
from patching.engine import Patcher
from patching.config import TrainConfig, GateConfig
torch.set_num_threads(1)
N = int(sys.argv[1])
data = load_eval_data("zsre"); lb = load_base("zsre-smollm2"); ad = TaskAdapter(lb)
prefixes = augment_prefixes(ad, [m.input for m in data.memory], 10)
stream = ad.mistakes(data.edits, limit=N, base=True)
for i, ex in enumerate(stream):
    p = ad.patcher(Patcher(lb.model, train=TrainConfig(), gate=GateConfig()), [e.input for e in data.memory], [e.input for e in data.heldout], progress=False)
    res = p.edit(ad.edit(ex.input, ex.target, [with_context(c, ex.input) for c in prefixes]), str(i))
    if res.status != "accepted" or res.proposal.neurons.n < 2:
        p.detach(); continue
    nr = res.proposal.neurons
    et = p.cache(ad.edit(ex.input, ex.target))
    act = (et.q @ nr.keys.T + nr.biases).clamp(0, 1)  # [R, n] as run
    anchor = act.argmax(0)
    off = torch.ones_like(act, dtype=torch.bool); off[anchor, torch.arange(nr.n)] = False
    rec = {"i": i, "n": nr.n, "R": et.rows, "edit_off_full": int((act[off] >= 0.999).sum()), "edit_off_on": int((act[off] > 0).sum()), "edit_off": int(off.sum()), "ctx": []}
    for c in contexts_for(i, ex.contexts, data.context_pool):
        x = with_context(c, ex.input)
        ec = p.cache(ad.edit(x, ex.target))
        a = (ec.q @ nr.keys.T + nr.biases).clamp(0, 1)
        wrong = (p.tail(ec.ffn, ec.residual).argmax(-1) != ec.targets).nonzero().flatten().tolist()
        rec["ctx"].append({"right": ad.right(ad.predict([x])[0], ex.target), "off_full": int((a[off] >= 0.999).sum()), "off_on": int((a[off] > 0).sum()),
                           "wrong_rows": wrong, "own_act": [float(a[r][anchor == r].max()) if bool((anchor == r).any()) else None for r in wrong],
                           "others_act": [float(a[r][anchor != r].sum()) for r in wrong]})
    print(json.dumps(rec), flush=True); p.detach()
