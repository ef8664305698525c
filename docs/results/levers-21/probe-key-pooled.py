"""Run from the repository root: python docs/results/levers-21/probe-key-pooled.py [DATA N SUBJ_LAYER]
(defaults: counterfact 15 15; one JSON line per edit, a summary at the end). PROBE_START=k skips the
first k edits (two processes can share a range); PROBE_MEMORY=n keeps n memory prompts (a smoke
run); PROBE_KINDS=a,b picks the features. The memory's rows are cached under /work/runs/probe/
(safetensors) for the next run.

Does a key read from more than the last position tell an edit's paraphrases from the memory where the
last position alone cannot (probe-key-init.py: a logistic key over the last FFN's input reaches
CounterFact's paraphrases 0.27 of the time)? Every feature below can be kept as running state in
decoding (a running sum or a running max over the positions so far), so a neuron built on it stays
causal. Features at position t, with h = the patched (last) FFN's input and g = layer SUBJ_LAYER's
FFN input:
  last      h_t                                  (the engine's key today)
  cmean     [h_t, mean_{s<=t} h_s]               (the causal mean of the same site)
  subj      max_{s<=t} d(g_s)                    (d: a logistic detector of the edit's subject,
                                                   trained on the last subject token of the edit and
                                                   its 13 copies against every memory position)
  last+subj [h_t, max_{s<=t} d(g_s)]
  free, last+free  the same with d fitted on every position of the bare edit prompt (no subject named)
  loc, last+loc    the same with d fitted on one located token: the prompt's token least like any
                   memory row at layer SUBJ_LAYER (no subject named either)
  .../rel   the same key with 4 same-subject, other-relation prompts as extra negatives
Each key is a logistic fit on the 14 training rows (last position) against every memory position,
thresholded half-way between the closest memory row and the weakest training row, as in
probe-key-init.py; "fp" counts the held-out questions it fires on (last position), "nb"
CounterFact's neighbourhood prompts (same relation, another subject) and "rel" 4 other prompts about
the same subject in other relations (CounterFact's relation templates); neither may fire."""

import glob
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

from patching.augment import augment_prefixes, chat_copies, with_context
from patching.bases.datasets import text_key
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.eval.contexts import chat_prompt, contexts_for
from patching.eval.evaldata import load_eval_data

torch.set_num_threads(1)
DATA = sys.argv[1] if len(sys.argv) > 1 else "counterfact"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 15
SUBJ = int(sys.argv[3]) if len(sys.argv) > 3 else 15
data = load_eval_data(DATA)
lb = load_base("zsre-smollm2")
ad = TaskAdapter(lb)
tok, model = lb.tokenizer, lb.model
site = len(model.model.layers) - 1
caught: dict[int, torch.Tensor] = {}
for layer in (site, SUBJ):
    model.model.layers[layer].mlp.register_forward_pre_hook(
        lambda m, a, layer=layer: caught.__setitem__(layer, a[0][0].detach().float())
    )

# subjects by prompt: zsRE (KnowEdit) and CounterFact files both name them
subject: dict[str, str] = {}
for f in glob.glob("../shared/data/raw/**/*.json", recursive=True):
    try:
        rows = json.load(open(f))
    except (ValueError, UnicodeDecodeError):
        continue
    for r in rows if isinstance(rows, list) else []:
        if isinstance(r, dict) and "subject" in r:
            rw = r
            p = r.get("prompt") or r.get("src")
            if "requested_rewrite" in r:
                rw = r["requested_rewrite"]
                p = rw["prompt"].replace("{}", rw["subject"])
            if isinstance(p, str):
                subject.setdefault(text_key(p), rw["subject"])


# CounterFact's relation templates (ROME file): same subject, another relation must not fire ("rel")
templates: dict[str, set[str]] = {}
for r in json.load(open("../shared/data/raw/counterfact_rome_filtered/counterfact_filtered.json")):
    templates.setdefault(r["requested_rewrite"]["relation_id"], set()).add(r["requested_rewrite"]["prompt"])


def other_relations(prompt: str, subj: str, seed: int) -> list[str]:
    """8 prompts about subj from relations other than prompt's (none when its relation is unknown)."""
    mine = [ts for ts in templates.values() if any(t.replace("{}", subj).strip() == prompt.strip() for t in ts)]
    if not mine:
        return []
    own = set().union(*mine)
    others = sorted({t for ts in templates.values() if not ts & own for t in ts})
    g = torch.Generator().manual_seed(seed)
    return [others[j].replace("{}", subj) for j in torch.randperm(len(others), generator=g)[:8].tolist()]


