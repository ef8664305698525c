"""A generator's finished prompt: a chat form (patching/augment.py) that TaskAdapter.text sends as
it is, without the base's question format around it. Its own module, free of torch, so that the
augmentation that makes it and the adapter that reads it do not import each other."""

from __future__ import annotations


class Prompt(str):
    """A finished prompt (a chat template applied)."""
