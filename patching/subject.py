"""A key that also reads the subject (issue 21; docs/results/levers-21.md, "A key that also reads
the subject"). `trainer.subject_key`, on by default for a decoder-only generator (config.py).

On CounterFact the patched layer's input at the last position carries the relation, not the
entity, so a neuron keyed on it alone either misses the edit's paraphrases or fires on other
subjects' facts (GR 0.21 in the probe). A subject neuron p adds a second, causal term:

    pre_p(t) = k_p . h_t + c_p * m_p(t) + b_p
    m_p(t)   = clamp(max over s <= t of (w_p . g_s + a_p), -1, 1)

h: the patched FFN's input; g: the FFN input of layer L_s (about half depth), where the entity is
still legible; (w_p, a_p): a linear detector of the edit's subject, fitted once per edit and
scaled so that every training row's subject token scores >= +1 and every memory position <= -1.
m is a running max, so it needs one state per sequence and neuron in decoding (layer.py keeps it
beside the KV cache) and is fixed per cached row: the cached trainer trains [k, c] as an ordinary
key over the row [h, m] (engine.py appends m as one more column).

The detector's positive is the subject's token, found without being told which: the prompt's
token whose layer-L_s row is least like the memory texts that do not hold it, among the tokens
found in at most 0.5 % of the memory's texts (locate_token). It lands in the subject for 28 of 40
zsRE edits, whose memory asks about the same subjects, and 37 of 40 CounterFact edits; the first
rule (the lowest max cosine to any memory row) found 16 and 37, and a 2 % bound 29 and 29: it let
relation words such as "originally" or "affiliated" through on CounterFact
(docs/results/levers-21/probe-subject-locator.py).

This module holds the pure tensor functions and the store of layer-L_s rows per sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from patching.encode import NAME_GLUE, NAME_OTHER
from patching.memory_bank import MemoryBank

# m is clamped to [FLOOR, 1]: a padded position scores FLOOR and never raises the max
FLOOR = -1.0


def running_max(d: torch.Tensor, valid: torch.Tensor | None = None, carry: torch.Tensor | None = None) -> torch.Tensor:
    """d [B, T, n] detector scores -> m [B, T, n] = clamp(max over s <= t, FLOOR, 1).

    valid [B, T] (False: padding) and carry [B, n] (m at the last position of the previous call of
    the same sequences: decoding with a KV cache) are optional."""
    d = d.clamp(FLOOR, 1.0)
    if valid is not None:
        d = d.masked_fill(~valid[..., None], FLOOR)
    if carry is not None:
        d = torch.maximum(d, carry[:, None].to(d))  # max(carry, cummax d) = cummax(max(d, carry))
    return d.cummax(1).values


def locate_token(
    g: torch.Tensor,
    ids: torch.Tensor,
    bank: SequenceBank,
    nearest: int = 4,
    common: float = 0.005,
    chunk: int = 16384,
    surprise: torch.Tensor | None = None,
    name: torch.Tensor | None = None,
) -> int:
    """The prompt's position (>= 1) least like the memory: g [P, d] its rows, ids [P] its tokens.

    A position's score is its cosine to the `nearest`-th most similar memory sequence (a sequence
    scores its most similar row), among the sequences that do not hold the position's own token:
    the subject of an edit may well be in a few memory texts (zsRE's memory holds other questions
    about the same subjects), and those must not make it look familiar. Tokens in more than
    `common` of the memory's sequences are never taken (a frequent word is no subject; without
    its sequences, the rest would look new). Position 0 is skipped: a first token's row is far from
    everything. Falls back to the lowest max cosine over every row when no position qualifies.

    `surprise` [P] (-log p of each token under the base given those before it; trainer.subject_locator
    = "surprise"): the rare position the base least expected instead, no cosine needed; that is most
    often a name's first piece. With `name` [P] (encode.name_pieces; trainer.subject_locator = "name")
    as well, the last token of the name it begins (end_of_name): where ROME finds the entity."""
    if g.shape[0] < 2:
        return 0
    rare = rare_tokens(ids, bank, common)
    if surprise is not None:
        pool = torch.tensor(list(rare), dtype=torch.long) if rare else torch.arange(g.shape[0] - 1)
        first = 1 + int(pool[surprise[1:].float().cpu()[pool].argmax()])
        return end_of_name(first, name) if name is not None else first
    rows, seq_of, n_seq = bank.rows(), bank.sequence_of_rows(), len(bank)
    unit = F.normalize(g[1:].float(), dim=1)  # [P-1, d]
    per_seq = torch.full((unit.shape[0], n_seq), -2.0, device=g.device)  # best cosine per sequence
    for i in range(0, rows.shape[0], chunk):
        sims = unit @ F.normalize(rows[i : i + chunk].float(), dim=1).T  # [P-1, c]
        per_seq.scatter_reduce_(1, seq_of[i : i + chunk].expand(unit.shape[0], -1), sims, "amax")
    score = torch.full((unit.shape[0],), float("inf"), device=g.device)  # inf: a position not taken
    for j, holds in rare.items():
        others = per_seq[j][~holds]
        if others.numel() >= nearest:
            score[j] = others.topk(nearest).values[-1]
    if bool(score.isinf().all()):
        return 1 + int(per_seq.amax(1).argmin())
    return 1 + int(score.argmin())


def end_of_name(start: int, name: torch.Tensor) -> int:
    """From position `start`, right while the next token may continue a name (name [P]: NAME_* codes),
    then back over glue: "Prince| Edward| Island" -> " Island", "Dixon| of| Dock| Green" -> " Green",
    "Moses| Magnum| belong" -> " Magnum". On probe-subject-span.py's edits this lands on the subject's
    last token for 71 of 100 zsRE and 34 of 40 CounterFact prompts (the first piece alone: 9, 10)."""
    codes = name.tolist()
    j = start
    while j + 1 < len(codes) and codes[j + 1] != NAME_OTHER:
        j += 1
    while j > start and codes[j] == NAME_GLUE:
        j -= 1
    return j


def rare_tokens(ids: torch.Tensor, bank: SequenceBank, common: float) -> dict[int, torch.Tensor]:
    """Position - 1 -> the memory sequences holding its token [S] (bool), for each prompt position
    >= 1 whose token is in at most `common` of the memory's sequences (ids [P]: the prompt)."""
    out: dict[int, torch.Tensor] = {}
    for j, token in enumerate(ids[1:].tolist()):
        holds = bank.holding(token)
        if int(holds.sum()) <= common * len(bank):
            out[j] = holds
    return out


