"""Which contexts an edit fails behind, in the stream (levers-21.md, "Which contexts fail").

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/levers-21/probe-context-misses.py \
        REPORT.json OUT.json [DATA_DIR]

REPORT: a stopped `evaluate --base zsre-smollm2 --data zsre` tpatcher run with its neurons beside it
(rows written before `cr_missed` existed). Its accepted edits are replayed in order, as --resume
replays them, and right after each one its input is asked behind its cr contexts, as evaluate
asked it: each miss is recorded with the answer given (rows now carry this as `cr_missed`). Then,
with every neuron in, every edit is asked again behind the same contexts (cr at the end), and
behind each context alone (what the model answers to the context text itself).
"""

import json
import sys
from pathlib import Path

from patching.augment import with_context
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher
from patching.eval.contexts import contexts_for
from patching.eval.evaldata import load_eval_data
from patching.eval.resume import Resume

report_path, out = Path(sys.argv[1]), Path(sys.argv[2])
data_dir = sys.argv[3] if len(sys.argv) > 3 else "../shared/data"
resume = Resume.read(report_path)
rows = resume.report["rows"]
data = load_eval_data("zsre", data_dir, seed=0)
lb = load_base("zsre-smollm2")
adapter = TaskAdapter(lb)
patcher = adapter.patcher(
    Patcher(lb.model, train=TrainConfig(seed=0), gate=GateConfig()),
    [e.input for e in data.memory],
    [e.input for e in data.heldout],
)
stream = adapter.mistakes(data.edits, limit=len(rows), base=True)


def ask(ex, contexts):
    answers = adapter.predict([with_context(c, ex.input) for c in contexts])
    return [{"context": c, "answer": a, "right": adapter.right(a, ex.target)} for c, a in zip(contexts, answers)]


log = []
for r in rows:
    if r.get("status") != "accepted":
        continue
    i, ex = r["i"], stream[r["i"]]
    patcher.replay(adapter.edit(ex.input, ex.target), str(i), resume.saved.neurons[str(i)],
                   resume.saved.detectors.get(str(i)), resume.saved.scale)  # fmt: skip
    contexts = contexts_for(i, ex.contexts, data.context_pool)
    asked = ask(ex, contexts)
    cr = sum(a["right"] for a in asked) / len(asked)
    if abs(cr - r["cr"]) > 1e-9:
        print(f"edit {i}: cr {cr:.2f} here, {r['cr']:.2f} in the run", flush=True)
    log.append({"i": i, "input": ex.input, "target": ex.target, "cr_run": r["cr"], "equivalents_trained":
                r.get("equivalents_trained"), "neurons": r.get("neurons"), "after_edit": asked})  # fmt: skip
    if cr < 1:
        print(json.dumps(log[-1]), flush=True)
pool_answers = dict(zip(data.context_pool, adapter.predict(list(data.context_pool))))
for rec in log:
    ex = stream[rec["i"]]
    rec["at_end"] = ask(ex, [a["context"] for a in rec["after_edit"]])
    for a in rec["at_end"]:
        a["context_alone"] = pool_answers.get(a["context"])
out.write_text(json.dumps(log, indent=1))
print(f"wrote {out}")
