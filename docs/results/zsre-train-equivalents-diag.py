"""Independent zsRE edits with train equivalents: why does a held paraphrase stay wrong?"""
import json
import statistics
import sys

import torch

torch.set_num_threads(1)
from patching.bases import load_base
from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher, split_equivalents
from patching.evaldata import load_eval_data
from patching.tasks import TaskAdapter

N=int(sys.argv[1]); tag=sys.argv[2]
data=load_eval_data("zsre", None, seed=0)
lb=load_base("zsre-smollm2"); ad=TaskAdapter(lb)
p=Patcher(lb.model, train=TrainConfig(seed=0, activation="relu"), gate=GateConfig())  # relu: the default then
p=ad.patcher(p,[e.input for e in data.memory],[e.input for e in data.heldout], progress=False)
stream=ad.mistakes(data.edits, limit=N, progress=False)
out=[]
for i,ex in enumerate(stream):
    if not ex.equivalents: continue
    cp=p.checkpoint()
    o=p.edit(ad.edit(ex.input, ex.target, ex.train_equivalents), str(i))
    if o.status!="accepted": p.rollback(cp); print(i,o.status); continue
    nr=o.proposal.neurons
    para=ex.equivalents[0]
    pred=ad.predict([para])[0]
    g=ad.right(pred, ex.target)
    # teacher-forced rows of the paraphrase on the patched model (cache runs the current model)
    et,_=split_equivalents(p.cache(ad.edit(para, ex.target)))
    tf=p.is_right(et)
    # activations of the new neurons at the edit's and the paraphrase's rows
    pe=(o.proposal.edit.q @ nr.keys.T + nr.biases)
    pp=(et.q @ nr.keys.T + nr.biases)
    # per-neuron: activation at its anchor row on the edit vs the same row on the para
    anc=(o.proposal.edit.targets.new_tensor(range(o.proposal.edit.rows)))
    ae=pe.max(0).values; ap=pp.max(0).values if pp.shape[0] else torch.zeros_like(ae)
    ratio=float((ap/ae.clamp_min(1e-6)).min())
    row={"i":i,"q":ex.input,"para":para,"target":ex.target,"pred":pred,"gr":g,"tf":tf,"ratio":round(ratio,2),"n":nr.n,"teq":len(ex.train_equivalents)}
    print(json.dumps(row),flush=True); out.append(row)
    p.rollback(cp)
print("GR",statistics.fmean(r["gr"] for r in out),"TF",statistics.fmean(r["tf"] for r in out),
      "GR|teq",statistics.fmean([r["gr"] for r in out if r["teq"]] or [0]))
json.dump(out,open(f"/tmp/gr/diag-{tag}.json","w"))
