"""Unrelated context before an edit's question: the cr / cgr metrics of `patchd evaluate`.

A fix must hold where users ask, and users rarely send the bare question: an earlier sentence, a
system prompt or a chat turn comes first. Measured right after each edit, like SR and GR:

- cr: the edit's own input with an unrelated text before it ("Tilda Swinton is a vegan. Which war
  did Milton F. Pavlic serve in?"), over CONTEXTS_PER_EDIT texts;
- cgr: each paraphrase of the edit with one such text before it;
- cr_chat (a generator whose tokenizer has a chat template): the edit's prompt sent inside that
  template after a system prompt and an earlier turn, as a chat client sends it.

The texts: an edit's own `contexts` (generic format), else a pool held out of the task's memory
part (`context_pool`): never in M, never an edit or a paraphrase, so no editor trains on them.

The lever against the failure cr measures, context augmentation (`evaluate --context-augment N`,
the daemon's `[policy] context_prefixes`), is patching/augment.py: its memory-text prefixes come
from M, never from the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patching.augment import chat_form
from patching.bases.datasets import Example

CONTEXT_POOL = 100  # memory inputs held out of M as context texts (built-in tasks)
CONTEXTS_PER_EDIT = 3  # context texts each edit is asked behind (cr)
SYSTEM_PROMPT = "You are a helpful assistant. Answer each question with the fact it asks for."
EARLIER_REPLY = "I am not sure about that one."


def pool_from_memory(memory: Sequence[Example], size: int = CONTEXT_POOL) -> tuple[list[Example], list[str]]:
    """(memory left for M, context pool): the pool is the last `size` inputs of the memory part,
    at most a tenth of it, so that M keeps nine tenths or more."""
    take = min(size, len(memory) // 10)
    if take == 0:
        return list(memory), []
    return list(memory[:-take]), [m.input for m in memory[-take:]]


def contexts_for(i: int, own: Sequence[str], pool: Sequence[str], k: int = CONTEXTS_PER_EDIT) -> list[str]:
    """The context texts edit i is asked behind: its own, else k of the pool, rotating with i."""
    if own:
        return list(own)
    if not pool:
        return []
    return [pool[(i * k + j) % len(pool)] for j in range(min(k, len(pool)))]


def chat_prompt(tokenizer: Any, prompt: str, earlier: str) -> str | None:
    """`prompt` as the last user turn of a chat, after a system prompt and an earlier exchange;
    None when the tokenizer has no chat template."""
    form = chat_form(tokenizer, prompt, earlier, SYSTEM_PROMPT, EARLIER_REPLY)
    return None if form is None else str(form)