@torch.no_grad()
def rows(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [T, d], g [T, d]) for one text."""
    model(tok(text, return_tensors="pt")["input_ids"])
    return caught[site], caught[SUBJ]


def cmean(h: torch.Tensor) -> torch.Tensor:
    """[T, 2d]: each position's row beside the mean of the rows up to it."""
    run = h.cumsum(0) / torch.arange(1, len(h) + 1).unsqueeze(1)
    return torch.cat([h, run], 1)


def subj_pos(text: str, subj: str) -> int | None:
    """Index of the last token overlapping the subject's last occurrence in text."""
    at = text.rfind(subj)
    if at < 0:
        return None
    end = at + len(subj)
    offs = tok(text, return_offsets_mapping=True)["offset_mapping"]
    hit = [i for i, (a, b) in enumerate(offs) if a < end and b > at]
    return hit[-1] if hit else None


def logistic(pos: torch.Tensor, neg: torch.Tensor, hard: torch.Tensor | None = None) -> torch.Tensor:
    """Weights w (bias last) of a class-balanced L2 logistic fit, in the raw feature space; `hard`:
    extra negatives weighted as much in total as all of `neg`."""
    mu, sd = neg.mean(0), neg.std(0) + 1e-4
    hard = neg[:0] if hard is None else hard
    X = torch.cat([(pos - mu) / sd, (neg - mu) / sd, (hard - mu) / sd])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg) + len(hard))])
    wt = torch.cat(
        [
            torch.full((len(pos),), len(neg) / len(pos)),
            torch.ones(len(neg)),
            torch.full((len(hard),), len(neg) / max(1, len(hard))),
        ]
    )
    w = torch.zeros(X.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=60, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y, weight=wt)
        loss = loss + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    k = w.detach() / sd
    return torch.cat([k, b.detach() - (mu * k).sum(0, keepdim=True)])


