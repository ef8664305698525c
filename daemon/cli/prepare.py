"""`patchd prepare NAME`: build a base model into the cache once, so later loads take a second.

torch and transformers are imported inside the handler, so `patchd --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

# kept in step with patching.bases.load.BASES (not imported: that module imports the task loaders)
BASE_NAMES: tuple[str, ...] = ("fever-minilm", "zsre-smollm2", "zsre-smollm2-qa")


def register(sub: Any, bench: Any) -> None:
    parser = sub.add_parser(
        "prepare",
        help="build a base model into the cache ($PATCHD_CACHE_DIR or ~/.cache/patchd/bases/NAME)",
        description=(
            "fever-minilm: fine-tune MiniLM-L6 on the fever train split (a few minutes on CPU). "
            "zsre-smollm2: convert the SmolLM2-135M GGUF to safetensors and score it zero-shot. "
            "zsre-smollm2-qa: zsre-smollm2 tuned to answer ParaRel facts asked in zsRE's own phrasings "
            "(~25 min on CPU; builds zsre-smollm2 first if needed). "
            "Skips a base that is already cached unless --force."
        ),
    )
    parser.add_argument("name", choices=BASE_NAMES, help="which base to build")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the shared data folder holding raw/ (default: $PATCHD_DATA_DIR, else ../shared/data)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the base is already cached")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and training (default 0)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=2,
        help="fever-minilm only: fine-tuning epochs (default 2: the train split has ~4,000 claims)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=200,
        help="zsre-smollm2(-qa) only: questions per split scored after the build (default 200)",
    )
    parser.add_argument(
        "--facts",
        type=int,
        default=None,
        help="zsre-smollm2-qa only: ParaRel facts to tune on, 3 phrasings each (default 1000)",
    )
    parser.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    # before torch loads: spinning OpenMP threads slow small matmuls ~10x on a shared CPU
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from patching.bases.prepare import prepare

    if args.facts is not None and args.facts < 1:
        print(f"patchd prepare: --facts must be at least 1, not {args.facts}")
        return 2
    options: dict[str, Any] = {"sample": args.sample}
    if args.name == "fever-minilm":
        options = {"epochs": args.epochs}
    elif args.name == "zsre-smollm2-qa":
        options["facts"] = args.facts
    try:
        prepare(args.name, data_dir=args.data_dir, seed=args.seed, force=args.force, **options)
    except FileNotFoundError as exc:  # missing data or model package: a message, not a traceback
        print(f"patchd prepare: {exc}")
        return 1
    return 0
