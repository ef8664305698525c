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


def input_from_key(key: str) -> InputValue:
    """The input back from its key (input_key's inverse): a text pair's key is its JSON object."""
    if key.startswith("{"):
        try:
            value = json.loads(key)
        except ValueError:
            return key
        if isinstance(value, dict) and isinstance(value.get("text"), str) and isinstance(value.get("text_pair"), str):
            return value["text"], value["text_pair"]
    return key


def fingerprint(model: str, value: InputValue, casefold: bool = False) -> str:
    key = input_key(normalise_input(value, casefold))
    return hashlib.sha256(f"{model}\x00{key}".encode()).hexdigest()