def fit_detector(
    pos: torch.Tensor, neg: torch.Tensor, l2: float = 1e-3, iterations: int = 60
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A class-balanced L2 logistic fit of pos [P, d] against neg [N, d], scaled so that the weakest
    positive scores +1 and the strongest negative -1: (w [d], a [], 0-dim). None when no threshold
    separates them (the edit then gets an ordinary neuron), or when there is no negative at all (every
    memory text holds the token: a common token a locator fell back to, as on a byte-level vocabulary)."""
    if not len(pos) or not len(neg):
        return None
    pos, neg = pos.float(), neg.float()
    mu, sd = neg.mean(0), neg.std(0) + 1e-4  # standardised: LBFGS converges in tens of steps
    x = torch.cat([(pos - mu) / sd, (neg - mu) / sd])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(x)
    weight = torch.cat([torch.full((len(pos),), len(neg) / len(pos)), torch.ones(len(neg))]).to(x)
    w = torch.zeros(x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros((), device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y, weight=weight) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)  # type: ignore[no-untyped-call]
    k = w.detach() / sd  # back to raw rows: score = row . k + a
    a = b.detach() - (mu * k).sum()
    lo, hi = float((neg @ k).max() + a), float((pos @ k).min() + a)
    if hi <= lo:
        return None
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    return k / half, (a - mid) / half


def whitening_with(
    whiten: tuple[torch.Tensor, torch.Tensor], memory: torch.Tensor, m: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fisher init's (mu [d], P [d, d]) over rows [q, m] instead of q, from the same memory rows
    memory [N, d] and their m [N], by the block inverse (no new [d+1, d+1] inversion per edit):
    P_aug = [[P + P s s' P / r, -P s / r], [-s' P / r, 1 / r]], with s = cov(q, m) [d] and
    r = var(m) + ridge - s' P s (the Schur complement). `ridge` as init.whitening adds it."""
    mu, prec = whiten
    mm = m.mean()
    s = (memory - mu).T @ (m - mm) / max(1, memory.shape[0] - 1)  # [d]
    ps = prec @ s  # [d]
    r = ((m - mm).pow(2).sum() / max(1, memory.shape[0] - 1) + ridge - s @ ps).clamp_min(1e-6)
    top = torch.cat([prec + torch.outer(ps, ps) / r, -ps[:, None] / r], 1)
    bottom = torch.cat([-ps / r, (1.0 / r)[None]])[None]
    return torch.cat([mu, mm[None]]), torch.cat([top, bottom])


def whitening_apart(whiten: tuple[torch.Tensor, torch.Tensor], m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fisher init's (mu, P) over rows [q, m] with the m column left out of the key: P_aug =
    [[P, 0], [0, 0]], so the init key is the plain one with c = 0 and training alone moves c.
    whitening_with weighs m by 1 / var(m), which is 1 / ridge where every memory row has m at its
    floor: the init is then all subject term (trainer.subject_floor's reason)."""
    mu, prec = whiten
    d = prec.shape[0]
    top = torch.cat([prec, prec.new_zeros(d, 1)], 1)
    return torch.cat([mu, m.mean()[None]]), torch.cat([top, prec.new_zeros(1, d + 1)])


@dataclass
class Sequences:
    """Layer-L_s rows of a batch: g [B, T, d_s], valid [B, T] (False: padding) and the token ids
    [B, T] (the locator leaves out sequences that hold the token it scores); surprise [T]: -log p
    of example 0's tokens under the base (0 at position 0), when the locator asks for it."""

    g: torch.Tensor
    valid: torch.Tensor
    ids: torch.Tensor
    surprise: torch.Tensor | None = None

    def prefix_max(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """m [R] of the detector (w [d_s], a) at rows (example b [R], position t [R])."""
        d = (self.g @ w + a)[..., None]  # [B, T, 1]
        return running_max(d, self.valid)[b, t, 0]


class SequenceBank:
    """Layer-L_s rows of every sequence a cached row comes from (memory prompts, held-out inputs,
    accepted edits), so that a new detector's m can be computed at every cached row: rows
    [P_total, d_s] stored sequence after sequence in a MemoryBank (grown by doubling)."""

    def __init__(self, dim: int, device: torch.device):
        self._rows = MemoryBank(dim, torch.float32, device)
        self._ids = MemoryBank(1, torch.long, device)  # [P, 1] the token of each row
        self.starts: list[int] = []
        self.lengths: list[int] = []
        self._index: torch.Tensor | None = None  # [S, T_max] row of each (sequence, position); -1 pad
        self._seq_of: torch.Tensor | None = None  # [P] sequence id of each row

    def __len__(self) -> int:
        return len(self.starts)

    def add(self, seqs: Sequences) -> int:
        """Append every sequence of a batch; returns the id of the first (ids are consecutive)."""
        first = len(self.starts)
        for i in range(seqs.g.shape[0]):
            rows = seqs.g[i][seqs.valid[i]]  # right padding: positions 0..len-1
            self.starts.append(len(self._rows))
            self.lengths.append(int(rows.shape[0]))
            self._rows.append(rows)
            self._ids.append(seqs.ids[i][seqs.valid[i]][:, None])
        self._index = None
        self._seq_of = None
        return first

    def rows(self) -> torch.Tensor:
        """Every stored row [P, d_s], a view."""
        return self._rows.view()

    def since(self, first: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequences first.. as (rows [P', d_s], token ids [P'], lengths [S']): what append_raw takes."""
        start = self.starts[first] if first < len(self.starts) else len(self._rows)
        lengths = torch.tensor(self.lengths[first:], dtype=torch.long)
        return self._rows.view()[start:], self._ids.view()[start:, 0], lengths

    def append_raw(self, rows: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> None:
        """Append sequences given as since() returns them (an engine snapshot restored)."""
        if rows.ndim != 2 or ids.shape != (rows.shape[0],) or int(lengths.sum()) != rows.shape[0]:
            raise ValueError(f"sequence rows {tuple(rows.shape)}, ids {tuple(ids.shape)} and lengths do not agree")
        start = len(self._rows)
        for n in lengths.tolist():
            self.starts.append(start)
            self.lengths.append(int(n))
            start += int(n)
        self._rows.append(rows.to(self._rows.device, torch.float32))
        self._ids.append(ids.to(self._ids.device, torch.long)[:, None])
        self._index = None
        self._seq_of = None

    def truncate(self, n: int) -> None:
        """Keep the first n sequences (Patcher.rollback)."""
        if not 0 <= n <= len(self.starts):
            raise ValueError(f"cannot truncate {len(self.starts)} sequences to {n}")
        rows = self.starts[n] if n < len(self.starts) else len(self._rows)
        self._rows.truncate(rows)
        self._ids.truncate(rows)
        del self.starts[n:], self.lengths[n:]
        self._index = None
        self._seq_of = None

    def sequence_of_rows(self) -> torch.Tensor:
        """[P] the sequence id of every stored row."""
        if self._seq_of is None:
            lengths = torch.tensor(self.lengths, device=self._rows.device, dtype=torch.long)
            self._seq_of = torch.repeat_interleave(torch.arange(len(self.lengths), device=lengths.device), lengths)
        return self._seq_of

    def holding(self, token: int) -> torch.Tensor:
        """[S] True for the sequences that hold `token`."""
        held = torch.zeros(len(self.lengths), dtype=torch.bool, device=self._rows.device)
        held[self.sequence_of_rows()[self._ids.view()[:, 0] == token]] = True
        return held

    def rows_without(self, token: int) -> torch.Tensor:
        """The stored rows [P', d_s] of the sequences that do not hold `token`."""
        return self.rows()[~self.holding(token)[self.sequence_of_rows()]]

    def prefix_max(self, w: torch.Tensor, a: torch.Tensor, seq: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """m [R] of the detector (w [d_s], a) at rows (sequence id seq [R], position t [R])."""
        if self._index is None:
            width = max(self.lengths, default=1)
            pos = torch.arange(width, device=self._rows.device)
            start = torch.tensor(self.starts, device=pos.device)[:, None]
            length = torch.tensor(self.lengths, device=pos.device)[:, None]
            self._index = torch.where(pos < length, start + pos, -1)  # [S, T_max]
        pad = torch.full((1,), FLOOR, dtype=w.dtype, device=w.device)
        scores = torch.cat([self.rows() @ w + a, pad])  # [P + 1]: index -1 scores FLOOR
        d = scores[self._index][..., None]  # [S, T_max, 1]
        return running_max(d, self._index >= 0)[seq, t, 0]


@contextmanager
def inputs_of(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The first input of every forward of `module` while the block runs (g for layer L_s)."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0].detach().float())

    handle = module.register_forward_pre_hook(hook)
    try:
        yield got
    finally:
        handle.remove()


@dataclass
class Refs:
    """Where each cached row of a set comes from: sequence id seq [R] in a SequenceBank and its
    position t [R] there, in the set's row order."""

    seq: torch.Tensor
    t: torch.Tensor

    @staticmethod
    def empty(device: torch.device) -> Refs:
        none = torch.zeros(0, dtype=torch.long, device=device)
        return Refs(none, none.clone())

    def plus(self, seq: torch.Tensor, t: torch.Tensor) -> Refs:
        return Refs(torch.cat([self.seq, seq.to(self.seq)]), torch.cat([self.t, t.to(self.t)]))

    def first(self, n: int) -> Refs:
        return Refs(self.seq[:n], self.t[:n])


@dataclass(frozen=True)
class Detector:
    """One edit's subject detector: m = clamp(running max of w . g + a, -1, 1); `scale` is the
    width of m's column beside q in the cached rows (so the trained key's last entry is c / scale)."""

    w: torch.Tensor  # [d_s]
    a: torch.Tensor  # [] 0-dim
    scale: float

    def column(self, m: torch.Tensor) -> torch.Tensor:
        """m [R] -> the column [R, 1] appended to q."""
        return (m * self.scale)[:, None]


def with_column(q: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """q [R, d], column [R, 1] -> [R, d + 1]."""
    return torch.cat([q, column.to(q)], 1)
