"""The built-in editing tasks (fever, zsre, counterfact), read from ../shared/data and split once.

Every task is split into five disjoint parts by one seeded shuffle:

- train:   what `patchd prepare` fine-tunes the base on (fever only)
- memory:  unrelated inputs whose FFN inputs form the activation memory M (no label needed)
- heldout: inputs whose outputs the locality gate checks are unchanged (no label needed)
- edit:    the pool the edit stream draws its mistakes from (label / true answer needed)
- test:    TestR: accuracy after the stream divided by before (label / true answer needed)

"Disjoint" is checked on a normalised key (NFKC, whitespace collapsed, casefolded, trailing
punctuation dropped), over inputs AND their paraphrases, so that no text is trained on in one part
and measured in another. The split depends only on the files and the seed. docs/data.md lists the
counts this produces on the shared data.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from memory.fingerprint import normalise_text
from patching.bases.templates import TemplateGraph

TASKS: tuple[str, ...] = ("fever", "zsre", "counterfact")
FEVER_LABELS: tuple[str, ...] = ("SUPPORTS", "REFUTES")
NEI = "NOT ENOUGH INFO"
# NQ locality questions in the MEND/ROME zsRE files carry this prefix; the question follows it
NQ_PREFIX = "nq question: "

# fever: the gate's held-out set must be >= 2,000 claims and the memory >= 10,000 (evaluate issue);
# NEI claims have no binary label, so they go first to the parts that need none.
FEVER_HELDOUT = 2_000
FEVER_MEMORY = 10_000
# test ~1,200 keeps TestR's standard error near 1.3 points; edit 2,300 holds ~600 real mistakes of a
# ~73% classifier; train gets the remaining ~4,000 binary claims (the prototype used 6,000).
FEVER_TEST = 1_200
FEVER_EDIT = 2_300
# zsre: 1,000 held-out prompts keep the gate's cost small; 500 test questions for TestR;
# every other locality prompt goes to the memory.
ZSRE_HELDOUT = 1_000
ZSRE_TEST = 500
# mined phrasings trained on per edit with --train-equivalents (each costs one more prompt per step)
ZSRE_TRAIN_EQUIVALENTS = 8
# counterfact: a 2,000-edit stream is longer than any stream the CPU can run in an evaluation;
# memory is capped because generation memory holds every token position (~10 per prompt).
CF_EDIT = 2_000
CF_TEST = 1_000
CF_HELDOUT = 2_000
CF_MEMORY = 10_000
# neighbourhood prompts measured per counterfact edit (locality_nb): each is a greedy decode at the end
CF_NEIGHBOURS = 2


@dataclass(frozen=True)
class Example:
    input: str  # the text (classification) or the question / prompt (generation)
    target: str  # label name (classification) or the true answer text (generation); "" = unknown
    equivalents: tuple[str, ...] = ()  # paraphrases, only measured (GR), never trained on
    train_equivalents: tuple[str, ...] = ()  # paraphrases a trainer may use
    contexts: tuple[str, ...] = ()  # texts to ask the edit behind (cr / cgr), never trained on
    # same relation, another subject (CounterFact): their answers must not change (locality_nb)
    neighbours: tuple[str, ...] = ()


@dataclass
class TaskSplits:
    name: str  # "fever" | "zsre" | "counterfact"
    kind: Literal["classification", "generation"]
    labels: tuple[str, ...] | None  # label names for classification
    train: list[Example] = field(default_factory=list)
    memory: list[Example] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)
    edit: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    PARTS = ("train", "memory", "heldout", "edit", "test")

    def counts(self) -> dict[str, int]:
        return {part: len(getattr(self, part)) for part in self.PARTS}

    def keys(self) -> set[str]:
        """text_key of every text any part holds: inputs, paraphrases and train equivalents."""
        return {
            text_key(t)
            for part in self.PARTS
            for ex in getattr(self, part)
            for t in (ex.input, *ex.equivalents, *ex.train_equivalents)
        }


def text_key(text: str) -> str:
    """The key two texts must differ in to count as different inputs."""
    return normalise_text(text, casefold=True).rstrip(" .?!")


class _Claimed:
    """The keys already given to some part; what makes the parts disjoint."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def free(self, *texts: str) -> bool:
        return not any(text_key(t) in self.keys for t in texts)

    def take(self, *texts: str) -> None:
        self.keys.update(text_key(t) for t in texts)


def default_data_dir() -> Path | None:
    """$PATCHD_DATA_DIR, else ../shared/data relative to the cwd or to the repository, else None."""
    env = os.environ.get("PATCHD_DATA_DIR")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]  # the repository: patching/bases/datasets.py
    for base in (Path.cwd(), repo):
        candidate = (base / ".." / "shared" / "data").resolve()
        if (candidate / "raw").is_dir():
            return candidate
    return None


