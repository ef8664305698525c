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

A lever against the failure cr measures (`evaluate --context-augment N`): each edit is also
trained on its input behind N prefixes, as extra rows with the same target (the trainer's train
equivalents: they help, never block). A generator's prefixes are its own greedy continuations of a
few seed words, as WISE makes them; a classifier's are memory texts (in M, never in the pool).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def with_context(context: str, text: str) -> str:
    """The input a user sends after `context`: the two texts, one space apart."""
    return f"{context.strip()} {text.strip()}"


def chat_prompt(tokenizer: Any, prompt: str, earlier: str) -> str | None:
    """`prompt` as the last user turn of a chat, after a system prompt and an earlier exchange;
    None when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": earlier},
        {"role": "assistant", "content": EARLIER_REPLY},
        {"role": "user", "content": prompt},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


# seed words a generator continues into training prefixes (WISE generates its prefixes the same way)
AUGMENT_SEEDS = ("The", "In", "However,", "I", "This", "When", "A", "It", "We", "There")
AUGMENT_TOKENS = 10  # tokens of each generated prefix


def augment_prefixes(adapter: Any, memory: Sequence[Example], n: int) -> list[str]:
    """n training prefixes for context augmentation (module docstring); none is in the context pool."""
    if n <= 0:
        return []
    if not adapter.generation:
        return [m.input for m in memory[-n:]]
    from patching.bases.qa import greedy_ids  # generation only

    tok = adapter.base.tokenizer
    out: list[str] = []
    for ids in greedy_ids(adapter.base.model, tok, list(AUGMENT_SEEDS[:n]), max_new_tokens=AUGMENT_TOKENS):
        out.append(tok.decode(ids, skip_special_tokens=True))
    return [f"{seed} {text.strip()}".strip().split("\n")[0] for seed, text in zip(AUGMENT_SEEDS, out, strict=False)]
