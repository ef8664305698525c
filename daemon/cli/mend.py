"""`patchd mend train`: train a MEND editor (the second editor of `patchd evaluate --editor mend`)."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path
from typing import Any


def register(sub: Any, bench: Any) -> None:
    mend = sub.add_parser("mend", help="MEND, a trained gradient-transform editor, for side-by-side evaluation")
    msub = mend.add_subparsers(dest="mend_command", metavar="COMMAND")
    mend.set_defaults(func=lambda args: (mend.print_help(), 2)[1])
    p = msub.add_parser(
        "train",
        help="train (or resume) a MEND editor for a base",
        description="Train MEND's editor for BASE on training examples of TASK that no evaluation uses "
        "(fever: train[1000:]; zsre: the memory split's answered questions). Checkpointed every few minutes "
        "and on Ctrl-C; running again with the same --out resumes.",
    )
    p.add_argument("--base", required=True, help="prepared base (fever-minilm, zsre-smollm2) or model directory")
    p.add_argument("--data", required=True, choices=["fever", "zsre", "counterfact"], help="task")
    p.add_argument("--data-dir", type=Path, default=None, help="data directory (default: ../shared/data)")
    p.add_argument("--steps", type=int, default=None, help="stop at this many steps in total")
    p.add_argument("--minutes", type=float, default=None, help="stop after this much wall time (this run)")
    p.add_argument("--rank", type=int, default=None, help="editor rank (default: 256)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate of the editor (default: 1e-4)")
    p.add_argument("--accumulate", type=int, default=None, help="steps per optimiser update (default: 1)")
    p.add_argument("--loc-batch", type=int, default=None, help="unrelated inputs per step (default: 4)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: 1000)")
    p.add_argument("--layers", type=int, default=None, help="edit the FFNs of the last N layers (default: 3)")
    p.add_argument("--gate-proj", action="store_true", help="Llama-style models: also edit gate_proj")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed (default: 0)")
    p.add_argument("--out", type=Path, default=None, help="editor directory (default: the cache's mend/BASE)")
    p.add_argument("--json", type=Path, default=None, help="write the training summary as JSON here")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from patching.bases.load import cache_root, load_base
    from patching.eval.mend.data import pool_for
    from patching.eval.mend.train import MendTrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = MendTrainConfig(seed=args.seed)
    for flag, name in (
        ("rank", "rank"),
        ("lr", "lr"),
        ("accumulate", "accumulate"),
        ("loc_batch", "loc_batch"),
        ("val_every", "val_every"),
        ("layers", "n_layers"),
    ):
        if getattr(args, flag) is not None:
            cfg = replace(cfg, **{name: getattr(args, flag)})
    if args.gate_proj:
        cfg = replace(cfg, gate_proj=True)
    out = args.out or cache_root() / "mend" / Path(args.base).name
    lb = load_base(args.base)
    pool, source = pool_for(args.data, args.data_dir, seed=args.seed)
    # SIGTERM (systemd, kill) saves the editor like Ctrl-C does
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    summary = train(lb, pool, source, out, cfg, steps=args.steps, minutes=args.minutes)
    summary["task"] = args.data
    printable = {k: v for k, v in summary.items() if k not in ("edited", "validation")}
    print(json.dumps({**printable, "validation_last": summary["validation"][-1]}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