def raw_dir(data_dir: Path | None) -> Path:
    chosen = data_dir if data_dir is not None else default_data_dir()
    if chosen is None:
        raise FileNotFoundError(
            "no data directory: pass --data-dir DIR (the shared/data folder holding raw/), "
            "or set PATCHD_DATA_DIR; ../shared/data was not found next to the cwd or the repository"
        )
    chosen = Path(chosen).expanduser()
    for raw in (chosen / "raw", chosen):  # accept both shared/data and shared/data/raw
        if (raw / "fever_shared_task_dev").is_dir() or (raw / "knowedit_zsre").is_dir():
            return raw
    raise FileNotFoundError(f"data directory {chosen} holds no raw/ task files; check --data-dir")


def _read_json(raw: Path, rel: str) -> Any:
    path = raw / rel
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}; check --data-dir")
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def load_task(name: str, data_dir: Path | None = None, seed: int = 0) -> TaskSplits:
    """Read one built-in task and split it; the same files and seed always give the same split."""
    loaders = {"fever": _load_fever, "zsre": _load_zsre, "counterfact": _load_counterfact}
    if name not in loaders:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return loaders[name](raw_dir(data_dir), random.Random(seed))


def _take(items: list[Example], n: int, what: str) -> tuple[list[Example], list[Example]]:
    if len(items) < n:
        raise ValueError(f"not enough data for {what}: need {n}, have {len(items)}")
    return items[:n], items[n:]


# --------------------------------------------------------------------------------------- fever


def _load_fever(raw: Path, rng: random.Random) -> TaskSplits:
    # fever_paper_dev's ids are all in the labelled dev file, so that file alone is the source.
    rows = _read_json(raw, "fever_shared_task_dev/fever_labelled_dev.json")
    labels_of: dict[str, set[str]] = {}
    first: dict[str, str] = {}
    for row in rows:
        key = text_key(row["claim"])
        labels_of.setdefault(key, set()).add(row["label"])
        first.setdefault(key, row["claim"].strip())
    # a claim seen with two different labels is ambiguous: it is dropped, not guessed
    by_label: dict[str, list[Example]] = {label: [] for label in (*FEVER_LABELS, NEI)}
    for key, labels in labels_of.items():
        if len(labels) == 1:
            label = next(iter(labels))
            by_label[label].append(Example(first[key], label))
    for examples in by_label.values():
        rng.shuffle(examples)
    # interleave SUPPORTS and REFUTES so that every slice of the binary list is balanced
    sup, ref = (by_label[lb] for lb in FEVER_LABELS)
    binary = [ex for pair in zip(sup, ref, strict=False) for ex in pair] + sup[len(ref) :] + ref[len(sup) :]

    heldout, nei_rest = _take(by_label[NEI], FEVER_HELDOUT, "fever held-out (NEI claims)")
    test, rest = _take(binary, FEVER_TEST, "fever test")
    edit, rest = _take(rest, FEVER_EDIT, "fever edit")
    memory_binary, train = _take(rest, max(0, FEVER_MEMORY - len(nei_rest)), "fever memory")
    memory = nei_rest + memory_binary
    rng.shuffle(memory)
    return TaskSplits("fever", "classification", FEVER_LABELS, train, memory, heldout, edit, test)


# ---------------------------------------------------------------------------------------- zsre


def _unique(texts: Iterable[str], drop: set[str]) -> tuple[str, ...]:
    out: dict[str, str] = {}
    for text in texts:
        key = text_key(text)
        if text.strip() and key not in drop and key not in out:
            out[key] = text.strip()
    return tuple(out.values())


