"""The `patchd` command line.

Each group of commands lives in its own module (`daemon/cmd_*.py`) that exposes
`register(sub, bench)`: `sub` is the top-level subparsers object, `bench` the one
under `patchd bench`. Handlers import torch/transformers lazily so that
`patchd --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that add commands; each owns its commands' arguments and handlers.
COMMAND_MODULES: tuple[str, ...] = (
    "daemon.cmd_engine",  # bench edit
    "daemon.cmd_db",  # db upgrade / current / copy, bench store
    "daemon.cmd_prepare",  # prepare fever-minilm | zsre-smollm2 | zsre-smollm2-qa
    "daemon.cmd_evaluate",  # evaluate
    "daemon.cmd_mend",  # mend train
    "daemon.cmd_run",  # run, status, check, replay
    "daemon.cmd_bench",  # bench ingest, bench daemon, bench e2e
    "daemon.cmd_versions",  # versions, rollback, revoke, export
    "daemon.cmd_config",  # config check
    "daemon.cmd_demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchd",
        description="Fix a deployed transformer's reported mistakes, one neuron per mistake.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench_parser = sub.add_parser("bench", help="benchmarks that print numbers (and write JSON with --json)")
    bench = bench_parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bench_parser.set_defaults(func=lambda args: _missing(bench_parser))
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command group not written yet must not break the others
            if exc.name != name:
                raise
            continue
        module.register(sub, bench)
    return parser


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


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
