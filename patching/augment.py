"""Context augmentation: each edit is also trained behind N unrelated prefixes.

A patch trained on the bare question holds for that string and little else: put one unrelated
sentence before it and the neuron's key no longer matches the last position's hidden state
(issue 21: cr 0.09 on zsre-smollm2). Training the same edit behind a few prefixes, as extra rows
with the same target, teaches the key the part of q that survives a context. The rows are the
engine's train equivalents: they help, they never block a patch (patching/engine.py).

Where the prefixes come from (`source`):
- "memory": the last N inputs of the memory part (texts of M: unrelated to any edit by
  construction, and in the base's own input distribution);
- "generated": a generator's own greedy continuations of a few seed words, as WISE makes them.
  A fine-tuned base's free text can be degenerate ("The -the-world-is-a-world"), so "memory" is
  the default; a classifier always uses memory texts.

Used by the daemon (`[policy] context_prefixes`, daemon/model.py) and by `patchd evaluate
--context-augment`; evaluation keeps its context pool out of the memory texts, so a prefix is
never a text cr is measured behind.

Chat copies (`evaluate --chat-copies N`, a generator whose tokenizer has a chat template): the edit's
prompt also trained as the last user turn of a chat, after one of a few training system prompts and
an earlier exchange whose question is one of the prefixes, as a chat client sends it. A prefix
trains the neuron behind plain text only: inside the template (cr_chat) the fix held 0.21-0.24 of
the time against cr 0.68-0.72. Three chat copies raised GR, cr and cgr on zsre-smollm2 (0.69 ->
0.75, 0.71 -> 0.78, 0.40 -> 0.55) but cr_chat only to 0.25 (docs/results/levers-21.md); the daemon
trains them by default (`[policy] context_chat_copies`). The training system prompts and replies
are not those cr_chat asks with (patching/eval/contexts.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from patching.prompt import Prompt

if TYPE_CHECKING:  # settings import Source: `patchd --help` must not load torch
    from patching.bases.tasks import TaskAdapter
    from patching.encode import ModelInput

Source = Literal["memory", "generated"]
SOURCES: tuple[Source, ...] = ("memory", "generated")

# seed words a generator continues into prefixes (source "generated")
AUGMENT_SEEDS = ("The", "In", "However,", "I", "This", "When", "A", "It", "We", "There")
AUGMENT_TOKENS = 10  # tokens of each generated prefix


# chat copies: system prompts and earlier replies to train with (None = the template's own default
# system prompt); never the ones cr_chat is measured with (patching/eval/contexts.py)
TRAIN_SYSTEMS: tuple[str | None, ...] = (None, "You answer questions about the world.", "Be brief and factual.")
TRAIN_REPLIES = ("Let me think.", "Good question.", "I do not know.")


def chat_trainable(adapter: TaskAdapter, prefixes: Sequence[str]) -> bool:
    """Whether a base can train chat copies: a generator whose tokenizer has a chat template, with
    prefixes for the earlier questions."""
    return adapter.generation and bool(getattr(adapter.base.tokenizer, "chat_template", None)) and bool(prefixes)


def chat_form(tokenizer: Any, prompt: str, earlier: str, system: str | None, reply: str) -> Prompt | None:
    """`prompt` as the last user turn of a chat, after `system` (None: no system turn, so the
    template's default) and an earlier exchange (`earlier`, `reply`); None without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages += [
        {"role": "user", "content": earlier},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": prompt},
    ]
    return Prompt(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def chat_copies(tokenizer: Any, prompt: str, prefixes: Sequence[str], n: int, offset: int = 0) -> list[Prompt]:
    """n chat forms of `prompt` (the base's question format already applied): earlier questions
    from `prefixes` and the training systems and replies, rotating with `offset` (an edit's number)
    so that a stream's edits see them all; [] without a chat template or prefixes."""
    if not prefixes or not getattr(tokenizer, "chat_template", None):
        return []
    out = []
    for j in range(n):
        k = offset * n + j
        form = chat_form(
            tokenizer,
            prompt,
            prefixes[k % len(prefixes)],
            TRAIN_SYSTEMS[k % len(TRAIN_SYSTEMS)],
            TRAIN_REPLIES[(k // len(TRAIN_SYSTEMS)) % len(TRAIN_REPLIES)],
        )
        assert form is not None
        out.append(form)
    return out


def with_context(context: str, text: str) -> str:
    """The input a user sends after `context`: the two texts, one space apart."""
    return f"{context.strip()} {text.strip()}"


def memory_prefixes(memory: Sequence[ModelInput], n: int) -> list[str]:
    """The last n memory inputs as prefixes (a pair's first text), empty and repeated texts skipped."""
    out: list[str] = []
    for value in reversed(memory):
        if len(out) >= n:
            break
        text = (value[0] if isinstance(value, tuple) else value).strip()
        if text and text not in out:
            out.append(text)
    return out[::-1]


def generated_prefixes(model: Any, tokenizer: Any, n: int) -> list[str]:
    """A generator's greedy continuation of up to AUGMENT_TOKENS tokens after each of n seed words."""
    from patching.bases.qa import greedy_ids  # generation only

    seeds = list(AUGMENT_SEEDS[:n])
    outs = greedy_ids(model, tokenizer, seeds, max_new_tokens=AUGMENT_TOKENS)
    texts = (tokenizer.decode(ids, skip_special_tokens=True) for ids in outs)
    return [f"{seed} {text.strip()}".strip().split("\n")[0] for seed, text in zip(seeds, texts, strict=True)]


def augment_prefixes(
    adapter: TaskAdapter, memory: Sequence[ModelInput], n: int, source: Source = "memory"
) -> list[str]:
    """n training prefixes (module docstring)."""
    if source not in SOURCES:
        raise ValueError(f"prefix source {source!r}: expected one of {', '.join(SOURCES)}")
    if n <= 0:
        return []
    if source == "generated" and adapter.generation:
        return generated_prefixes(adapter.base.model, adapter.base.tokenizer, n)
    return memory_prefixes(memory, n)
