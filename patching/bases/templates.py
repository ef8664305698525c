"""Phrasing templates mined from zsRE question pairs: train equivalents for an edit.

Every zsRE record pairs a question with a rephrased question about the same subject. With the
subject replaced by a slot, a pair is two phrasings of one relation ("Which family does {} belong
to?" / "What family are {}?"), and phrasings linked through other records' pairs are phrasings of
the same relation. Filled with an edit's subject they are what a producer could send as
`equivalents` with a correction, so `patchd evaluate --train-equivalents` can measure what training
on such paraphrases buys.

For one question, only pairs of OTHER records count (its own rephrase, the paraphrase GR measures,
would otherwise come straight back), and the caller drops any text the task uses elsewhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

SLOT = "\x00"  # stands for the subject inside a template (never in real text, unlike "{}")


def template(text: str, subject: str) -> str | None:
    """The text with its first mention of `subject` replaced by the slot; None when absent."""
    text, subject = text.strip(), subject.strip()
    if not subject or subject not in text:
        return None
    return text.replace(subject, SLOT, 1)


class TemplateGraph:
    """Templates as nodes, one edge per (question, rephrase) record, weighted by record count."""

    def __init__(self, records: Iterable[tuple[str, str, str]], key: Callable[[str], str]):
        """`records`: (subject, question, rephrase); `key` normalises a question (one per question)."""
        self.key = key
        self.edges: Counter[tuple[str, str]] = Counter()
        self.own: dict[str, Counter[tuple[str, str]]] = {}  # question key -> its records' edges
        for subject, question, rephrase in records:
            a, b = template(question, subject), template(rephrase, subject)
            if a is None or b is None or a == b:
                continue
            edge = (min(a, b), max(a, b))
            self.edges[edge] += 1
            self.own.setdefault(key(question), Counter())[edge] += 1
        self.neighbours: dict[str, list[str]] = {}
        for a, b in self.edges:
            self.neighbours.setdefault(a, []).append(b)
            self.neighbours.setdefault(b, []).append(a)

    def by_use(self) -> list[str]:
        """Every template, the one in the most records first (ties in text order)."""
        uses: Counter[str] = Counter()
        for (a, b), n in self.edges.items():
            uses[a] += n
            uses[b] += n
        return sorted(uses, key=lambda t: (-uses[t], t))

    def _weight(self, a: str, b: str, own: Counter[tuple[str, str]]) -> int:
        edge = (min(a, b), max(a, b))
        return self.edges[edge] - own[edge]

    def phrasings(self, question: str, subject: str, hops: int = 2) -> list[str]:
        """Other phrasings of `question` about `subject`, nearest first (then the most used), through
        at most `hops` links of other records' pairs."""
        start = template(question, subject)
        if start is None:
            return []
        own = self.own.get(self.key(question), Counter())
        score: dict[str, tuple[int, int]] = {}  # template -> (hop, -weight)
        frontier = [start]
        seen = {start}
        for hop in range(1, hops + 1):
            nxt: list[str] = []
            for node in frontier:
                for other in self.neighbours.get(node, []):
                    w = self._weight(node, other, own)
                    if w <= 0 or other in seen:
                        continue
                    best = score.get(other)
                    if best is None or (hop, -w) < best:
                        score[other] = (hop, -w)
                    nxt.append(other)
            seen.update(nxt)
            frontier = nxt
        ordered = sorted(score, key=lambda t: (score[t], t))
        return [t.replace(SLOT, subject.strip(), 1) for t in ordered]
