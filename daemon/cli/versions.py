"""`patchd versions | rollback | revoke | export`: the published versions and the operator's actions on them.

The work is in daemon/history.py; this module owns the arguments and the printing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.cli.common import CONFIG_HELP

if TYPE_CHECKING:
    from daemon.settings import Settings


def register(sub: Any, bench: Any) -> None:
    versions = sub.add_parser("versions", help="published versions: edits added/removed, size, which is LATEST")
    versions.add_argument("--config", type=Path, help=CONFIG_HELP)
    versions.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    versions.set_defaults(func=_versions)

    rollback = sub.add_parser(
        "rollback",
        help="publish a NEW version equal to version N; patches accepted after it are marked removed",
        description="History stays append-only: version N is not touched, a new version with exactly its "
        "patches is published and LATEST moves to it. Stop the daemon first (it holds the model's lock).",
    )
    rollback.add_argument("version", type=int, metavar="N")
    rollback.add_argument("--config", type=Path, help=CONFIG_HELP)
    rollback.set_defaults(func=_rollback)

    revoke = sub.add_parser(
        "revoke",
        help="remove one edit's neurons, re-check the other edits, publish a new version",
        description="EDIT_ID is the mistake id that manifests and `patchd versions --json` list. The other "
        "edits are checked with the gate's retention check first; if any would break, nothing changes "
        "unless --force. Stop the daemon first (it holds the model's lock).",
    )
    revoke.add_argument("edit_id", type=int, metavar="EDIT_ID")
    revoke.add_argument("--force", action="store_true", help="revoke even when other edits would break")
    revoke.add_argument("--config", type=Path, help=CONFIG_HELP)
    revoke.set_defaults(func=_revoke)

    why = sub.add_parser(
        "why",
        help="which published corrections shape the model's answer to TEXT, and who sent them",
        description="Reads a published version (LATEST's unless --version) as a downstream service does: "
        "the patches that fire where the model reads its answer, their share of the patch's change, and "
        "what the version carries about each (mistake, target, reports and reporters, first version).",
    )
    why.add_argument("text", metavar="TEXT", help="the input (a claim, or a question for a generator)")
    why.add_argument("--pair", metavar="TEXT", help="a classifier's second text (text_pair)")
    why.add_argument("--version", type=int, metavar="N", help="version to ask (default: LATEST's)")
    why.add_argument("--json", action="store_true", help="print JSON instead of lines")
    why.add_argument("--config", type=Path, help=CONFIG_HELP)
    why.set_defaults(func=_why)

    export = sub.add_parser(
        "export",
        help="a standalone model directory (base + patches) for a version: patching.load_patched(DIR, DIR)",
    )
    export.add_argument("--version", type=int, metavar="N", help="version to export (default: LATEST's)")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="new or empty directory")
    export.add_argument("--config", type=Path, help=CONFIG_HELP)
    export.set_defaults(func=_export)


def _why(args: argparse.Namespace) -> int:
    from daemon.explain import explain
    from daemon.history import HistoryError

    try:
        found = explain(_settings(args), args.text, args.pair, args.version)
    except HistoryError as exc:
        return _refused("why", exc)
    if args.json:
        print(json.dumps({"version": found.version, "answer": found.answer,
                          "patches": [f.as_dict() for f in found.firings]}, indent=2))  # fmt: skip
        return 0
    print(f"version {found.version} answers {found.answer!r}")
    if not found.firings:
        print("no patch fires on this input: the answer is the base model's")
    for f in found.firings:
        p = f.provenance
        print(f"  edit {f.edit_id}: share {f.share:+.2f}, activation {f.activation:.2f}")
        if p:
            who = ", ".join(p["reporters"]) + (" ..." if p["reporter_count"] > len(p["reporters"]) else "")
            print(f"    mistake {p['mistake_id']}: {p['input']!r} -> {p['target']!r}")
            print(f"    {p['report_count']} reports by {p['reporter_count']} reporters ({who or 'anonymous'}); "
                  f"accepted {p['accepted_at']}; first in version {p['first_version']}")  # fmt: skip
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    from daemon.logs import configure_logging
    from daemon.settings import load_settings

    settings = load_settings(args.config, os.environ)
    configure_logging(settings.log.level, settings.log.json, stream=sys.stderr)  # stdout is the result
    return settings


def _refused(command: str, exc: Exception) -> int:
    print(f"patchd {command}: {exc}", file=sys.stderr)
    return 1


def _versions(args: argparse.Namespace) -> int:
    from daemon.history import version_rows

    rows = version_rows(_settings(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no versions published yet")
        return 0
    head = ("version", "parent", "edits", "neurons", "added", "removed", "created", "size", "")
    table = [head]
    for r in rows:
        note = "LATEST" if r["latest"] else ("" if r["on_storage"] else "pruned")
        if r.get("rollback_of") is not None:
            note = f"{note} rollback of {r['rollback_of']}".strip()
        elif r.get("reason") == "revoke":
            note = f"{note} revoke".strip()
        table.append(
            (
                str(r["version"]),
                "-" if r["parent"] is None else str(r["parent"]),
                str(r["edits"]),
                str(r.get("neurons", "-")),
                f"+{len(r['added'])}",
                f"-{len(r['removed'])}",
                r["created"][:19].replace("T", " "),
                _size(r.get("size")),
                note,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        cells = (c.rjust(w) if i < 6 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        print("  ".join(cells).rstrip())
    return 0


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def _rollback(args: argparse.Namespace) -> int:
    from daemon.history import HistoryError, rollback

    try:
        published = rollback(_settings(args), args.version)
    except HistoryError as exc:
        return _refused("rollback", exc)
    if published is None:
        print(f"the current patch set already is version {args.version}'s and LATEST holds it: nothing published")
        return 0
    print(
        f"published version {published.number} = version {args.version} ({len(published.edits)} edits; "
        f"{len(published.removed)} later edit(s) removed: {', '.join(map(str, published.removed[:20]))})"
    )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from daemon.history import HistoryError, revoke

    try:
        result = revoke(_settings(args), args.edit_id, force=args.force)
    except HistoryError as exc:
        return _refused("revoke", exc)
    version = result.published.number if result.published else "none (nothing changed on storage)"
    print(f"revoked edit {result.edit_id} ({result.neurons} neuron(s)); published version {version}")
    if result.broken:
        print(f"forced: these edits are now wrong: {', '.join(map(str, result.broken))}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from daemon.history import HistoryError, export

    try:
        number, out = export(_settings(args), args.version, args.out)
    except HistoryError as exc:
        return _refused("export", exc)
    print(f"exported version {number} to {out} (load it with patching.load_patched('{out}', '{out}'))")
    return 0
