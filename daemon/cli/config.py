"""`patchd config check FILE`: validate a settings file and print the values the daemon would use.

The check is load_settings itself (defaults < FILE < PATCHD_* environment), so it can never
disagree with `patchd run`; a bad file exits 1 with the message that names the key and its
source. Secrets (Kafka passwords, the database URL's password) are printed masked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from daemon.cli.common import missing


def register(sub: Any, bench: Any) -> None:
    config = sub.add_parser("config", help="check a settings file")
    config.set_defaults(func=lambda args: missing(config))
    actions = config.add_subparsers(dest="config_command", metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="validate FILE and print the effective settings (secrets masked); exit 1 when invalid",
        description="Validate a TOML settings file as `patchd run --config FILE` would read it, with the "
        "PATCHD_* environment applied on top, and print every effective value with secrets masked.",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="the TOML settings file")
    check.add_argument("--json", action="store_true", help="print the effective settings as JSON")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from daemon.settings import ENV_PREFIX, SettingsError, effective_settings, load_settings

    try:
        settings = load_settings(args.file, os.environ)
    except SettingsError as exc:
        print(f"patchd config check: {exc}", file=sys.stderr)
        return 1
    effective = effective_settings(settings)
    if args.json:
        print(json.dumps(effective, indent=2))
        return 0
    print(f"# {args.file}: valid")
    overrides = sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and _is_setting(k))
    if overrides:
        print(f"# overridden by the environment: {', '.join(overrides)}")
    for line in flatten(effective):
        print(line)
    return 0


def flatten(effective: dict[str, Any]) -> list[str]:
    """`section.key = value` lines (values as JSON; null = unset) in the sections' order."""
    lines = []
    for name, value in effective.items():
        if isinstance(value, dict):
            lines += [f"{name}.{key} = {json.dumps(item)}" for key, item in value.items()]
        else:
            lines.append(f"{name} = {json.dumps(value)}")
    return lines


def _is_setting(var: str) -> bool:
    from daemon.settings import ENV_PREFIX, SECTIONS, TOP_LEVEL

    rest = var[len(ENV_PREFIX) :].lower()
    return rest in TOP_LEVEL or rest.partition("_")[0] in SECTIONS
