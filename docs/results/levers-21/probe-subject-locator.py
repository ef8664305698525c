"""Probe (levers-21.md, "Where the subject locator lands"): which prompt token each locator rule picks
for the first 40 mistakes of a report, beside the dataset's subject. Rules: cur = the lowest max cosine
to any memory row (the first locator); kN = the lowest cosine to the N-th most similar memory
sequence; df = the token in the fewest memory texts; xF = kN=4 among the memory texts that do not
hold the token, tokens in more than F of the texts skipped (x0.005 is patching/subject.locate_token; x0.02 was, before).

    python docs/results/levers-21/probe-subject-locator.py zsre \
        docs/results/levers-21/evaluate-zsre-40-subject.json > out.jsonl
"""
import json, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, ".")  # run from the repository root
sys.path.insert(0, "docs/results/levers-21")
from probe_subjects import subjects_of
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.engine import Patcher
from patching.config import GateConfig
from patching.eval.evaldata import load_eval_data
from daemon.cli.evaluate import _patch_settings

torch.set_num_threads(1)
task = sys.argv[1]
report = sys.argv[2]
lb = load_base("zsre-smollm2", dtype=torch.float32)
ad = TaskAdapter(lb)
data = load_eval_data(task, None, seed=0)
train, gate = _patch_settings(["trainer.subject_key=true"])
p = Patcher(lb.model, train=train, gate=gate)
t0 = time.time()
p.build_memory(ad.memory_batches([e.input for e in data.memory], progress=False))
print("memory", time.time() - t0, flush=True)
bank = p.subject.memory
rows = bank.rows()
seq_of = torch.repeat_interleave(torch.arange(len(bank.lengths)), torch.tensor(bank.lengths))
ids_of_seq = []  # token ids of each memory sequence
row_ids = []
for e in ad.memory_batches([e.input for e in data.memory], progress=False):
    for pr in e.prompts:
        ids_of_seq.append(set(pr.tolist()))
        row_ids.append(pr)
row_ids = torch.cat(row_ids)
assert row_ids.numel() == rows.shape[0], (row_ids.numel(), rows.shape)
S_ = len(bank.lengths)
has = {}

subjects = subjects_of(task)
rep = json.load(open(report))["rows"]
tok = lb.tokenizer
S = len(bank.lengths)
unit_mem = F.normalize(rows, dim=1)
out = []
for r in rep[:40]:
    enc = ad.edit(r["input"], r["target"])
    et, seqs = p._capture(enc)
    prompt = enc.prompts[0]
    g = seqs.g[0, : prompt.numel()]
    unit = F.normalize(g[1:].float(), dim=1)
    sims = unit @ unit_mem.T  # [P-1, rows]
    cur = 1 + int(sims.amax(1).argmin())
    per_seq = torch.full((unit.shape[0], S), -2.0).scatter_reduce(1, seq_of.expand(unit.shape[0], -1), sims, "amax")
    res = {"i": r["i"], "gr": r["gr"], "cur": tok.decode(prompt[cur])}
    for k in (2, 4, 8):
        kth = per_seq.topk(k, 1).values[:, -1]
        res[f"k{k}"] = tok.decode(prompt[1 + int(kth.argmin())])
    # document frequency of each prompt token in memory
    df = [sum(int(t) in s for s in ids_of_seq) for t in prompt[1:].tolist()]
    res["df"] = tok.decode(prompt[1 + int(torch.tensor(df).argmin())])
    toks = prompt[1:]
    for thr in (0.005, 0.02):
        best, pick = 9.0, 0
        for j, tkn in enumerate(toks.tolist()):
            if df[j] > thr * S:
                continue
            seq_has = torch.zeros(S, dtype=torch.bool)
            seq_has[seq_of[row_ids == tkn]] = True
            vals = per_seq[j][~seq_has]
            v = float(vals.topk(4).values[-1])
            if v < best:
                best, pick = v, j
        res[f"x{thr}"] = tok.decode(prompt[1 + pick])
    res["subject"] = subjects.get(r["input"], "")
    res["text"] = tok.decode(prompt)
    out.append(res)
    print(json.dumps(res), flush=True)
