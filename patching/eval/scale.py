"""What `patchd bench scale` edits and how it reports (the driver is daemon/tools/bench_scale.py).

The stream is real data only. fever-minilm: FEVER claims outside the held-out and test parts and
outside the memory the run uses; first the base's real mistakes (a SUPPORTS or REFUTES claim the
base labels wrongly, target = its gold label), then label flips of every other claim (target =
the label the base does not predict), NOT ENOUGH INFO claims included.

zsre-smollm2: CounterFact cases (prompt -> target_new) outside the counterfact task's held-out and
test parts and outside the run's memory, the task's edit part first. The memory and held-out sets
are neighbourhood prompts (other subjects, same relation), none of them a case's prompt.

When the real data runs out before the asked number, the stream is shorter and the report says
so: nothing is invented.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patching.bases.datasets import NEI, counterfact_cases, load_task, text_key
from patching.eval.metrics import percentile

# the memory M of a scale run: large enough to keep neurons quiet, small enough to leave 10,000 claims
FEVER_SCALE_MEMORY = 4_000
# CounterFact prompts are ~15 token rows each: 2,000 prompts give an M of ~30,000 rows, the size
# of zsre-smollm2's default (zsRE) memory
COUNTERFACT_SCALE_MEMORY = 2_000
# the stream each base is measured on, and its default memory size
SCALE_TASK = {"fever-minilm": "fever", "zsre-smollm2": "counterfact"}
SCALE_MEMORY = {"fever": FEVER_SCALE_MEMORY, "counterfact": COUNTERFACT_SCALE_MEMORY}


@dataclass(frozen=True)
class ScaleEdit:
    input: str
    target: str
    kind: str  # "mistake" (the base is wrong), "flip" (a labelled claim), "flip_nei" (a NEI claim)


@dataclass
class ScaleStream:
    memory: list[str]
    heldout: list[str]
    edits: list[ScaleEdit]
    facts: dict[str, Any] = field(default_factory=dict)


def fever_stream(
    predict: Callable[[list[str]], list[str]],
    edits: int,
    memory_size: int = FEVER_SCALE_MEMORY,
    data_dir: Path | None = None,
    seed: int = 0,
) -> ScaleStream:
    """The FEVER scale stream (module docstring); `predict` gives the base's label of each claim."""
    splits = load_task("fever", data_dir, seed)
    labels = splits.labels
    assert labels is not None and len(labels) == 2  # fever-minilm is SUPPORTS / REFUTES
    memory = splits.memory[:memory_size]
    # every claim outside held-out, test and the run's memory: the edit part, the training part and
    # the memory part this run does not use
    pool = [*splits.edit, *splits.train, *splits.memory[memory_size:]]
    used = {text_key(e.input) for e in (*splits.heldout, *splits.test, *memory)}
    pool = [e for e in pool if text_key(e.input) not in used]
    predicted = predict([e.input for e in pool])
    mistakes = [
        ScaleEdit(e.input, e.target, "mistake")
        for e, p in zip(pool, predicted, strict=True)
        if e.target in labels and p != e.target
    ]
    flips = [
        ScaleEdit(e.input, labels[1 - labels.index(p)], "flip_nei" if e.target == NEI else "flip")
        for e, p in zip(pool, predicted, strict=True)
        if not (e.target in labels and p != e.target)
    ]
    stream = (mistakes + flips)[:edits]
    return ScaleStream(
        [e.input for e in memory],
        [e.input for e in splits.heldout],
        stream,
        {
            "data": "FEVER (fever_shared_task_dev labelled claims)",
            "memory_claims": len(memory),
            "heldout_claims": len(splits.heldout),
            "claims_available": len(pool),
            "edits_by_kind": dict(Counter(e.kind for e in stream)),
            "ran_out": len(stream) < edits,
        },
    )


