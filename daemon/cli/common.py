"""What the command modules share: the --config help, a group's bare-name handler, and the settings
plus store that the operator commands open."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.settings import Settings
    from memory.store import Store

CONFIG_HELP = "TOML settings file (default: none; PATCHD_* environment variables still apply)"


def missing(parser: argparse.ArgumentParser) -> int:
    """A command group called without its subcommand: its help, exit 2."""
    parser.print_help(sys.stderr)
    return 2


def settings_and_store(args: argparse.Namespace) -> tuple[Settings, Store]:
    """The settings from --config and the environment (logs to stderr: stdout is the answer), and the
    store at the current schema (an operator command never migrates the daemon's database)."""
    from daemon.logs import configure_logging
    from daemon.settings import load_settings
    from memory.store import Store

    settings = load_settings(args.config, os.environ)
    configure_logging(settings.log.level, settings.log.json, stream=sys.stderr)
    return settings, Store.open(settings.database.url, upgrade=False)