def _load_zsre(raw: Path, rng: random.Random) -> TaskSplits:
    knowedit = _read_json(raw, "knowedit_zsre/ZsRE-test-all.json")
    portability = _read_json(raw, "easyedit_portability_dummy/zsre_mend_eval_portability_gpt4.dummy.json")
    mzsre = [row["en"] for row in _read_json(raw, "mzsre_remake/mzsre_test_duplicate_ende.json")]

    # True answers: KnowEdit's ground_truth only. In the portability file `answers`/`alt` are the
    # string "dummy" and `pred` is the original BART model's prediction (it equals KnowEdit's
    # ground_truth on only 131 of 773 shared questions); MzsRE-en has `alt` (a new target) only.
    questions: dict[str, dict[str, Any]] = {}
    for row in knowedit:
        entry = questions.setdefault(text_key(row["prompt"]), {"q": row["prompt"].strip(), "para": []})
        entry.setdefault("answer", row["ground_truth"][0].strip())
        entry["para"].append(row["rephrase_prompt"])
    subjects = {row["subject"].strip().casefold() for row in knowedit}
    for row in portability + mzsre:
        if text_key(row["src"]) in questions:
            questions[text_key(row["src"])]["para"].append(row["rephrase"])

    claimed = _Claimed()
    claimed.take(*(entry["q"] for entry in questions.values()))
    edit: list[Example] = []
    for entry in questions.values():
        # a paraphrase that is itself another edit question would be trained on: not a GR probe
        paras = _unique(entry["para"], drop=claimed.keys)
        claimed.take(*paras)
        edit.append(Example(entry["q"], entry["answer"], equivalents=paras))
    rng.shuffle(edit)

    # locality prompts with their true answers: same-subject other-relation prompts (KnowEdit) and
    # unrelated Natural Questions (the `loc` field, prefix stripped)
    locality: list[Example] = []
    for row in knowedit:
        for loc in row["locality"]["Relation_Specificity"]:
            locality.append(Example(loc["prompt"].strip(), loc["ground_truth"][0].strip()))
    for row in portability + mzsre:
        locality.append(Example(row["loc"].removeprefix(NQ_PREFIX).strip(), row["loc_ans"].strip()))
    locality = _disjoint(locality, claimed)
    rng.shuffle(locality)
    heldout, rest = _take(locality, ZSRE_HELDOUT, "zsre held-out")
    test, memory = _take(rest, ZSRE_TEST, "zsre test")

    # zsRE questions with no true answer here join the memory, unless they ask about an edited
    # subject (they could then be a paraphrase of an edit, which the memory must not hold)
    extra = [
        Example(row["src"].strip(), "") for row in portability if row["subject"].strip().casefold() not in subjects
    ]
    memory += _disjoint(extra, claimed)
    rng.shuffle(memory)
    edit = _with_mined_phrasings(edit, knowedit, portability + mzsre, claimed)
    return TaskSplits("zsre", "generation", None, [], memory, heldout, edit, test)


def _with_mined_phrasings(
    edit: list[Example], knowedit: list[dict[str, Any]], others: list[dict[str, Any]], claimed: _Claimed
) -> list[Example]:
    """Each edit question's train equivalents: its relation's other phrasings (patching/bases/templates.py)
    about its subject, at most ZSRE_TRAIN_EQUIVALENTS, never a text any part of the task holds (its
    measured paraphrases, another edit question, a locality or memory prompt). Used only when
    `patchd evaluate --train-equivalents` asks for them."""
    graph = _zsre_graph(knowedit, others)
    subject = {text_key(r["prompt"]): r["subject"] for r in knowedit}
    out: list[Example] = []
    for ex in edit:
        mined = graph.phrasings(ex.input, subject[text_key(ex.input)])
        keep = _unique(mined, drop=claimed.keys)[:ZSRE_TRAIN_EQUIVALENTS]
        out.append(replace(ex, train_equivalents=keep))
    return out


def _disjoint(examples: Iterable[Example], claimed: _Claimed, limit: int | None = None) -> list[Example]:
    """Keep (and claim) the first example of each key not yet claimed, at most `limit` of them."""
    out: list[Example] = []
    for ex in examples:
        if limit is not None and len(out) >= limit:
            break
        if claimed.free(ex.input, *ex.equivalents):
            claimed.take(ex.input, *ex.equivalents)
            out.append(ex)
    return out


# --------------------------------------------------------------------------------- counterfact


@dataclass(frozen=True)
class CounterfactCase:
    prompt: str
    target_new: str  # the counterfactual object an edit asks for
    target_true: str  # the true object, "" when the file does not give it
    paraphrases: tuple[str, ...]  # rephrased prompts (ROME's carry a random prefix)
    neighbours: tuple[str, ...] = ()  # neighbourhood prompts: same relation, other subjects


def counterfact_cases(data_dir: Path | None = None) -> list[CounterfactCase]:
    """Every CounterFact case of the three shared files, one per prompt (text_key), in file order."""
    return list(_counterfact_cases(_counterfact_files(raw_dir(data_dir))).values())


# the three shared CounterFact files, parsed: (counterfact-edit, mcounterfact train, ROME filtered)
CounterfactFiles = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]


def _counterfact_files(raw: Path) -> CounterfactFiles:
    return (
        _read_json(raw, "counterfact_easyedit/counterfact-edit.json"),
        _read_json(raw, "mcounterfact_en/counterfact-train.json"),
        _read_json(raw, "counterfact_rome_filtered/counterfact_filtered.json"),
    )


def _counterfact_cases(files: CounterfactFiles) -> dict[str, CounterfactCase]:
    flat, mcf, rome = files
    # One case per prompt (key), first file first. Matched by prompt, not case_id: the filtered ROME
    # file renumbers its cases (only 1 of its 648 ids shared with counterfact-edit names the same case).
    cases: dict[str, CounterfactCase] = {}
    for row in flat:
        case = CounterfactCase(
            row["prompt"], row["target_new"], row["ground_truth"], (row["rephrase_prompt"],), (row["locality_prompt"],)
        )
        cases.setdefault(text_key(row["prompt"]), case)
    for row in mcf:
        cases.setdefault(
            text_key(row["src"]), CounterfactCase(row["src"], row["alt"], "", (row["rephrase"],), (row["loc"],))
        )
    for row in rome:
        rw = row["requested_rewrite"]
        prompt = rw["prompt"].replace("{}", rw["subject"])
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        have = cases.setdefault(text_key(prompt), CounterfactCase(prompt, new, true, ()))
        if have.target_new == new:  # the same rewrite: its paraphrases, neighbours and true target apply
            paras = (*have.paraphrases, *row["paraphrase_prompts"])
            near = (*have.neighbours, *row["neighborhood_prompts"])
            cases[text_key(prompt)] = replace(
                have, target_true=have.target_true or true, paraphrases=paras, neighbours=near
            )
    return cases


def _counterfact_locality(files: CounterfactFiles) -> list[Example]:
    """Neighbourhood prompts: other subjects, same relation, with the true object."""
    flat, mcf, rome = files
    locality = [Example(r["locality_prompt"].strip(), r["locality_ground_truth"].strip()) for r in flat]
    locality += [Example(r["loc"].strip(), r["loc_ans"].strip()) for r in mcf]
    for row in rome:
        true = row["requested_rewrite"]["target_true"]["str"]
        locality += [Example(p.strip(), true) for p in row["neighborhood_prompts"]]
    return locality


def _load_counterfact(raw: Path, rng: random.Random) -> TaskSplits:
    files = _counterfact_files(raw)
    cases = _counterfact_cases(files)

    order = list(cases)  # insertion order: deterministic
    rng.shuffle(order)
    claimed = _Claimed()
    edit: list[Example] = []
    others: list[tuple[str, str]] = []  # (prompt, true target) of cases not edited
    for key in order:
        c = cases[key]
        if len(edit) < CF_EDIT and claimed.free(c.prompt):
            claimed.take(c.prompt)
            equivalents = _unique(list(c.paraphrases), drop=claimed.keys)
            claimed.take(*equivalents)
            # its neighbourhood prompts are measured (locality_nb), so they go to no other part
            neighbours = _unique(list(c.neighbours), drop=claimed.keys)[:CF_NEIGHBOURS]
            claimed.take(*neighbours)
            edit.append(Example(c.prompt.strip(), c.target_new.strip(), equivalents=equivalents, neighbours=neighbours))
        else:
            others.append((c.prompt.strip(), c.target_true.strip()))
    if len(edit) < CF_EDIT:
        raise ValueError(f"not enough data for counterfact edit: need {CF_EDIT}, have {len(edit)}")

    # test: true facts of cases not edited (TestR asks whether the model still knows them)
    test = _disjoint((Example(p, t) for p, t in others if t), claimed, limit=CF_TEST)
    # neighbourhood prompts: other subjects, same relation and true object as the edited case
    locality = _counterfact_locality(files)
    rng.shuffle(locality)
    locality = _disjoint(locality, claimed)
    heldout, rest = _take(locality, CF_HELDOUT, "counterfact held-out")
    memory = _disjoint((Example(p, t) for p, t in others), claimed) + rest
    rng.shuffle(memory)
    return TaskSplits("counterfact", "generation", None, [], memory[:CF_MEMORY], heldout, edit, test)


def _zsre_graph(knowedit: list[dict[str, Any]], others: list[dict[str, Any]]) -> TemplateGraph:
    records = [(r["subject"], r["prompt"], r["rephrase_prompt"]) for r in knowedit]
    records += [(r["subject"], r["src"], r["rephrase"]) for r in others]
    return TemplateGraph(records, text_key)


def zsre_phrasings(data_dir: Path | None = None) -> tuple[TemplateGraph, set[str]]:
    """zsRE's phrasing templates (patching/bases/templates.py) and every subject a zsRE record names
    (casefolded): what `patchd prepare zsre-smollm2-qa` asks other facts with, and keeps out."""
    raw = raw_dir(data_dir)
    knowedit = _read_json(raw, "knowedit_zsre/ZsRE-test-all.json")
    others = _read_json(raw, "easyedit_portability_dummy/zsre_mend_eval_portability_gpt4.dummy.json")
    others += [row["en"] for row in _read_json(raw, "mzsre_remake/mzsre_test_duplicate_ende.json")]
    subjects = {row["subject"].strip().casefold() for row in knowedit + others}
    return _zsre_graph(knowedit, others), subjects