def counterfact_stream(
    edits: int,
    memory_size: int = COUNTERFACT_SCALE_MEMORY,
    data_dir: Path | None = None,
    seed: int = 0,
) -> ScaleStream:
    """The CounterFact scale stream (module docstring): every case is a counterfactual rewrite, so
    the base is wrong on nearly all of them; one it already answers with target_new is counted as
    already fixed when its turn comes."""
    splits = load_task("counterfact", data_dir, seed)
    cases = counterfact_cases(data_dir)
    case_keys = {text_key(c.prompt) for c in cases}
    # neighbourhood prompts only: a case's own prompt may be edited later, so it cannot be in M
    memory = [e.input for e in splits.memory if text_key(e.input) not in case_keys][:memory_size]
    heldout = [e.input for e in splits.heldout]
    used = {text_key(x) for x in (*heldout, *memory)} | {text_key(e.input) for e in splits.test}
    by_key = {text_key(c.prompt): c for c in cases}
    order = [text_key(e.input) for e in splits.edit] + [text_key(c.prompt) for c in cases]
    stream: list[ScaleEdit] = []
    seen: set[str] = set()
    for key in order:
        if key in seen or key in used:
            continue
        seen.add(key)
        case = by_key[key]
        stream.append(ScaleEdit(case.prompt.strip(), case.target_new.strip(), "counterfact"))
    available = len(stream)
    stream = stream[:edits]
    return ScaleStream(
        memory,
        heldout,
        stream,
        {
            "data": "CounterFact (counterfact-edit, mcounterfact train, ROME filtered): prompt -> target_new",
            "memory_prompts": len(memory),
            "heldout_prompts": len(heldout),
            "cases_available": available,
            "edits_by_kind": dict(Counter(e.kind for e in stream)),
            "ran_out": len(stream) < edits,
        },
    )


# ---------------------------------------------------------------------------- report


def summarize_window(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Latency and outcome figures of one window's edits (one row per edit)."""
    ms = [r["ms"] for r in rows]
    done = [r for r in rows if r["outcome"] in ("patched", "already_fixed")]
    return {
        "edits": len(rows),
        "latency_ms_median": round(statistics.median(ms), 2),
        "latency_ms_p95": round(percentile(ms, 0.95) or 0.0, 2),
        "train_ms_median": round(statistics.median(r["train_ms"] for r in rows), 2),
        "gate_ms_median": round(statistics.median(r["gate_ms"] for r in rows), 2),
        "sr": round(len(done) / len(rows), 4),
        "outcomes": dict(Counter(r["outcome"] for r in rows)),
    }


def plot_scale(report: dict[str, Any], path: Path) -> Path | None:
    """Edit latency, inference overhead and restart / load time against patches (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    windows = report["windows"]
    if not windows:
        return None
    x = [w["end"] for w in windows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(x, [w["latency_ms_median"] for w in windows], "o-", label="median")
    ax.plot(x, [w["latency_ms_p95"] for w in windows], "s--", label="p95")
    ax.plot(x, [w["train_ms_median"] for w in windows], "^:", label="training (median)")
    ax.set(title="edit latency", xlabel="edits so far", ylabel="ms per edit")
    ax.legend()
    ax = axes[1]
    ax.plot(x, [100 * w["overhead_b1"] for w in windows], "o-", label="batch 1")
    ax.plot(x, [100 * w["overhead_b16"] for w in windows], "s-", label="batch 16")
    ax.axhline(5, color="grey", lw=0.8, ls=":")
    ax.set(title="inference overhead vs the base", xlabel="edits so far", ylabel="%")
    ax.legend()
    ax = axes[2]
    ax.plot(x, [w["restart_s"] for w in windows], "o-", label="restart to ready (patchd run)")
    ax.plot(x, [w["load_s"] for w in windows], "s-", label="downstream load_latest")
    ax.set(title="restart and load", xlabel="edits so far", ylabel="seconds")
    ax.legend()
    fig.suptitle(f"patchd bench scale: {report['base']}, {report['edits']} edits ({report.get('device', 'cpu')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
