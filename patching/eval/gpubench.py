"""The whole GPU measurement in one call, written to one JSON file (deploy/gpu-bench.sh runs it).

    # on this machine (CPU): a bfloat16 fever-minilm and real FEVER claims, small enough to carry
    python -m patching.eval.gpubench --prepare gpu-carry
    # on the GPU machine (torch, transformers, safetensors and this repository; nothing else)
    python -m patching.eval.gpubench --carry gpu-carry --out gpu-bench.json

Parts, each with its own budget so the whole fits in about 8 minutes on one H200:
- fever-minilm in bfloat16 on real FEVER claims (when --carry holds it): the cached trainer's
  median and p95 per edit including the gate, the reference procedure on 3 edits and the speedup,
  peak GPU memory, inference overhead of 1,000 and 10,000 patch neurons;
- real-size architectures with RANDOM weights (patching/eval/synthetic.py), by default the
  published sizes of Llama-3.2-1B and Llama-3.1-8B: per edit at 100 training steps with a memory M
  of 10,000 rows, the reference procedure on 3 edits, peak GPU memory, inference overhead.
The report checks the issue's targets (fever-minilm <= 10 ms per edit and >= 100x; the 8B-size
config <= 1 s per edit; overhead at 10,000 neurons <= 1 % on the 8B-size config).

Imports only torch, transformers (and its own dependencies: tqdm, numpy) and patching/.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

MINILM = "fever-minilm"
CLAIMS = "claims.json"
DEFAULT_CONFIGS = ("llama-3.2-1b", "llama-3.1-8b")
TARGETS = {
    "minilm_ms_per_edit": 10.0,
    "minilm_speedup": 100.0,
    "8b_ms_per_edit": 1000.0,
    "8b_overhead_pct_at_10000": 1.0,
}


def prepare(out: Path, memory: int = 4000, heldout: int = 1000, edits: int = 200, seed: int = 0) -> Path:
    """A carry directory: fever-minilm in bfloat16 (about 45 MB) and real FEVER claims (memory,
    held-out, edit candidates). Run where the prepared base and the data are (this machine)."""
    from patching.bases.datasets import load_task
    from patching.bases.load import load_base

    out.mkdir(parents=True, exist_ok=True)
    lb = load_base(MINILM, dtype=torch.bfloat16)
    target = out / MINILM
    if target.exists():
        shutil.rmtree(target)
    lb.model.save_pretrained(target, safe_serialization=True)
    lb.tokenizer.save_pretrained(target)
    meta = lb.directory / "patchd_base.json"
    if meta.is_file():
        shutil.copy(meta, target / meta.name)
    splits = load_task("fever", seed=seed)
    claims = {
        "memory": [e.input for e in splits.memory[:memory]],
        "heldout": [e.input for e in splits.heldout[:heldout]],
        "edits": [{"input": e.input, "target": e.target} for e in splits.edit[:edits]],
    }
    (out / CLAIMS).write_text(json.dumps(claims))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {size / 2**20:.1f} MiB (the device tool carries at most 64 MiB)")
    return out


def minilm_part(carry: Path, device: str, edits: int, reference_edits: int) -> dict[str, Any]:
    """fever-minilm in bfloat16 on real claims: the cached trainer with the gate, the reference."""
    from dataclasses import replace

    from patching.bases.datasets import Example
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter
    from patching.config import GateConfig, TrainConfig
    from patching.engine import Patcher
    from patching.eval.bench import edit_stream
    from patching.eval.synthetic import inference_overhead

    claims = json.loads((carry / CLAIMS).read_text())
    lb = load_base(str(carry / MINILM), dtype=torch.bfloat16)
    lb.model.to(device)
    adapter = TaskAdapter(lb)
    train = TrainConfig()
    patcher = Patcher(lb.model, train=train, gate=GateConfig())
    t0 = time.perf_counter()
    adapter.patcher(patcher, claims["memory"], claims["heldout"])
    setup_s = time.perf_counter() - t0
    examples = [Example(e["input"], e["target"]) for e in claims["edits"]]
    mistakes = adapter.mistakes(examples, limit=edits, base=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    report: dict[str, Any] = {
        "base": MINILM,
        "dtype": "bfloat16",
        "edits": len(mistakes),
        "memory_rows": len(patcher.memory),
        "heldout_inputs": len(claims["heldout"]),
        "setup_seconds": round(setup_s, 1),
        "cached": edit_stream(patcher, adapter, mistakes, "cached"),
    }
    report["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None
    patcher.train_cfg = replace(train, mode="reference", init="reference")
    report["reference"] = edit_stream(patcher, adapter, mistakes[:reference_edits], "reference")
    patcher.train_cfg = train.for_task(False)
    report["speedup"] = round(report["reference"]["median_ms"] / report["cached"]["median_ms"], 1)
    vocab = int(lb.model.config.vocab_size)
    report["inference_overhead"] = inference_overhead(patcher, (1_000, 10_000), vocab, 32, device, torch.Generator())
    for part in ("cached", "reference"):
        report[part]["edits"] = len(report[part].pop("rows", []))  # the medians are the point, not the rows
    return report


def run(
    carry: Path | None,
    configs: tuple[str, ...],
    device: str,
    steps: int,
    edits: int,
    memory_rows: int,
    reference_edits: int,
    minilm_edits: int,
    out: Path | None = None,
) -> dict[str, Any]:
    """Every part in turn; with `out`, the report so far is written after each part, so a run cut
    short by its time limit still leaves the parts it finished."""
    from patching.bases.load import resolve_dtype
    from patching.eval.synthetic import run_synthetic_bench

    dtype = resolve_dtype("auto", device)  # bfloat16 on CUDA, float32 on a CPU
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "settings": {"steps": steps, "edits": edits, "memory_rows": memory_rows, "reference_edits": reference_edits},
        "minilm": None,
        "configs": {},
    }

    def save() -> None:
        report["targets"] = check_targets(report)
        report["wall_seconds"] = round(time.perf_counter() - t0, 1)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")

    if carry is not None:
        print(f"--- {MINILM} (bfloat16, real FEVER claims) on {device}", flush=True)
        report["minilm"] = minilm_part(carry, device, minilm_edits, reference_edits)
        _free(device)
        save()
    for name in configs:
        print(f"--- config:{name} on {device}", flush=True)
        report["configs"][name] = run_synthetic_bench(
            name,
            steps=steps,
            edits=edits,
            memory_rows=memory_rows,
            reference_edits=reference_edits,
            dtype=dtype,
            device=device,
        )
        _free(device)
        save()
    save()
    return report


def check_targets(report: dict[str, Any]) -> dict[str, Any]:
    """Each target of the issue with the measured figure and whether it is met (None: not measured)."""
    out: dict[str, Any] = {}
    m = report.get("minilm")
    if m:
        out["minilm_ms_per_edit"] = _target(m["cached"]["median_ms"], TARGETS["minilm_ms_per_edit"], below=True)
        out["minilm_speedup"] = _target(m["speedup"], TARGETS["minilm_speedup"], below=False)
    big = report["configs"].get("llama-3.1-8b")
    if big:
        out["8b_ms_per_edit"] = _target(big["cached"]["median_ms"], TARGETS["8b_ms_per_edit"], below=True)
        at = [r["overhead_pct"] for r in big["inference_overhead"] if r["neurons"] == 10_000]
        if at:
            out["8b_overhead_pct_at_10000"] = _target(max(at), TARGETS["8b_overhead_pct_at_10000"], below=True)
    return out


def _target(value: float, limit: float, below: bool) -> dict[str, Any]:
    return {"measured": value, "target": limit, "met": value <= limit if below else value >= limit}


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m patching.eval.gpubench",
        description="The GPU measurement of patchd in one call (module docstring); writes one JSON file.",
    )
    p.add_argument("--prepare", type=Path, metavar="DIR", help="write the carry directory (bfloat16 base, claims)")
    p.add_argument("--carry", type=Path, metavar="DIR", help="a directory --prepare wrote: adds the fever-minilm part")
    p.add_argument("--out", type=Path, default=Path("gpu-bench.json"), help="the JSON report (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when there is one)")
    p.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help="real-size configs with random weights, comma-separated (default: %(default)s; '' for none)",
    )
    p.add_argument("--steps", type=int, default=100, help="training steps per synthetic edit (default: %(default)s)")
    p.add_argument("--edits", type=int, default=20, help="synthetic edits per config (default: %(default)s)")
    p.add_argument("--memory-rows", type=int, default=10_000, help="rows of M per config (default: %(default)s)")
    p.add_argument("--reference-edits", type=int, default=3, help="edits of the reference procedure (default: 3)")
    p.add_argument("--minilm-edits", type=int, default=50, help="real FEVER mistakes edited (default: %(default)s)")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return 0
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    report = run(
        args.carry,
        configs,
        device,
        args.steps,
        args.edits,
        args.memory_rows,
        args.reference_edits,
        args.minilm_edits,
        out=args.out,
    )
    summary = {k: v["measured"] for k, v in report["targets"].items()}
    met = all(v["met"] for v in report["targets"].values())
    verdict = "all met" if met else "NOT all met"
    print(f"wrote {args.out} in {report['wall_seconds']} s; the targets (for one H200) {summary}: {verdict}")
    for name, r in report["configs"].items():
        print(f"config:{name}: median {r['cached']['median_ms']} ms per edit, speedup {r.get('speedup')}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
