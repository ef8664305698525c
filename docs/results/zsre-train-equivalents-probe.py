"""Sequential zsRE stream probe: first N mistakes, with or without train equivalents; SR and GR (greedy EM).
The base is $PROBE_BASE (default zsre-smollm2)."""
import json
import os
import statistics
import sys
import time

import torch

torch.set_num_threads(1)
from dataclasses import replace

from patching.bases import load_base
from patching.config import GateConfig, TrainConfig
from patching.editors import TPatcherEditor
from patching.engine import Patcher
from patching.evaldata import load_eval_data
from patching.tasks import TaskAdapter

N=int(sys.argv[1]); use=sys.argv[2]=="teq"; tag=sys.argv[3]
extra=dict(a.split("=") for a in sys.argv[4:])
data=load_eval_data("zsre", None, seed=0)
lb=load_base(os.environ.get("PROBE_BASE", "zsre-smollm2"))  # or e.g. zsre-smollm2-qa; ad=TaskAdapter(lb)
cfg=TrainConfig(seed=0, activation="relu")  # relu: the default when these numbers were made
for k,v in extra.items(): cfg=replace(cfg, **{k: type(getattr(cfg,k))(v) if getattr(cfg,k) is not None else float(v)})
p=Patcher(lb.model, train=cfg, gate=GateConfig())
p=ad.patcher(p,[e.input for e in data.memory],[e.input for e in data.heldout], progress=False)
stream=ad.mistakes(data.edits, limit=N, progress=False)
ed=TPatcherEditor(p, ad)
rows=[]
t0=time.time()
for i,ex in enumerate(stream):
    if ad.right(ad.predict([ex.input])[0], ex.target): rows.append({"status":"fixed"}); continue
    rec=ed.edit(ex.input, ex.target, str(i), train_equivalents=ex.train_equivalents if use else ())
    sr=ad.right(ad.predict([ex.input])[0], ex.target)
    gr=[ad.right(x, ex.target) for x in ad.predict(list(ex.equivalents))] if ex.equivalents else []
    rows.append({"status":rec.status,"sr":sr,"gr":sum(gr)/len(gr) if gr else None,"s":rec.seconds,"n":rec.neurons,"teq":len(ex.train_equivalents)})
    print(i, rec.status, sr, rows[-1]["gr"], round(rec.seconds,1), rec.neurons, flush=True)
done=[r for r in rows if "sr" in r]
grs=[r["gr"] for r in done if r["gr"] is not None]
summ={"tag":tag,"n":len(done),"sr":statistics.fmean(r["sr"] for r in done),"gr":statistics.fmean(grs),
 "gr_with_teq":statistics.fmean([r["gr"] for r in done if r["gr"] is not None and r["teq"]] or [0]),
 "rejected":sum(r["status"]=="rejected" for r in done),"neurons":ed.neurons,"median_s":statistics.median(r["s"] for r in done),"wall":time.time()-t0}
print(json.dumps(summ))
json.dump({"summary":summ,"rows":rows}, open(f"/tmp/gr/{tag}.json","w"))
