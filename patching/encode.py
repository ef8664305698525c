"""From text to the model inputs and the rows (positions) that matter at the patched layer.

Classification: the head reads position 0, so that is the only row of an example.
Generation (teacher forcing): the rows are the positions that predict each target token;
for a decoder-only model that is prompt_len - 1 + j, for an encoder-decoder model j.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# a model input: a text, or (text, text_pair) for a classifier that reads two texts (NLI: premise and
# hypothesis); the same type as memory.records.InputValue, so a stored report's input arrives as is
ModelInput = str | tuple[str, str]

# name_pieces codes (the subject locator "name", subject.end_of_name): how a token may extend a name
# that began before it. PIECE: the rest of a word, or a capitalised word or number ("Rudolf| L|oman",
# "Gliese| 667"); GLUE: a word that may sit inside a name but never ends one ("Dixon| of| Dock Green")
NAME_OTHER, NAME_PIECE, NAME_GLUE = 0, 1, 2
GLUE_WORDS = frozenset({"of", "the", "de", "da", "di", "von", "van", "del", "la", "le", "and", "&"})
GLUE_MARKS = frozenset({".", "-", "'s", "'"})  # inside a word: "F.", "USA-64", "Moore's"


@dataclass
class Encoded:
    batch: dict[str, torch.Tensor]  # model inputs for B examples
    rows_b: torch.Tensor  # [R] example of each row (index into the batch)
    rows_t: torch.Tensor  # [R] position of each row in the patched stack
    targets: torch.Tensor  # [R] label / next-token id per row (-1 where unknown)
    # generation: the prompt alone per example, for the real generate() check; None otherwise
    prompts: list[torch.Tensor] | None = None
    target_ids: list[torch.Tensor] | None = None
    # generation: example 0's prompt, each token's NAME_* code [P_0] (int8); None otherwise
    name_pieces: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.batch["input_ids"].shape[0])


def split_pairs(texts: Sequence[ModelInput]) -> tuple[list[str], list[str] | None]:
    """(first texts, second texts or None): a batch is all texts or all text pairs."""
    pairs = [t for t in texts if isinstance(t, tuple)]
    if not pairs:
        return [t for t in texts if isinstance(t, str)], None
    if len(pairs) != len(texts):
        raise ValueError("a batch mixes plain texts and text pairs: a model reads one form")
    return [t for t, _ in pairs], [p for _, p in pairs]


def classification(
    tokenizer: Any, texts: Sequence[ModelInput], labels: Sequence[int] | None = None, max_length: int = 128
) -> Encoded:
    """Position 0 of each input (the pooled position); a text pair is tokenised as one sequence."""
    firsts, seconds = split_pairs(texts)
    pair = {"text_pair": seconds} if seconds is not None else {}
    batch = dict(tokenizer(firsts, **pair, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    B = len(texts)
    targets = torch.tensor(list(labels), dtype=torch.long) if labels is not None else torch.full((B,), -1)
    return Encoded(batch, torch.arange(B), torch.zeros(B, dtype=torch.long), targets)


def _pad(seqs: Sequence[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(int(s.numel()) for s in seqs)
    ids = torch.full((len(seqs), T), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : s.numel()] = s
        mask[i, : s.numel()] = 1
    return ids, mask


def generation_ids(
    prompts: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    *,
    seq2seq: bool,
    pad_id: int,
    decoder_start_id: int | None = None,
    all_rows: bool = False,
) -> Encoded:
    """Token-id level encoding (right padding). prompts[i] [P_i], targets[i] [L_i] (may be empty).

    all_rows=True makes every non-pad position of the patched stack a row (memory building);
    rows then carry target -1 except where a target token is known.
    """
    rows_b: list[int] = []
    rows_t: list[int] = []
    tgts: list[int] = []
    if seq2seq:
        if decoder_start_id is None:
            raise ValueError("an encoder-decoder model needs decoder_start_id")
        enc_ids, enc_mask = _pad(prompts, pad_id)
        dec = [
            torch.cat([torch.tensor([decoder_start_id]), t[:-1]]) if t.numel() else torch.tensor([decoder_start_id])
            for t in targets
        ]
        dec_ids, dec_mask = _pad(dec, pad_id)
        batch = {
            "input_ids": enc_ids,
            "attention_mask": enc_mask,
            "decoder_input_ids": dec_ids,
            "decoder_attention_mask": dec_mask,
        }
        for i, t in enumerate(targets):
            n = int(t.numel()) if not all_rows else int(dec[i].numel())
            for j in range(n):
                rows_b.append(i)
                rows_t.append(j)
                tgts.append(int(t[j]) if j < t.numel() else -1)
    else:
        full = [torch.cat([p, t]) for p, t in zip(prompts, targets, strict=True)]
        ids, mask = _pad(full, pad_id)
        batch = {"input_ids": ids, "attention_mask": mask}
        for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            P, L = int(p.numel()), int(t.numel())
            start = 0 if all_rows else P - 1
            for pos in range(start, P + L - 1 if not all_rows else P + L):
                rows_b.append(i)
                rows_t.append(pos)
                j = pos - (P - 1)
                tgts.append(int(t[j]) if 0 <= j < L else -1)
    return Encoded(
        batch,
        torch.tensor(rows_b, dtype=torch.long),
        torch.tensor(rows_t, dtype=torch.long),
        torch.tensor(tgts, dtype=torch.long),
        prompts=list(prompts),
        target_ids=list(targets),
    )


def target_ids(tokenizer: Any, answer: str, stop: str = "\n") -> list[int]:
    """The token ids a generator must write for `answer`: " " + answer + stop, tokenised apart from
    the prompt (none for an empty answer). Editing and QA tuning (qa_tuning.py) share this rule."""
    return list(tokenizer((" " + answer.strip() + stop) if answer else "", add_special_tokens=False)["input_ids"])


def generation(
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    seq2seq: bool = False,
    decoder_start_id: int | None = None,
    all_rows: bool = False,
    stop: str = "\n",
    names: bool = False,
) -> Encoded:
    """Text level: each target is " " + answer + stop, tokenised apart from the prompt so that the
    rows line up with the target tokens exactly. `names`: also example 0's name_pieces (an edit,
    whose subject the engine may locate; no other batch needs them)."""
    p_ids = [torch.tensor(tokenizer(p)["input_ids"], dtype=torch.long) for p in prompts]
    t_ids = [torch.tensor(target_ids(tokenizer, a, stop), dtype=torch.long) for a in answers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = generation_ids(
        p_ids, t_ids, seq2seq=seq2seq, pad_id=int(pad or 0), decoder_start_id=decoder_start_id, all_rows=all_rows
    )
    if names and p_ids:
        enc.name_pieces = name_pieces(tokenizer, p_ids[0].tolist())
    return enc


def name_pieces(tokenizer: Any, ids: Sequence[int]) -> torch.Tensor:
    """Each token's NAME_* code [P] (int8), read from its text: a token that starts a word carries a
    space marker ("Ġ" in byte-level BPE, "▁" in SentencePiece, or a decoded leading space)."""
    raws = tokenizer.convert_ids_to_tokens(list(ids))
    out = torch.zeros(len(raws), dtype=torch.int8)
    for j, (i, raw) in enumerate(zip(ids, raws, strict=True)):
        piece = tokenizer.decode([i])
        spaced = str(raw).startswith(("Ġ", "▁", " ")) or piece.startswith(" ")
        body = piece.strip()
        if not body:
            continue
        if spaced and body in GLUE_WORDS or not spaced and body in GLUE_MARKS:
            out[j] = NAME_GLUE
        elif (not spaced and body[0].isalnum()) or (spaced and (body[0].isupper() or body[0].isdigit())):
            out[j] = NAME_PIECE
    return out
