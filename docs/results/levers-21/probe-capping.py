"""Are the trained prefixes right under the relu as trained, and wrong only once capped?
Run from the repository root: python docs/results/levers-21/probe-capping.py 25 (stopped at 16 edits)."""
import json, sys, torch
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.eval.evaldata import load_eval_data
from patching.augment import augment_prefixes, with_context
from patching.engine import Patcher
from patching.layer import neuron_output
from patching.config import TrainConfig, GateConfig
torch.set_num_threads(1)
N = int(sys.argv[1])
train = TrainConfig()
data = load_eval_data("zsre"); lb = load_base("zsre-smollm2"); ad = TaskAdapter(lb)
prefixes = augment_prefixes(ad, [m.input for m in data.memory], 10)
stream = ad.mistakes(data.edits, limit=N, base=True)
for i, ex in enumerate(stream):
    p = ad.patcher(Patcher(lb.model, train=train, gate=GateConfig()), [e.input for e in data.memory], [e.input for e in data.heldout], progress=False)
    res = p.edit(ad.edit(ex.input, ex.target, [with_context(c, ex.input) for c in prefixes]), str(i))
    if res.status != "accepted":
        print(json.dumps({"i": i, "status": res.status})); p.detach(); continue
    run, relu = res.proposal.neurons, res.proposal.train.neurons
    rec = {"i": i, "sat": res.proposal.saturation, "success": res.proposal.train.success, "kept": res.proposal.train.equivalents, "steps": res.proposal.train.steps, "relu_tf": [], "run_tf": []}
    for c in prefixes:
        et = p.cache(ad.edit(with_context(c, ex.input), ex.target))
        base_ffn = et.ffn - neuron_output(et.q, run.keys, run.biases, run.values, "relu-cap")
        rec["run_tf"].append(bool((p.tail(et.ffn, et.residual).argmax(-1) == et.targets).all()))
        rec["relu_tf"].append(bool((p.tail(base_ffn + neuron_output(et.q, relu.keys, relu.biases, relu.values, "relu"), et.residual).argmax(-1) == et.targets).all()))
    rec["relu_tf"], rec["run_tf"] = sum(rec["relu_tf"]), sum(rec["run_tf"])
    print(json.dumps(rec), flush=True); p.detach()
