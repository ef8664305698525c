"""Run from the repository root: python docs/results/levers-21/probe-key-init.py 165 33,43,... [DATA FIRST] (output: one JSON line per edit).
Key inits at the real site (last FFN input, first answer row): fisher from the edit row (today),
fisher from the centroid of the edit and its 13 training copies, and a logistic key (probe keysep.py).
Each key thresholded half-way between the closest memory row and its weakest positive (pre > 0 fires)."""
import json, sys, torch
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.eval.evaldata import load_eval_data
from patching.eval.contexts import contexts_for, chat_prompt
from patching.augment import augment_prefixes, with_context, chat_copies
from patching.init import whitening
torch.set_num_threads(1)
N = int(sys.argv[1]); extra = [int(x) for x in sys.argv[2].split(",") if x] if len(sys.argv) > 2 else []
DATA = sys.argv[3] if len(sys.argv) > 3 else "zsre"; FIRST = int(sys.argv[4]) if len(sys.argv) > 4 else 30
data = load_eval_data(DATA); lb = load_base("zsre-smollm2"); ad = TaskAdapter(lb); tok = lb.tokenizer; model = lb.model
site = len(model.model.layers) - 1; caught = {}
model.model.layers[site].mlp.register_forward_pre_hook(lambda m, a: caught.__setitem__(0, a[0].detach()))
@torch.no_grad()
def reps(prompts, all_rows=False):
    out = []
    for p in prompts:
        model(tok(str(p), return_tensors="pt")["input_ids"]); x = caught[0][0]
        out.append(x if all_rows else x[-1:])
    return torch.cat(out).float()
mem_in = [m.input for m in data.memory]; prefixes = augment_prefixes(ad, mem_in, 10)
M = reps([ad.text(x) for x in mem_in], all_rows=True); H = reps([ad.text(h.input) for h in data.heldout])
mu, P = whitening(M); sd = M.std(0) + 1e-4
print("memory rows", M.shape, flush=True)
def place(k, pos):
    """bias so that pre = 0 half-way between the max memory score and the weakest positive."""
    m, p = float((M @ k).max()), float((pos @ k).min())
    return -(m + p) / 2, p > m
def logistic(pos):
    Xs = lambda X: (X - mu) / sd
    w = torch.zeros(M.shape[1], requires_grad=True); b = torch.zeros(1, requires_grad=True)
    X = torch.cat([Xs(pos), Xs(M)]); y = torch.cat([torch.ones(len(pos)), torch.zeros(len(M))])
    wt = torch.where(y > 0, len(M) / len(pos), 1.0)
    opt = torch.optim.LBFGS([w, b], max_iter=60, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad(); l = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y, weight=wt) + 1e-3 * w.pow(2).sum(); l.backward(); return l
    opt.step(closure)
    return w.detach() / sd
stream = ad.mistakes(data.edits, limit=N, base=True)
idx = [i for i in extra if i < len(stream)] + list(range(min(N, FIRST)))
res = []
for i in idx:
    ex = stream[i]; prompt = ad.text(ex.input)
    pos_t = [prompt] + [ad.text(with_context(c, ex.input)) for c in prefixes] + [str(c) for c in chat_copies(tok, prompt, prefixes, 3, offset=i)]
    ctxs = contexts_for(i, ex.contexts, data.context_pool)
    tests = {"cr": [ad.text(with_context(c, ex.input)) for c in ctxs], "chat": [chat_prompt(tok, prompt, ctxs[0])],
             "gr": [ad.text(q) for q in ex.equivalents[:2]], "cgr": [ad.text(with_context(ctxs[0], q)) for q in ex.equivalents[:1]],
             "nb": [ad.text(q) for q in ex.neighbours]}  # nb: CounterFact's neighbourhood prompts, must NOT fire
    pos = reps(pos_t); T = {k: reps(v) for k, v in tests.items() if v}
    keys = {"fisher_edit": P @ (pos[0] - mu), "fisher_centroid": P @ (pos.mean(0) - mu), "logistic": logistic(pos)}
    rec = {"i": i, "input": ex.input}
    for name, k in keys.items():
        b, sep = place(k, pos[:1] if name == "fisher_edit" else pos)
        r = {t: float(((v @ k + b) > 0).float().mean()) for t, v in T.items()}
        r.update(train=float(((pos @ k + b) > 0).float().mean()), fp=int(((H @ k + b) > 0).sum()), sep=sep)
        rec[name] = r
    res.append(rec); print(json.dumps(rec), flush=True)
json.dump(res, open(f"/work/runs/probe/keyinit-{DATA}-{N}.json", "w"))
for name in ("fisher_edit", "fisher_centroid", "logistic"):
    print(name, {k: round(sum(r[name].get(k, 0) for r in res) / len(res), 3) for k in ("train", "cr", "chat", "gr", "cgr", "nb", "fp", "sep")})
