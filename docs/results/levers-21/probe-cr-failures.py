"""Why does a context-trained edit fail behind a held-out context? (issue 21 failure analysis)
Single edits (fresh patcher each) over the first N zsRE mistakes, 10 memory prefixes, defaults.
Per held-out context: does every neuron reach its full (capped) output at its anchor row, is the
answer right teacher-forced, is it right by greedy decoding.
Run from the repository root: python docs/results/levers-21/probe-cr-failures.py 40 (writes /work/runs/probe/crfail-40.json)."""
import json, sys, torch
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.eval.evaldata import load_eval_data
from patching.eval.contexts import contexts_for
from patching.augment import augment_prefixes, with_context
from patching.engine import Patcher
from patching.config import TrainConfig, GateConfig
torch.set_num_threads(1)
N = int(sys.argv[1]); sets = dict(a.split("=") for a in sys.argv[2:])
train = TrainConfig(**{k: type(getattr(TrainConfig(), k))(v) for k, v in sets.items()})
data = load_eval_data("zsre"); lb = load_base("zsre-smollm2"); ad = TaskAdapter(lb)
prefixes = augment_prefixes(ad, [m.input for m in data.memory], 10)
stream = ad.mistakes(data.edits, limit=N, base=True)
out = []
for i, ex in enumerate(stream):
    p = ad.patcher(Patcher(lb.model, train=train, gate=GateConfig()), [e.input for e in data.memory], [e.input for e in data.heldout], progress=False)
    res = p.edit(ad.edit(ex.input, ex.target, [with_context(c, ex.input) for c in prefixes]), str(i))
    if res.status != "accepted":
        out.append({"i": i, "status": res.status}); p.detach(); continue
    nr = res.proposal.neurons
    def probe(text):
        et = p.cache(ad.edit(text, ex.target))
        pre = et.q @ nr.keys.T + nr.biases  # [R, n]
        tf = (p.tail(et.ffn, et.residual).argmax(-1) == et.targets)
        return pre, tf
    pre_e, _ = probe(ex.input)
    anchor = pre_e.argmax(0)  # [n] row where each neuron peaks on the edit
    cols = torch.arange(pre_e.shape[1])
    rec = {"i": i, "status": "accepted", "sat": res.proposal.saturation, "n": nr.n, "R": int(pre_e.shape[0]), "ctx": [], "train": []}
    for kind, texts in (("ctx", contexts_for(i, ex.contexts, data.context_pool)), ("train", prefixes[:3])):
        for c in texts:
            x = with_context(c, ex.input)
            pre, tf = probe(x)
            right = ad.right(ad.predict([x])[0], ex.target)
            wrong_rows = (~tf).nonzero().flatten().tolist()
            rec[kind].append({"act_min": float(pre[anchor, cols].clamp(0, 1).min()), "pre_ratio_min": float((pre[anchor, cols] / pre_e[anchor, cols]).min()),
                              "tf_all": bool(tf.all()), "tf_share": float(tf.float().mean()), "right": bool(right),
                              # which answer rows are wrong, and whether a neuron peaks there on the edit
                              "wrong_rows": wrong_rows, "wrong_anchored": [r in anchor.tolist() for r in wrong_rows],
                              "wrong_act": [float(pre[r].clamp(0, 1).max()) if pre.shape[1] else 0.0 for r in wrong_rows]})
    out.append(rec); p.detach()
    print(json.dumps(rec), flush=True)
json.dump(out, open(f"/work/runs/probe/crfail-{N}.json", "w"))  # the committed copy: probe-cr-failures-40.json
