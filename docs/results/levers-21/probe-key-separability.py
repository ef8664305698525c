"""Run from the repository root: python docs/results/levers-21/probe-key-separability.py 165 33,43,... (output: one JSON line per edit).
Which representation tells an edit's subject apart from same-template questions? (issue 21, key lever)
Per edit: a linear key fit on the edit and its 13 training copies (positives) against every memory row
(negatives), at the FFN input of several layers and concatenations; threshold = max memory score.
Reports recall on held-out contexts / chat / paraphrase rows and false positives on held-out questions."""
import json, sys, torch
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.eval.evaldata import load_eval_data
from patching.eval.contexts import contexts_for, chat_prompt
from patching.augment import augment_prefixes, with_context, chat_copies
torch.set_num_threads(1); torch.manual_seed(0)
N = int(sys.argv[1]); extra = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else []
data = load_eval_data("zsre"); lb = load_base("zsre-smollm2"); ad = TaskAdapter(lb); tok = lb.tokenizer; model = lb.model
layers = model.model.layers; L = len(layers)
SITES = sorted({L // 2, int(L * 0.66), int(L * 0.8), L - 3, L - 1})
caught = {}
for l in SITES:
    layers[l].mlp.register_forward_pre_hook(lambda m, a, l=l: caught.__setitem__(l, a[0].detach()))
@torch.no_grad()
def reps(prompts, all_rows=False):
    out = {l: [] for l in SITES}
    for p in prompts:
        ids = tok(str(p), return_tensors="pt")["input_ids"]
        model(ids)
        for l in SITES:
            x = caught[l][0]
            out[l].append(x if all_rows else x[-1:])
    return {l: torch.cat(v) for l, v in out.items()}
mem_in = [m.input for m in data.memory]
prefixes = augment_prefixes(ad, mem_in, 10)
print("sites", SITES, "memory", len(mem_in), flush=True)
Mr = reps([ad.text(x) for x in mem_in], all_rows=True)
Hr = reps([ad.text(h.input) for h in data.heldout])
mu = {l: Mr[l].mean(0) for l in SITES}; sd = {l: Mr[l].std(0) + 1e-4 for l in SITES}
def feat(R, combo):
    return torch.cat([(R[l] - mu[l]) / sd[l] / len(combo) ** 0.5 for l in combo], 1)
COMBOS = [(l,) for l in SITES if l != L - 3] + [(L - 1, l) for l in (SITES[1], SITES[2])]
def fit(P, Nn):
    w = torch.zeros(P.shape[1], requires_grad=True); b = torch.zeros(1, requires_grad=True)
    X = torch.cat([P, Nn]); y = torch.cat([torch.ones(len(P)), torch.zeros(len(Nn))])
    wt = torch.where(y > 0, len(Nn) / len(P), 1.0)
    opt = torch.optim.LBFGS([w, b], max_iter=60, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad(); loss = (torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y, weight=wt)) + 1e-3 * w.pow(2).sum()
        loss.backward(); return loss
    opt.step(closure)
    return w.detach(), b.detach()
stream = ad.mistakes(data.edits, limit=N, base=True)
idx = [i for i in extra if i < len(stream)] + list(range(min(N, 20)))
res = []
for i in idx:
    ex = stream[i]; prompt = ad.text(ex.input)
    pos = [prompt] + [ad.text(with_context(c, ex.input)) for c in prefixes] + [str(c) for c in chat_copies(tok, prompt, prefixes, 3, offset=i)]
    ctxs = contexts_for(i, ex.contexts, data.context_pool)
    tests = {"cr": [ad.text(with_context(c, ex.input)) for c in ctxs], "chat": [chat_prompt(tok, prompt, ctxs[0])],
             "gr": [ad.text(q) for q in ex.equivalents[:1]], "cgr": [ad.text(with_context(ctxs[0], q)) for q in ex.equivalents[:1]]}
    Pr = reps(pos); Tr = {k: reps(v) for k, v in tests.items() if v}
    rec = {"i": i, "input": ex.input}
    for combo in COMBOS:
        name = "+".join(map(str, combo))
        w, b = fit(feat(Pr, combo), feat(Mr, combo))
        t = float((feat(Mr, combo) @ w + b).max())
        r = {k: float(((feat(v, combo) @ w + b) > t).float().mean()) for k, v in Tr.items()}
        r["train"] = float(((feat(Pr, combo) @ w + b) > t).float().mean())
        r["fp"] = int(((feat(Hr, combo) @ w + b) > t).sum())
        rec[name] = r
    res.append(rec); print(json.dumps(rec), flush=True)
json.dump(res, open(f"/work/runs/probe/keysep-{N}.json", "w"))
agg = {}
for combo in COMBOS:
    name = "+".join(map(str, combo))
    agg[name] = {k: round(sum(r[name].get(k, 0) for r in res) / len(res), 3) for k in ("train", "cr", "chat", "gr", "cgr", "fp")}
print(json.dumps(agg, indent=1))
