"""Single edits from the base with and without trainer.halve_copies (levers-21.md, "Half the copies").

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/levers-21/probe-halve-copies.py OUT.json I [I ...]

Each listed mistake of zsRE's stream (its index i) is edited on a fresh patcher (M and the held-out
cache from the disk cache) as `evaluate --context-augment 10 --chat-copies 3` edits it, with the
daemon's defaults otherwise, once with halve_copies off and once on; the probe records the outcome,
each gated try (copies kept, reasons) and cr / cgr / cr_chat right after the edit.
"""

import json
import sys
from dataclasses import replace

from patching.augment import augment_prefixes, chat_copies, with_context
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher
from patching.eval.contexts import contexts_for
from patching.eval.evaldata import load_eval_data
from patching.eval.evaluate import _in_context

out, picks = sys.argv[1], [int(a) for a in sys.argv[2:]]
data = load_eval_data("zsre", "/work/shared/data", seed=0)
lb = load_base("zsre-smollm2")
adapter = TaskAdapter(lb)
memory, heldout = [e.input for e in data.memory], [e.input for e in data.heldout]
prefixes = augment_prefixes(adapter, memory, 10, "memory")
stream = adapter.mistakes(data.edits, limit=max(picks) + 1, base=True)
log = []
for i in picks:
    ex = stream[i]
    trained = (*(with_context(c, ex.input) for c in prefixes),
               *chat_copies(lb.tokenizer, adapter.text(ex.input), prefixes, 3, offset=i))  # fmt: skip
    for halve in (False, True):
        patcher = adapter.patcher(Patcher(lb.model, train=replace(TrainConfig(), halve_copies=halve), gate=GateConfig()),
                                  memory, heldout)  # fmt: skip
        outcome = patcher.edit(adapter.edit(ex.input, ex.target, trained), str(i))
        p = outcome.proposal
        row = {"i": i, "input": ex.input, "target": ex.target, "halve_copies": halve, "status": outcome.status,
               "neurons": p.neurons.n if p and outcome.status == "accepted" else 0,
               "tries": [{"equivalents": t["equivalents"], "reasons": t["reasons"]} for t in (p.tries if p else [])],
               **_in_context(adapter, ex, contexts_for(i, ex.contexts, data.context_pool))}  # fmt: skip
        patcher.detach()
        log.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tries"}), "tries:", len(row["tries"]), flush=True)
        json.dump(log, open(out, "w"), indent=1)