def score(w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return X @ w[:-1] + w[-1]


ALL_KINDS = (
    "last",
    "cmean",
    "subj",
    "last+subj",
    "last+subj/rel",
    "free",
    "last+free",
    "last+free/rel",
    "loc",
    "last+loc",
)
KINDS = tuple(os.environ["PROBE_KINDS"].split(",")) if os.environ.get("PROBE_KINDS") else ALL_KINDS
mem_in = [m.input for m in data.memory][: int(os.environ.get("PROBE_MEMORY", "1000000"))]
prefixes = augment_prefixes(ad, mem_in, 10)
cache = f"/work/runs/probe/pooled-memory-{DATA}-{SUBJ}-{len(mem_in)}.safetensors"
if os.path.exists(cache):
    got = load_file(cache)
    lens = got["lens"].tolist()
    mem_h, mem_g = list(got["h"].split(lens)), list(got["g"].split(lens))
else:
    mem_h, mem_g = [], []
    for x in mem_in:
        h, g = rows(ad.text(x))
        mem_h.append(h)
        mem_g.append(g)
    lens_t = torch.tensor([len(h) for h in mem_h])
    save_file({"h": torch.cat(mem_h), "g": torch.cat(mem_g), "lens": lens_t}, cache)
Mh = torch.cat(mem_h)
Mg = torch.cat(mem_g)
Mg_unit = torch.nn.functional.normalize(Mg, dim=1)
held = [rows(ad.text(e.input)) for e in data.heldout]
print("memory rows", Mh.shape, "held-out", len(held), flush=True)

stream = ad.mistakes(data.edits, limit=N, base=True)
res = []
for i, ex in list(enumerate(stream[:N]))[int(os.environ.get("PROBE_START", "0")) :]:
    prompt = ad.text(ex.input)
    subj = subject.get(text_key(ex.input))
    train = [prompt] + [ad.text(with_context(c, ex.input)) for c in prefixes]
    train += [str(c) for c in chat_copies(tok, prompt, prefixes, 3, offset=i)]
    ctxs = contexts_for(i, ex.contexts, data.context_pool)
    tests = {
        "cr": [ad.text(with_context(c, ex.input)) for c in ctxs],
        "chat": [chat_prompt(tok, prompt, ctxs[0])],
        "gr": [ad.text(q) for q in ex.equivalents[:2]],
        "cgr": [ad.text(with_context(ctxs[0], q)) for q in ex.equivalents[:1]],
        "nb": [ad.text(q) for q in ex.neighbours],
    }
    rel = other_relations(ex.input, subj, i) if subj else []
    if rel:
        tests["rel"] = rel[4:]
    rel_neg = [rows(ad.text(t)) for t in rel[:4]]
    tr = [rows(t) for t in train]
    te = {k: [rows(t) for t in v] for k, v in tests.items() if v}
    rec: dict[str, object] = {"i": i, "input": ex.input, "subject": subj}
    # The subject detectors: "subj" from the last subject token of each training text (the subject
    # named by the data); "free" from every position of the bare edit prompt (no subject needed:
    # the template's tokens also fill the memory, so the fit leans on the subject's).
    det: dict[str, torch.Tensor | None] = {"subj": None, "free": None}
    if subj:
        sp = [subj_pos(t, subj) for t in train]
        pos_g = torch.stack([g[p] for (_, g), p in zip(tr, sp, strict=True) if p is not None])
        det["subj"] = logistic(pos_g, Mg)
        rec["subj_rows"] = len(pos_g)
    det["free"] = logistic(tr[0][1], Mg)
    # "loc": a locator instead of a named subject. The prompt's token whose layer-SUBJ row is least
    # like any memory row (lowest max cosine; position 0 skipped: it is far from everything), then
    # that token's text found last in each training text, as for the subject.
    g0 = tr[0][1][1:]
    near = torch.cat(
        [
            (torch.nn.functional.normalize(g0, dim=1) @ Mg_unit[j : j + 20000].T).amax(1, keepdim=True)
            for j in range(0, len(Mg_unit), 20000)
        ],
        1,
    ).amax(1)
    star = 1 + int(near.argmin())
    a, b = tok(prompt, return_offsets_mapping=True)["offset_mapping"][star]
    piece = prompt[a:b].strip()
    rec["loc_token"] = piece
    a += len(prompt[a:b]) - len(prompt[a:b].lstrip())  # the token's own leading space is not the subject's
    rec["loc_in_subject"] = bool(subj) and piece in subj and prompt.find(subj) <= a < prompt.find(subj) + len(subj)
    lp = [subj_pos(t, piece) if piece else None for t in train]
    got = [g[p] for (_, g), p in zip(tr, lp, strict=True) if p is not None]
    det["loc"] = logistic(torch.stack(got), Mg) if got else None

    def feats(
        kind: str, hg: tuple[torch.Tensor, torch.Tensor], det: dict[str, torch.Tensor | None] = det
    ) -> torch.Tensor:
        """[T, F]: the features of every position of one text."""
        h, g = hg
        kind = kind.removesuffix("/rel")
        if kind == "last":
            return h
        if kind == "cmean":
            return cmean(h)
        d = det[kind.removeprefix("last+")]
        assert d is not None
        m = score(d, g).cummax(0).values.unsqueeze(1) / 10
        return torch.cat([h, m], 1) if kind.startswith("last+") else m

    for kind in KINDS:
        if kind.endswith("/rel") and not rel_neg:
            continue
        if det.get(kind.removesuffix("/rel").removeprefix("last+"), 0) is None:
            continue
        M = torch.cat([feats(kind, hg) for hg in zip(mem_h, mem_g, strict=True)])
        pos = torch.stack([feats(kind, r)[-1] for r in tr])
        hard = torch.cat([feats(kind, r) for r in rel_neg]) if kind.endswith("/rel") else None
        w = logistic(pos, M, hard) if kind not in det else torch.tensor([1.0, 0.0])
        mx, pw = float(score(w, M).max()), float(score(w, pos).min())
        w = w.clone()
        w[-1] -= (mx + pw) / 2  # threshold half-way: pre > 0 fires
        fired = [[float(score(w, feats(kind, r)[-1:])[0]) > 0 for r in rs] for rs in (*te.values(), tr, held)]
        out: dict[str, object] = {k: sum(f) / len(f) for k, f in zip(te, fired, strict=False)}
        out.update(train=sum(fired[-2]) / len(tr), fp=sum(fired[-1]), sep=pw > mx)
        rec[kind] = out
    res.append(rec)
    print(json.dumps(rec), flush=True)

print("summary over", len(res), "edits")
for kind in KINDS:
    got = [r[kind] for r in res if kind in r]
    if got:
        keys = ("train", "cr", "chat", "gr", "cgr", "nb", "rel", "fp", "sep")
        avg = {k: round(sum(float(g[k]) for g in got if k in g) / max(1, sum(k in g for g in got)), 3) for k in keys}
        print(kind, len(got), avg)
