"""How steady is the base itself behind unrelated context? (levers-21.md, "Which contexts fail"):
a reference for cr.

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/levers-21/probe-base-context.py OUT.json [DATA_DIR [N]]

The unedited zsre-smollm2 answers none of zsRE's held-out questions right, so its own answers
stand in for the targets: each held-out question is asked behind three texts of
evaluate's context pool, chosen as evaluate chooses them for an edit (contexts_for, rotating with
the question's number; the first N questions only if N is given), and an answer counts as kept when it is the bare question's answer
(adapter.right, as cr scores). That share is the base's "cr" on what it already says.
"""

import json
import sys
from pathlib import Path

from patching.augment import with_context
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.eval.contexts import contexts_for
from patching.eval.evaldata import load_eval_data

out = Path(sys.argv[1])
data_dir = sys.argv[2] if len(sys.argv) > 2 else "../shared/data"
data = load_eval_data("zsre", data_dir, seed=0)
adapter = TaskAdapter(load_base("zsre-smollm2"))
held = [q.input for q in data.heldout][: int(sys.argv[3]) if len(sys.argv) > 3 else None]
bare = adapter.base_predict(held, progress=True)
asked = [(k, c) for k in range(len(held)) for c in contexts_for(k, (), data.context_pool)]
answers = adapter.predict([with_context(c, held[k]) for k, c in asked], progress=True)
kept: dict[str, list[bool]] = {}
rows = []
for (k, c), a in zip(asked, answers):
    ok = adapter.right(a, bare[k])
    kept.setdefault(c, []).append(ok)
    rows.append({"input": held[k], "bare": bare[k], "context": c, "answer": a, "kept": ok})
share = sum(r["kept"] for r in rows) / len(rows)
print(f"base: {share:.3f} of {len(rows)} answers kept behind context ({len(held)} questions)", flush=True)
out.write_text(json.dumps({
    "questions": len(held), "asked": len(rows), "kept": share,
    "per_context": {c: {"asked": len(v), "kept": sum(v)} for c, v in sorted(kept.items())}, "rows": rows,
}, indent=1))  # fmt: skip
print(f"wrote {out}")
