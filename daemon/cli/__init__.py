"""The `patchd` command line.

Each group of commands lives in its own module (`daemon/cli/*.py`) that exposes
`register(sub, bench)`: `sub` is the top-level subparsers object, `bench` the one
under `patchd bench`. Handlers import torch/transformers lazily so that
`patchd --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

# imported, not looked up by name: a command module that fails to import is a packaging error,
# and `patchd` must fail with it rather than run without those commands
from daemon.cli import bench, config, db, demo, evaluate, kafka, keys, mend, prepare, review, run, versions
from daemon.cli.common import missing

# Modules that add commands, in help order; each owns its commands' arguments and handlers.
COMMAND_MODULES: tuple[ModuleType, ...] = (
    bench,  # bench edit | store | ingest | daemon | e2e
    db,  # db upgrade | current | copy
    prepare,  # prepare fever-minilm | zsre-smollm2 | zsre-smollm2-qa
    evaluate,  # evaluate
    mend,  # mend train
    run,  # run, status, check, replay
    kafka,  # kafka stuck | skip | retry
    review,  # review list | approve | dismiss
    versions,  # versions, rollback, revoke, export
    config,  # config check
    keys,  # keys generate
    demo,  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchd",
        description="Fix a deployed transformer's reported mistakes, one neuron per mistake.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench_parser = sub.add_parser("bench", help="benchmarks that print numbers (and write JSON with --json)")
    bench_sub = bench_parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bench_parser.set_defaults(func=lambda args: missing(bench_parser))
    for module in COMMAND_MODULES:
        module.register(sub, bench_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    result = func(args)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
