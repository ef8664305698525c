"""`patchd keys generate --out DIR`: an Ed25519 key pair for signed releases (patching/signing.py).

DIR/signing.key is the publisher's private key (mode 0600; `[publish] signing_key` names it, or a
systemd credential called signing.key); DIR/signing.pub goes to every downstream service, whose
`trusted_keys` list it. An existing key is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from daemon.cli.common import missing


def register(sub: Any, bench: Any) -> None:
    keys = sub.add_parser("keys", help="signing keys for published versions")
    keys.set_defaults(func=lambda args: missing(keys))
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    generate = actions.add_parser(
        "generate",
        help="write a new Ed25519 key pair: DIR/signing.key (private, 0600) and DIR/signing.pub",
        description="Write a new Ed25519 key pair for signing published versions. The publisher reads "
        "DIR/signing.key ([publish] signing_key); downstream services trust DIR/signing.pub "
        "(trusted_keys). Refuses to overwrite an existing key.",
    )
    generate.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the two files")
    generate.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from patching.signing import SigningError, generate

    try:
        private, public, kid = generate(args.out)
    except (SigningError, OSError) as exc:
        print(f"patchd keys generate: {exc}", file=sys.stderr)
        return 1
    print(f"key {kid}")
    print(f"private: {private} (mode 0600): set [publish] signing_key to it, or load it as a systemd credential")
    print(f"public:  {public}: give it to downstream services as one of their trusted_keys")
    return 0
