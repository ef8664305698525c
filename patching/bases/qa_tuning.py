"""Fine-tuning a causal LM to answer questions in the prompt format (answer-token loss only).

Used to build `zsre-smollm2-qa`: SmolLM2 tuned on other facts asked in zsRE's phrasings
(patching/bases/pararel.py), as the paper tuned its BART-base on zsRE's training split before editing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from patching.bases.qa import prompt_for
from patching.encode import target_ids

IGNORE = -100  # label of a position the loss skips (the prompt and the padding)


@dataclass(frozen=True)
class QATune:
    """Hyper-parameters of the QA tuning; the defaults and their reasons."""

    # 1,000 facts x 3 phrasings: ~25 min on 2 CPU cores; measured to raise zsRE GR (docs/results)
    facts: int = 1000
    per_fact: int = 3
    # one pass: the point is the phrasings, not memorising ParaRel's facts
    epochs: int = 1
    # a gentle full-model rate with 20 warm-up steps and linear decay
    lr: float = 5e-5
    warmup_steps: int = 20
    batch_size: int = 16


def answer_batch(tokenizer: Any, pairs: Sequence[tuple[str, str]], prompt_format: str) -> dict[str, Any]:
    """Right-padded input ids, attention mask and labels [batch, longest] for (question, answer)
    pairs: the target is encode.target_ids (as in editing), and only its tokens count."""
    import torch

    rows, labels = [], []
    for question, answer in pairs:
        prompt = tokenizer(prompt_for(question, prompt_format))["input_ids"]
        target = target_ids(tokenizer, answer)
        rows.append(prompt + target)
        labels.append([IGNORE] * len(prompt) + target)
    width = max(map(len, rows))
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lb + [IGNORE] * (width - len(lb)) for lb in labels]),
    }


def train_answers(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    prompt_format: str,
    hp: QATune,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """AdamW over all weights, seeded batch order; the loss of every step (for the log and tests)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    generator = torch.Generator().manual_seed(seed)
    per_epoch = (len(pairs) + hp.batch_size - 1) // hp.batch_size
    total = per_epoch * hp.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, min(hp.warmup_steps, total), total)
    model.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc="QA tuning", unit="batch", disable=not progress)
    for _ in range(hp.epochs):
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(order), hp.batch_size):
            batch = answer_batch(tokenizer, [pairs[i] for i in order[start : start + hp.batch_size]], prompt_format)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses
