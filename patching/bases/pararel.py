"""ParaRel's T-REx facts asked in zsRE's own phrasings: question-answering data to tune a zsRE base.

The paper's zsRE base (BART-base) was fine-tuned on zsRE's training split before any edit, so it
had learned every relation's question phrasings, and a neuron trained on one phrasing also fires on
a paraphrase. There is no zsRE training split here, but ParaRel (`raw/pararel/trex_lms_vocab`,
29,411 Wikidata facts over 41 relations) holds facts of many relations zsRE asks about. Each such
fact is asked with several of zsRE's own question templates for its relation (the templates mined
from zsRE's question/rephrase pairs, patching/bases/templates.py) and answered with ParaRel's object.

Which zsRE templates belong to a Wikidata relation is decided by the patterns in RELATIONS (zsRE
has no relation ids); relations whose templates these patterns cannot tell apart (language spoken
vs written, located in, owned by, ...) are left out. No fact about a subject any zsRE record names
is used, and no question whose key a part of the zsRE task holds, so nothing here is an edit, a
paraphrase GR measures, or a locality prompt.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from patching.bases.templates import SLOT

# Wikidata relation -> (a zsRE template of it must match, must not match); case-insensitive.
# Read off the mined templates by hand; the "not" patterns drop another relation's templates
# that share a word ("When was X born?" is date of birth, not place of birth).
RELATIONS: dict[str, tuple[str, str | None]] = {
    "P106": (r"occupation|profession|\bjob\b", None),  # occupation
    "P108": (r"employ", None),  # employer
    "P1303": (r"instrument", r"composed|written|for \x00"),  # instrument played
    "P138": (r"named (after|for)", None),  # named after
    "P176": (r"manufactur|produced|made by|company made|company makes|maker", r"film|movie|show|studio"),
    "P178": (r"develop", None),  # developer
    "P19": (r"born|birth ?place|place of birth", r"date|when|year|day|lady|mother|father| to\?"),
    "P20": (r"\bdied?\b|death", r"date|when|year|day|cause|kill"),  # place of death
    "P264": (r"\blabel\b", None),  # record label
    "P27": (r"citizen|nationality", None),  # country of citizenship
    "P30": (r"continent", None),
    "P39": (r"position (held|did)|office|position that .* held|position was held", r"play"),
    "P407": (r"language.*written|written in|language of", r"official|native|original"),
    "P413": (r"position.*play|play.*position", None),  # position played on a team
    "P449": (r"network|channel|\bair", None),  # original broadcaster
    "P495": (r"country of origin|originat", r"year|when"),
    "P937": (r"work location|where did .* work", None),
}


def relation_templates(templates: Iterable[str]) -> dict[str, list[str]]:
    """The zsRE templates (subject slot = templates.SLOT) of each relation in RELATIONS, in the
    given order (callers pass the most used first); a relation with fewer than two is dropped: one
    phrasing teaches nothing about paraphrases."""
    templates = list(templates)
    out: dict[str, list[str]] = {}
    for relation, (yes, no) in RELATIONS.items():
        chosen = [t for t in templates if re.search(yes, t, re.I) and not (no and re.search(no, t, re.I))]
        if len(chosen) >= 2:
            out[relation] = chosen
    return out


def qa_examples(
    trex_dir: Path,
    templates: dict[str, list[str]],
    *,
    skip_subjects: set[str],
    skip_key: set[str],
    key: Callable[[str], str],
    facts: int,
    per_fact: int = 3,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """(question, answer) pairs: `facts` T-REx facts drawn at random over the relations in
    `templates`, each asked with `per_fact` of its relation's templates chosen at random.

    `skip_subjects` (casefolded) and `skip_key` (question keys made by `key`) keep every zsRE
    subject and every text of the zsRE task out. The pairs come out shuffled, so one fact's
    phrasings are spread over the batches."""
    rng = random.Random(seed)
    pool: list[tuple[str, str, str]] = []  # (relation, subject, object)
    for relation in sorted(templates):
        path = trex_dir / f"{relation}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ParaRel T-REx facts for {relation} are missing")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                subject, obj = row["sub_label"].strip(), row["obj_label"].strip()
                if subject and obj and subject.casefold() not in skip_subjects:
                    pool.append((relation, subject, obj))
    rng.shuffle(pool)
    out: list[tuple[str, str]] = []
    used = 0
    for relation, subject, obj in pool:
        if used == facts:
            break
        chosen = rng.sample(templates[relation], min(per_fact, len(templates[relation])))
        questions = [t.replace(SLOT, subject, 1) for t in chosen]
        questions = [q for q in questions if key(q) not in skip_key]
        if len(questions) < 2:
            continue
        out.extend((q, obj) for q in questions)
        used += 1
    rng.shuffle(out)
    return out
