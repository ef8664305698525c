"""patching.bases.datasets on the real shared data (../shared/data from the repository root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patching.bases.datasets import FEVER_LABELS, TaskSplits, default_data_dir, load_task, text_key

DATA = default_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="../shared/data is not present")

# the counts docs/data.md documents for seed 0
EXPECTED = {
    "fever": {"train": 4040, "memory": 10000, "heldout": 2000, "edit": 2300, "test": 1200},
    "zsre": {"train": 0, "memory": 2097, "heldout": 1000, "edit": 1286, "test": 500},
    "counterfact": {"train": 0, "memory": 10000, "heldout": 2000, "edit": 2000, "test": 1000},
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def splits(request: pytest.FixtureRequest) -> TaskSplits:
    if DATA is None:
        pytest.skip("../shared/data is not present")
    return load_task(request.param, DATA, seed=0)


@needs_data
def test_sizes_as_documented(splits: TaskSplits) -> None:
    assert splits.counts() == EXPECTED[splits.name]


@needs_data
def test_parts_are_disjoint_including_paraphrases(splits: TaskSplits) -> None:
    owner: dict[str, str] = {}
    for part in TaskSplits.PARTS:
        for ex in getattr(splits, part):
            for text in (ex.input, *ex.equivalents, *ex.train_equivalents):
                key = text_key(text)
                assert owner.setdefault(key, part) == part, f"{text!r} in {owner[key]} and {part}"


@needs_data
def test_parts_that_are_scored_have_targets(splits: TaskSplits) -> None:
    for part in ("train", "edit", "test"):
        assert all(ex.target for ex in getattr(splits, part))
    if splits.kind == "classification":
        for part in ("train", "edit", "test"):
            assert {ex.target for ex in getattr(splits, part)} <= set(FEVER_LABELS)


@needs_data
def test_deterministic_for_a_seed_and_different_across_seeds(splits: TaskSplits) -> None:
    again = load_task(splits.name, DATA, seed=0)
    other = load_task(splits.name, DATA, seed=1)
    for part in TaskSplits.PARTS:
        assert getattr(again, part) == getattr(splits, part)
    assert other.edit != splits.edit
    assert other.counts() == splits.counts()


@needs_data
def test_fever_parts_follow_the_rules() -> None:
    fever = load_task("fever", DATA)
    assert fever.kind == "classification" and fever.labels == FEVER_LABELS
    assert len(fever.memory) >= 10_000 and len(fever.heldout) >= 2_000
    assert all(not ex.equivalents for part in TaskSplits.PARTS for ex in getattr(fever, part))
    # binary parts are balanced: the two labels differ by at most one claim
    for part in ("edit", "test"):
        targets = [ex.target for ex in getattr(fever, part)]
        assert abs(targets.count("SUPPORTS") - targets.count("REFUTES")) <= 1


@needs_data
def test_zsre_true_answers_and_paraphrases() -> None:
    zsre = load_task("zsre", DATA)
    by_question = {ex.input: ex for ex in zsre.edit}
    first = by_question["Which family does Epaspidoceras belong to?"]
    assert first.target == "Aspidoceratidae"  # KnowEdit ground_truth, not the new target "Noctuidae"
    assert first.equivalents == ("What family are Epaspidoceras?",)
    assert all(ex.target != "dummy" for part in TaskSplits.PARTS for ex in getattr(zsre, part))
    assert not any(ex.input.startswith("nq question:") for ex in zsre.heldout + zsre.memory + zsre.test)
    # the few without one: their only rephrase is itself another edit question
    assert sum(bool(ex.equivalents) for ex in zsre.edit) > 0.97 * len(zsre.edit)
    # train equivalents: the relation's other phrasings about the same subject, never a measured one
    assert sum(bool(ex.train_equivalents) for ex in zsre.edit) > 0.8 * len(zsre.edit)
    assert "What family are Epaspidoceras?" not in first.train_equivalents
    assert all("Epaspidoceras" in text for text in first.train_equivalents)
    assert all(len(ex.train_equivalents) <= 8 for ex in zsre.edit)


@needs_data
def test_counterfact_edit_targets_are_new_targets() -> None:
    cf = load_task("counterfact", DATA)
    rows = json.loads((DATA / "raw/counterfact_easyedit/counterfact-edit.json").read_text(encoding="utf-8"))
    new: dict[str, set[str]] = {}
    true: dict[str, set[str]] = {}
    for row in rows:
        new.setdefault(row["prompt"], set()).add(row["target_new"])
        true.setdefault(row["prompt"], set()).add(row["ground_truth"])
    edits = [ex for ex in cf.edit if ex.input in new]
    tests = [ex for ex in cf.test if ex.input in true]
    assert len(edits) > 500 and len(tests) > 500
    assert all(ex.target in new[ex.input] for ex in edits)  # edit: the counterfactual target
    assert all(ex.target in true[ex.input] for ex in tests)  # test: the true fact


def test_counterfact_edits_carry_neighbourhood_prompts_no_other_part_holds() -> None:
    """locality_nb's prompts: the edited case's neighbourhood prompts (same relation, other subject),
    at most CF_NEIGHBOURS each, in no other part and no other edit's."""
    from patching.bases.datasets import CF_NEIGHBOURS, counterfact_cases

    cf = load_task("counterfact", DATA)
    near = {text_key(c.prompt): {text_key(n) for n in c.neighbours} for c in counterfact_cases(DATA)}
    with_nb = [ex for ex in cf.edit if ex.neighbours]
    assert len(with_nb) > 1500 and all(len(ex.neighbours) <= CF_NEIGHBOURS for ex in cf.edit)
    assert all({text_key(n) for n in ex.neighbours} <= near[text_key(ex.input)] for ex in with_nb)
    keys = [text_key(n) for ex in cf.edit for n in ex.neighbours]
    assert len(keys) == len(set(keys))
    others = {text_key(t) for part in (cf.memory, cf.heldout, cf.test) for e in part for t in (e.input, *e.equivalents)}
    others |= {text_key(t) for e in cf.edit for t in (e.input, *e.equivalents)}
    assert not set(keys) & others


def test_missing_data_dir_names_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_task("fever", tmp_path / "nowhere")
    monkeypatch.setattr("patching.bases.datasets.default_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_task("zsre")


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match="fever"):
        load_task("squad", Path("/nonexistent"))  # the name is checked before the data


def test_default_data_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHD_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path


@needs_data
def test_pararel_questions_for_the_qa_base_stay_out_of_the_zsre_task() -> None:
    """zsre-smollm2-qa's tuning data (patching/bases/pararel.py) on the real files: the documented
    relations, several phrasings per fact, no zsRE subject and no text of any zsRE part."""
    from patching.bases.datasets import raw_dir, zsre_phrasings
    from patching.bases.pararel import qa_examples, relation_templates

    splits = load_task("zsre")
    graph, subjects = zsre_phrasings()
    templates = relation_templates(graph.by_use())
    assert len(subjects) == 1_237 and len(templates) == 16
    taken = splits.keys()
    assert text_key(splits.edit[0].input) in taken and text_key(splits.edit[0].equivalents[0]) in taken
    pairs = qa_examples(
        raw_dir(None) / "pararel" / "trex_lms_vocab",
        templates,
        skip_subjects=subjects,
        skip_key=taken,
        key=text_key,
        facts=1000,
    )
    assert 2_000 <= len(pairs) <= 3_000
    assert not any(text_key(q) in taken for q, _ in pairs)
    assert not any(s in q.casefold() for q, _ in pairs[:200] for s in subjects if len(s) > 12)
