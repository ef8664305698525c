"""Probe (levers-21.md, "Why the subject key loses zsRE paraphrases"): where the locator lands
beside rules that also use the base's own surprisal at each prompt token, and whether the picked
token is in the edit's paraphrase at all (a detector keyed on a token the paraphrase lacks leaves
m = -1 there, and the neuron silent). Rules, all over positions >= 1:
  x     = patching/subject.locate_token (kN=4 among memory texts without the token, df <= 0.5 %)
  sur   = the most surprising token (-log p under the base, given the tokens before it)
  xs    = the most surprising token among those with df <= 0.5 %
  xtop3 = locate_token's rule among the 3 most surprising tokens with df <= 0.5 %

    python docs/results/levers-21/probe-subject-surprise.py zsre REPORT.json N > out.jsonl
"""
import json, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, ".")  # run from the repository root
sys.path.insert(0, "docs/results/levers-21")
from probe_subjects import subjects_of
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.engine import Patcher
from patching.eval.evaldata import load_eval_data
from daemon.cli.evaluate import _patch_settings

torch.set_num_threads(1)
task, report, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lb = load_base("zsre-smollm2", dtype=torch.float32)
ad = TaskAdapter(lb)
data = load_eval_data(task, None, seed=0)
para = {e.input: e.equivalents for e in data.edits + data.test}
train, gate = _patch_settings(["trainer.subject_key=true"])
p = Patcher(lb.model, train=train, gate=gate)
t0 = time.time()
p.build_memory(ad.memory_batches([e.input for e in data.memory], progress=False))
print(json.dumps({"memory_s": round(time.time() - t0)}), flush=True)
bank = p.subject.memory
rows = bank.rows()
S = len(bank.lengths)
seq_of = torch.repeat_interleave(torch.arange(S), torch.tensor(bank.lengths))
ids_of_seq, row_ids = [], []
for e in ad.memory_batches([e.input for e in data.memory], progress=False):
    for pr in e.prompts:
        ids_of_seq.append(set(pr.tolist()))
        row_ids.append(pr)
row_ids = torch.cat(row_ids)
df_of: dict[int, int] = {}
for s in ids_of_seq:
    for t in s:
        df_of[t] = df_of.get(t, 0) + 1

subjects = subjects_of(task)
tok = lb.tokenizer
unit_mem = F.normalize(rows.float(), dim=1)
for r in json.load(open(report))["rows"][:n]:
    enc = ad.edit(r["input"], r["target"])
    et, seqs = p._capture(enc)
    prompt = enc.prompts[0]
    g = seqs.g[0, : prompt.numel()]
    with torch.no_grad():
        logp = lb.model(prompt[None]).logits[0].float().log_softmax(-1)  # [P, V]
    sur = -logp[:-1].gather(1, prompt[1:, None])[:, 0]  # [P-1]: surprisal of tokens 1..P-1
    unit = F.normalize(g[1:].float(), dim=1)
    sims = unit @ unit_mem.T
    per_seq = torch.full((unit.shape[0], S), -2.0).scatter_reduce(1, seq_of.expand(unit.shape[0], -1), sims, "amax")
    toks = prompt[1:].tolist()
    rare = [j for j, t in enumerate(toks) if df_of.get(t, 0) <= 0.005 * S]
    score = {}
    for j in rare:
        seq_has = torch.zeros(S, dtype=torch.bool)
        seq_has[seq_of[row_ids == toks[j]]] = True
        score[j] = float(per_seq[j][~seq_has].topk(4).values[-1])
    picks = {"x": min(score, key=score.get) if score else 0, "sur": int(sur.argmax())}
    picks["xs"] = max(rare, key=lambda j: float(sur[j])) if rare else picks["sur"]
    top3 = sorted(rare, key=lambda j: -float(sur[j]))[:3]
    picks["xtop3"] = min(top3, key=score.get) if top3 else picks["sur"]
    subject = subjects.get(r["input"], "")
    eq = para.get(r["input"], ())
    eq_ids = [set(ad.edit(q, r["target"]).prompts[0].tolist()) for q in eq]
    res = {"i": r["i"], "gr": r.get("gr"), "subject": subject}
    for k, j in picks.items():
        t = tok.decode(prompt[1 + j])
        res[k] = t
        res[k + "_hit"] = bool(t.strip()) and t.strip() in subject
        res[k + "_in_para"] = all(toks[j] in s for s in eq_ids) if eq_ids else None
        res[k + "_sur"] = round(float(sur[j]), 2)
    res["text"] = r["input"]
    print(json.dumps(res), flush=True)
