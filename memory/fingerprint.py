"""Normalisation and fingerprint of a reported input: what makes two reports "the same mistake".

The fingerprint is sha256 over the model name and the normalised input, so the same input
reported against two models is two mistakes. Normalisation: Unicode NFKC, whitespace runs
collapsed to one space and stripped; case is kept unless `casefold=True` (a setting), because
for many tasks case carries meaning.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

_WS = re.compile(r"\s+")

InputValue = str | tuple[str, str]


def normalise_text(text: str, casefold: bool = False) -> str:
    text = _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()
    return text.casefold() if casefold else text


def normalise_input(value: InputValue, casefold: bool = False) -> InputValue:
    if isinstance(value, tuple):
        return (normalise_text(value[0], casefold), normalise_text(value[1], casefold))
    return normalise_text(value, casefold)


def input_key(value: InputValue) -> str:
    """A stable string form of a (normalised) input: the text itself, or JSON for a text pair."""
    if isinstance(value, tuple):
        return json.dumps({"text": value[0], "text_pair": value[1]}, ensure_ascii=False, sort_keys=True)
    return value


def fingerprint(model: str, value: InputValue, casefold: bool = False) -> str:
    key = input_key(normalise_input(value, casefold))
    return hashlib.sha256(f"{model}\x00{key}".encode()).hexdigest()
