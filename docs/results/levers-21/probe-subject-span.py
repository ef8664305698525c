"""Probe (levers-21.md, "Moving to the subject's last token"): where rules that start from the
most surprising rare token and then walk right along the name land, against the subject's last
token (where ROME finds the entity), on the edits of an earlier probe's report. No training and
no memory rows: the memory locator's pick `x` is read from probe-subject-surprise-*.jsonl.

Rules, over prompt positions >= 1 (rare: in at most 0.5 % of the memory's texts):
  x        = patching/subject.locate_token (memory locator), from the earlier probe
  xs       = the most surprising rare token (trainer.subject_locator = "surprise")
  xs_run   = from xs, right while the next token is rare; the last of the run
  xs_word  = from xs, right while the next token is rare or continues a word (no leading space)
  xs_name  = xs_word, also over capitalised words and name glue (" of", " the", ".", "-")
  xs_cap   = xs_name without the rare rule: continuations, capitalised words and glue only
  last     = the last rare token of the prompt
  name     = trainer.subject_locator = "name": xs, then subject.end_of_name over encode.name_pieces
             (the engine's rule; it should match xs_cap)

    python docs/results/levers-21/probe-subject-span.py zsre REPORT.json SURPRISE.jsonl N > out.jsonl
"""
import json, sys
import torch
sys.path.insert(0, ".")  # run from the repository root
sys.path.insert(0, "docs/results/levers-21")
from probe_subjects import subjects_of
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.encode import name_pieces
from patching.eval.evaldata import load_eval_data
from patching.subject import end_of_name

torch.set_num_threads(1)
task, report, earlier, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lb = load_base("zsre-smollm2", dtype=torch.float32)
ad = TaskAdapter(lb)
tok = lb.tokenizer
data = load_eval_data(task, None, seed=0)
para = {e.input: e.equivalents for e in data.edits + data.test}
df: dict[int, int] = {}
S = 0
for e in ad.memory_batches([e.input for e in data.memory], progress=False):
    for pr in e.prompts:
        S += 1
        for t in set(pr.tolist()):
            df[t] = df.get(t, 0) + 1
x_of = {r["text"]: r["x"] for r in map(json.loads, open(earlier))}
subjects = subjects_of(task)
GLUE = {" of", " the", " de", " von", " van", ".", "-", "'s", " and", " &"}


def walk(j: int, pieces: list[str], rare: list[bool], name: bool | None, by_rare: bool = True) -> int:
    while j + 1 < len(pieces):
        nxt = pieces[j + 1]
        cont = bool(nxt) and not nxt.startswith(" ") and nxt[0].isalnum()
        capital = nxt.startswith(" ") and nxt[1:2].isupper()
        if (by_rare and rare[j + 1]) or (name is not None and cont) or (name and (capital or nxt in GLUE)):
            j += 1
        else:
            break
    if name:  # glue never ends a name
        while j > 0 and pieces[j] in GLUE:
            j -= 1
    return j


for r in json.load(open(report))["rows"][:n]:
    enc = ad.edit(r["input"], r["target"])
    prompt = enc.prompts[0]
    with torch.no_grad():
        logp = lb.model(prompt[None]).logits[0].float().log_softmax(-1)  # [P, V]
    sur = (-logp[:-1].gather(1, prompt[1:, None])[:, 0]).tolist()  # surprisal of tokens 1..P-1
    toks = prompt[1:].tolist()
    pieces = [tok.decode([t]) for t in toks]
    rare = [df.get(t, 0) <= 0.005 * S for t in toks]
    subject = subjects.get(r["input"], "")
    # the subject's token span: pieces whose characters fall inside its first occurrence
    text, starts = "", []
    for p in pieces:
        starts.append(len(text))
        text += p
    at = text.find(subject) if subject else -1
    span = [j for j, s0 in enumerate(starts) if at >= 0 and s0 + len(pieces[j]) > at and s0 < at + len(subject)]
    last_subj = span[-1] if span else -1
    pool = [j for j in range(len(toks)) if rare[j]] or list(range(len(toks)))
    xs = max(pool, key=lambda j: sur[j])
    picks = {
        "x": next((j for j in range(len(toks)) if pieces[j] == x_of.get(r["input"]) and rare[j]), -1),
        "xs": xs,
        "xs_run": walk(xs, pieces, rare, None),
        "xs_word": walk(xs, pieces, rare, False),
        "xs_name": walk(xs, pieces, rare, True),
        "xs_cap": walk(xs, pieces, rare, True, by_rare=False),
        "last": pool[-1],
        "name": end_of_name(1 + xs, name_pieces(tok, prompt.tolist())) - 1,
    }
    eq_ids = [set(ad.edit(q, r["target"]).prompts[0].tolist()) for q in para.get(r["input"], ())]
    res = {"i": r["i"], "gr": r.get("gr"), "subject": subject, "span": [pieces[j] for j in span]}
    for k, j in picks.items():
        res[k] = pieces[j] if j >= 0 else None
        res[k + "_last"] = j == last_subj and j >= 0
        res[k + "_in"] = j in span
        res[k + "_para"] = all(toks[j] in s for s in eq_ids) if eq_ids and j >= 0 else None
    res["text"] = r["input"]
    print(json.dumps(res), flush=True)
