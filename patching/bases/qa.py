"""Generation helpers: the prompt format, greedy answers and exact match (DESIGN §7).

A generated answer is the greedy continuation of the prompt up to the first newline, stripped;
it is scored by exact match against the true answer. Batches are left-padded so that every
prompt's last token sits at the same position and the next token is read from one column.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

# The format both probes in DESIGN §3 used; an instruct model answers it on one line.
DEFAULT_PROMPT_FORMAT = "Question: {question}\nAnswer:"


def prompt_for(question: str, fmt: str = DEFAULT_PROMPT_FORMAT) -> str:
    """The model input for a question: `fmt` with `{question}` filled in (stripped question)."""
    return fmt.format(question=question.strip())


def exact_match(pred: str, gold: str) -> bool:
    """Exact match of the stripped strings; case and punctuation count. (The paper's code also
    lowercases both sides; none of the first 256 zsRE edit questions differs by case only.)"""
    return pred.strip() == gold.strip()


def cut_answer(text: str) -> str:
    """The answer part of a continuation: everything before the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def _newline_token_ids(tokenizer: Any) -> torch.Tensor:
    """Ids of every vocabulary token whose text contains a newline (generation may stop there)."""
    ids = []
    for token_id in range(len(tokenizer)):
        if "\n" in tokenizer.decode([token_id]):
            ids.append(token_id)
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


_NEWLINE_CACHE: dict[int, torch.Tensor] = {}


def _stop_ids(tokenizer: Any) -> torch.Tensor:
    # decoding the whole vocabulary costs ~0.5 s for 49k tokens, so it is done once per tokenizer
    key = id(tokenizer)
    if key not in _NEWLINE_CACHE:
        _NEWLINE_CACHE[key] = _newline_token_ids(tokenizer)
    return _NEWLINE_CACHE[key]


def _forward_options(model: Any) -> tuple[str, dict[str, Any]]:
    """The KV-cache argument's name and the extra options this model's forward accepts.

    transformers 5.2x renamed `past_key_values` to `cache` on some models (Llama) and not yet on
    others; `logits_to_keep=1` skips the LM head on all but the last position of the prompt.
    """
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return cache_arg, extra


@torch.no_grad()
def _greedy_batch(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, stop_ids: torch.Tensor
) -> list[list[int]]:
    """The generated token ids per prompt, up to and including the token that stopped it."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return _greedy_seq2seq(model, tokenizer, prompts, max_new_tokens, stop_ids)
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)
    attention = enc["attention_mask"].to(device)
    stop_ids = stop_ids.to(device)
    # positions count real tokens only, so a left-padded row sees the same positions as unpadded
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    eos = tokenizer.eos_token_id
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    cache_arg, extra = _forward_options(model)
    past = None
    step_ids, step_pos = input_ids, positions
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention,
            position_ids=step_pos,
            use_cache=True,
            **{cache_arg: past},
            **extra,
        )
        past = getattr(out, cache_arg, None)
        next_ids = out.logits[:, -1, :].argmax(-1)
        generated.append(torch.where(done, torch.full_like(next_ids, -1), next_ids))
        done |= torch.isin(next_ids, stop_ids)
        if eos is not None:
            done |= next_ids == eos
        if bool(done.all()):
            break
        step_ids = next_ids[:, None]
        step_pos = step_pos[:, -1:] + 1
        attention = torch.cat([attention, attention.new_ones(len(prompts), 1)], dim=1)
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in prompts]
    return [[t for t in row if t >= 0] for row in rows]


@torch.no_grad()
def _greedy_seq2seq(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, stop_ids: torch.Tensor
) -> list[list[int]]:
    """An encoder-decoder's greedy answers (transformers' generate: the encoder runs once), cut as
    _greedy_batch cuts them: up to and including the first stop token or eos."""
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    stops = set(stop_ids.tolist()) | ({int(eos)} if eos is not None else set())
    out = model.generate(
        input_ids=enc["input_ids"].to(device),
        attention_mask=enc["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(stops),
        pad_token_id=int(tokenizer.pad_token_id),
    )
    rows: list[list[int]] = []
    for row in out[:, 1:].tolist():  # position 0 is the decoder start token, not generated
        cut: list[int] = []
        for token in row:
            cut.append(int(token))
            if token in stops:
                break
        rows.append(cut)
    return rows


def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 32,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to already formatted prompts, each cut at its first newline and stripped.

    max_new_tokens=24: zsRE / CounterFact answers are names, dates and places of a few tokens;
    24 leaves room for long names while bounding the cost of a model that never writes a newline.
    batch_size=32: on a 2-core CPU larger batches stop paying off for a 135M model.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to eos) first")
    stop_ids = _stop_ids(tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # restored below: the caller's tokenizer is not changed
    answers: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generating", unit="batch", disable=not progress):
            batch = prompts[start : start + batch_size]
            answers.extend(
                cut_answer(tokenizer.decode(ids, skip_special_tokens=True))
                for ids in _greedy_batch(model, tokenizer, batch, max_new_tokens, stop_ids)
            )
    finally:
        tokenizer.padding_side = side
    return answers


def greedy_ids(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 24, batch_size: int = 32
) -> list[list[int]]:
    """The raw greedy continuation of each prompt as token ids, stop token included.

    The held-out cache teacher-forces exactly these tokens: an unchanged argmax at each of their
    positions is then the same as an unchanged greedy output.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to eos) first")
    stop_ids = _stop_ids(tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            out.extend(_greedy_batch(model, tokenizer, prompts[start : start + batch_size], max_new_tokens, stop_ids))
    finally:
        tokenizer.padding_side = side
    return out
