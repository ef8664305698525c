"""`patchd bench edit`: the editing benchmark (cached trainer vs reference procedure)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from patching.config import ACTIVATIONS


def register(sub: Any, bench: Any) -> None:
    p = bench.add_parser(
        "edit",
        help="sequential real edits with the gate: cached trainer vs the reference procedure",
        description="Edit the mistakes of a prepared base one after another, once with the cached "
        "trainer and once with the reference procedure (full forward every step), with the gate "
        "on the held-out set; print a table and optionally write JSON.",
    )
    p.add_argument("--base", default="fever-minilm", help="prepared base name or local model directory "
                   "(default: fever-minilm)")
    p.add_argument("--edits", type=int, default=50, help="number of sequential edits (default: 50)")
    p.add_argument("--data-dir", type=Path, default=None, help="data directory (default: ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed (default: 0)")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON to this file")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-mode run")
    p.add_argument("--reference-edits", type=int, default=None,
                   help="edit only the first N mistakes in reference mode (default: all)")
    p.add_argument("--activation", choices=ACTIVATIONS, default=None, help="patch activation")
    p.add_argument("--mining-interval", type=int, default=None,
                   help="hard-negative mining: full M@k every N steps (0 = every step)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=_bench_edit)


def _bench_edit(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from patching.bench import print_table, run_edit_bench
    from patching.config import TrainConfig

    train = TrainConfig()
    if args.activation:
        train = replace(train, activation=args.activation)
    if args.mining_interval is not None:
        train = replace(train, mining_interval=args.mining_interval)
    report = run_edit_bench(
        args.base, edits=args.edits, data_dir=args.data_dir, seed=args.seed, reference=not args.no_reference,
        reference_edits=args.reference_edits, train=train, threads=args.threads,
    )
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
