"""`patchd bench edit`: sequential real edits, cached trainer vs the reference procedure.

The same mistakes (inputs the prepared base gets wrong) are edited one after another, once with
the cached trainer and once in reference mode, each with the full gate (locality on the held-out
set, retention of every earlier edit). Per-edit time includes training and the gate.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from patching.bases.datasets import load_task
from patching.bases.load import TASK_OF_BASE, load_base
from patching.bases.tasks import TaskAdapter
from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher
from patching.eval.metrics import percentile


def edit_stream(patcher: Patcher, adapter: TaskAdapter, edits: list[Any], label: str) -> dict[str, Any]:
    """Edit `edits` one after another with the gate, time each, measure retention, then undo them all
    (shared with patching/eval/gpubench.py)."""
    cp = patcher.checkpoint()
    rows: list[dict[str, Any]] = []
    bar = tqdm(edits, desc=f"{label} edits", unit="edit")
    for i, ex in enumerate(bar):
        enc = adapter.edit(ex.input, ex.target)
        t0 = time.perf_counter()
        outcome = patcher.edit(enc, edit_id=f"{label}-{i}")
        ms = (time.perf_counter() - t0) * 1000
        p = outcome.proposal
        rows.append(
            {
                "ms": round(ms, 2),
                "status": outcome.status,
                "steps": p.train.steps if p else 0,
                "attempts": p.attempts if p else 0,
                "neurons": p.neurons.n if p else 0,
                "changed": p.gate.changed if p else 0,
                "reasons": outcome.reasons,
            }
        )
        ok = sum(r["status"] == "accepted" for r in rows)
        bar.set_postfix(ok=f"{ok}/{len(rows)}", ms=f"{statistics.median(r['ms'] for r in rows):.0f}")
    # retention at the end, through the full model (not the cache)
    preds = adapter.predict([e.input for e in edits])
    kept = [r["status"] == "accepted" for r in rows]
    retained = sum(1 for k, ex, pr in zip(kept, edits, preds, strict=True) if k and adapter.right(pr, ex.target))
    patcher.rollback(cp)
    times = [r["ms"] for r in rows]
    accepted = sum(kept)
    return {
        "median_ms": round(statistics.median(times), 2),
        "p95_ms": round(percentile(times, 0.95) or 0.0, 2),
        "mean_ms": round(statistics.fmean(times), 2),
        "success_rate": round(accepted / len(rows), 4),
        "retention": round(retained / accepted, 4) if accepted else None,
        "median_steps": statistics.median(r["steps"] for r in rows),
        "rows": rows,
    }


def run_edit_bench(
    base: str,
    edits: int = 50,
    data_dir: Path | None = None,
    seed: int = 0,
    reference: bool = True,
    reference_edits: int | None = None,
    train: TrainConfig | None = None,
    gate: GateConfig | None = None,
    threads: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    lb = load_base(base, dtype=dtype)
    lb.model.to(device)
    task = TASK_OF_BASE.get(lb.name) or ("fever" if lb.kind == "classification" else "zsre")
    splits = load_task(task, data_dir, seed=seed)
    adapter = TaskAdapter(lb)
    train = train or TrainConfig()
    patcher = Patcher(lb.model, train=train, gate=gate or GateConfig())
    t0 = time.perf_counter()
    adapter.patcher(patcher, [e.input for e in splits.memory], [e.input for e in splits.heldout])
    setup_s = time.perf_counter() - t0
    mistakes = adapter.mistakes(splits.edit, limit=edits, base=True)  # nothing is patched yet
    print(
        f"{len(mistakes)} mistakes of the base; memory {len(patcher.memory)} rows from "
        f"{len(splits.memory)} inputs; held-out {len(splits.heldout)} inputs; setup {setup_s:.1f}s"
    )
    report: dict[str, Any] = {
        "base": lb.name,
        "task": task,
        "edits": len(mistakes),
        "seed": seed,
        "memory_inputs": len(splits.memory),
        "memory_rows": len(patcher.memory),
        "heldout_inputs": len(splits.heldout),
        "setup_seconds": round(setup_s, 1),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "machine": platform.processor() or platform.machine(),
        "train_config": asdict(train),
        "gate_config": asdict(patcher.gate_cfg),
    }
    report["cached"] = edit_stream(patcher, adapter, mistakes, "cached")
    if reference:
        patcher.train_cfg = replace(train, mode="reference", init="reference")
        ref_edits = mistakes[: reference_edits or len(mistakes)]
        report["reference"] = edit_stream(patcher, adapter, ref_edits, "reference")
        report["reference"]["edits"] = len(ref_edits)
        report["speedup"] = round(report["reference"]["median_ms"] / report["cached"]["median_ms"], 1)
        patcher.train_cfg = train
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\nbench edit: base {report['base']}, {report['edits']} sequential edits, "
        f"memory {report['memory_rows']} rows, held-out {report['heldout_inputs']} inputs"
    )
    print(f"{'trainer':<10} {'edits':>6} {'median ms':>10} {'p95 ms':>9} {'success':>8} {'retention':>9} {'steps':>6}")
    for name in ("cached", "reference"):
        r = report.get(name)
        if r is None:
            continue
        n = r.get("edits", report["edits"])
        print(
            f"{name:<10} {n:>6} {r['median_ms']:>10.1f} {r['p95_ms']:>9.1f} {r['success_rate']:>8.2f} "
            f"{r['retention'] if r['retention'] is not None else '-':>9} {r['median_steps']:>6}"
        )
    if "speedup" in report:
        print(f"speedup (reference median / cached median): {report['speedup']}x")
