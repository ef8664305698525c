"""MEND's training data: edit items and locality groups, captured once at the lowest edited layer.

The examples come from a part of the task that no evaluation measures:

- fever: the `train` split minus its first 1,000 claims (those are TrainR's `train_eval`), i.e.
  3,040 claims; the base was fine-tuned on them, which is fine for MEND: it only needs the base's
  gradients on edits and its outputs on unrelated inputs. The edit target is the base's own
  prediction flipped (every training edit changes the output, as every real edit of a mistake
  does; MEND's FEVER loader flips with p = 0.5). FEVER has no paraphrases, so the edit NLL is
  taken on the edit input itself.
- zsre (generation): the `memory` split's questions with a known answer (the activation memory's
  inputs, never measured); the edit target is another question's answer (a counterfactual, as
  MEND's zsRE), no paraphrase either (edit input); locality = other questions with their answers.

Locality examples are captured in fixed padded groups; a step draws one group that does not
contain its edit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from patching import encode
from patching.bases.datasets import Example, load_task
from patching.bases.tasks import TaskAdapter
from patching.eval.mend.stack import Cached, TopStack

FEVER_TRAIN_EVAL = 1000  # EvalData.from_splits: TrainR is measured on train[:1000]
VAL_LOC = 32  # validation locality inputs (one padded batch), apart from the validation edits


@dataclass
class Item:
    cached: Cached
    rows_b: torch.Tensor
    rows_t: torch.Tensor
    targets: torch.Tensor  # edit: the new target per row; locality: unused
    base_logits: torch.Tensor  # [R, C] the base at those rows (locality KL, edit's old prediction)
    members: tuple[int, ...] = ()  # example indices in this item (locality groups)


@dataclass
class MendData:
    edits: list[Item]
    loc_groups: list[Item]
    val_edits: list[Item]
    val_loc: Item
    info: dict[str, Any] = field(default_factory=dict)


def pool_for(task: str, data_dir: Any = None, seed: int = 0) -> tuple[list[Example], str]:
    s = load_task(task, data_dir, seed=seed)
    if task == "fever":
        return s.train[FEVER_TRAIN_EVAL:], f"fever train[{FEVER_TRAIN_EVAL}:] (train[:{FEVER_TRAIN_EVAL}] is TrainR)"
    pool = [e for e in s.memory if e.target]
    if not pool:
        raise ValueError(f"{task}: no labelled examples outside the evaluation splits to train MEND on")
    return pool, f"{task} memory split, questions with an answer"


@torch.no_grad()
def _item(
    stack: TopStack, enc: encode.Encoded, targets: torch.Tensor | None = None, members: tuple[int, ...] = ()
) -> Item:
    cached = stack.capture(enc.batch)
    base = stack.logits(cached, enc.rows_b, enc.rows_t)
    return Item(cached, enc.rows_b, enc.rows_t, enc.targets if targets is None else targets, base, members)


def _edit_item(adapter: TaskAdapter, stack: TopStack, ex: Example, new_target: str | None, rng: random.Random) -> Item:
    if not adapter.generation:
        enc = encode.classification(adapter.base.tokenizer, [ex.input])
        item = _item(stack, enc)
        pred = int(item.base_logits.argmax(-1)[0])
        classes = [c for c in range(item.base_logits.shape[-1]) if c != pred]
        item.targets = torch.tensor([rng.choice(classes)])  # the prediction flipped
        return item
    assert new_target is not None
    return _item(stack, adapter.edit(ex.input, new_target))


def _loc_item(adapter: TaskAdapter, stack: TopStack, exs: list[Example], members: tuple[int, ...]) -> Item:
    tok = adapter.base.tokenizer
    if not adapter.generation:
        return _item(stack, encode.classification(tok, [e.input for e in exs]), members=members)
    enc = encode.generation(tok, [adapter.text(e.input) for e in exs], [e.target for e in exs])
    return _item(stack, enc, members=members)


def build(
    adapter: TaskAdapter,
    stack: TopStack,
    pool: list[Example],
    source: str,
    *,
    val: int = 200,
    loc_batch: int = 8,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> MendData:
    rng = random.Random(seed)
    pool = list(pool)
    rng.shuffle(pool)
    n_vloc = VAL_LOC
    if limit is not None:
        pool = pool[: limit + val + n_vloc]
    if len(pool) < val + n_vloc + 2 * loc_batch:
        raise ValueError(f"only {len(pool)} training examples for MEND; need more than {val + n_vloc + 2 * loc_batch}")
    val_pool, vloc_pool, train_pool = pool[:val], pool[val : val + n_vloc], pool[val + n_vloc :]
    answers = [e.target for e in pool]

    def new_target(ex: Example) -> str | None:
        if not adapter.generation:
            return None
        return rng.choice([a for a in rng.sample(answers, 8) if a.strip() != ex.target.strip()] or ["unknown"])

    bar = tqdm(total=len(pool), desc="mend data", unit="ex", disable=not progress)
    edits = []
    for ex in train_pool:
        edits.append(_edit_item(adapter, stack, ex, new_target(ex), rng))
        bar.update(1)
    val_edits = []
    for ex in val_pool:
        val_edits.append(_edit_item(adapter, stack, ex, new_target(ex), rng))
        bar.update(1)
    bar.close()
    order = list(range(len(train_pool)))
    rng.shuffle(order)
    groups = [tuple(order[i : i + loc_batch]) for i in range(0, len(order) - loc_batch + 1, loc_batch)]
    loc_groups = [
        _loc_item(adapter, stack, [train_pool[j] for j in g], g)
        for g in tqdm(groups, desc="mend locality", unit="group", disable=not progress)
    ]
    val_loc = _loc_item(adapter, stack, vloc_pool, ())
    info = {
        "source": source,
        "train_edits": len(edits),
        "val_edits": len(val_edits),
        "loc_groups": len(loc_groups),
        "loc_batch": loc_batch,
        "val_loc": len(vloc_pool),
        "paraphrase": "none in the data: the edit NLL is taken on the edit input itself",
        "edit_target": "the base's prediction flipped"
        if not adapter.generation
        else "another training question's answer (counterfactual)",
    }
    return MendData(edits, loc_groups, val_edits, val_loc, info)
