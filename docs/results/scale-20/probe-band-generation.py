"""Issue 20: would a band rescue the CounterFact scale run's refused edits on zsre-smollm2?

Each edit the partial 3,000-edit run refused (bench-scale-zsre-smollm2-partial.json) is made again
ALONE on the fresh base, with that stream's memory (2,000 neighbourhood prompts) and held-out set,
the daemon's defaults (10 memory prefixes as train equivalents) and trainer.band_generation on:
which are accepted by the regular attempts, which only as a band, which stay refused.
Run: python docs/results/scale-20/probe-band-generation.py  (writes probe-band-generation.json)
"""

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from patching.augment import augment_prefixes, with_context
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher
from patching.eval.scale import counterfact_stream

HERE = Path(__file__).parent
torch.set_num_threads(1)
report = json.loads((HERE / "bench-scale-zsre-smollm2-partial.json").read_text())
outcomes = report["windows"][0]["row_outcomes"] + [r["outcome"] for r in report["current"]]
refused = [i for i, o in enumerate(outcomes) if o == "gate_rejected"]
print(f"{len(refused)} refused of {len(outcomes)}: {refused}", flush=True)
stream = counterfact_stream(max(refused) + 1, report["memory_size"], None, report["seed"])
lb = load_base("zsre-smollm2")
adapter = TaskAdapter(lb)
train = replace(TrainConfig(), band_generation=True)
patcher = adapter.patcher(Patcher(lb.model, train=train, gate=GateConfig()), stream.memory, stream.heldout)
prefixes = augment_prefixes(adapter, stream.memory, 10, "memory")
rows = []
for i in refused:
    e = stream.edits[i]
    t0 = time.perf_counter()
    enc = adapter.edit(e.input, e.target, [with_context(p, e.input) for p in prefixes])
    p = patcher.propose(enc, str(i))
    row = {
        "i": i,
        "input": e.input,
        "target": e.target,
        "outcome": "already_right" if p is None else ("band" if p.banded else "accepted" if p.accepted else "refused"),
        "reasons": [] if p is None else p.gate.reasons,
        "neurons": None if p is None else p.neurons.n,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    rows.append(row)
    print(json.dumps(row), flush=True)
counts = {k: sum(r["outcome"] == k for r in rows) for k in ("accepted", "band", "refused", "already_right")}
out = {"refused_in_run": len(refused), "edits_in_run": len(outcomes), "alone": counts, "rows": rows}
(HERE / "probe-band-generation.json").write_text(json.dumps(out, indent=2) + "\n")
print(counts, file=sys.stderr)
