"""`evaluate --compare`: reports side by side on the mistakes they all edited."""

from __future__ import annotations

from typing import Any

from patching.eval.compare import common_prefix, differing, label, table


def report(n: int, sr: bool, gr: float, **settings: Any) -> dict[str, Any]:
    rows: list[dict[str, Any]] = [{"i": 0, "status": "fixed_along_the_way"}]  # never edited: not in any prefix
    rows += [
        {"i": i, "sr": sr, "gr": gr, "cr": 1.0 if sr else 0.0, "seconds": float(i), "right_at_end": i % 2 == 1}
        for i in range(1, n + 1)
    ]
    return {"editor": "tpatcher", "edits": n, "sequential": True, "locality": 1.0, "rows": rows, **settings}


def test_the_table_scores_every_run_on_the_shared_prefix_only() -> None:
    short, long = report(3, True, 0.5, context_augment=10), report(6, False, 0.25)
    assert common_prefix([short, long]) == [1, 2, 3]
    assert label(short) == "tpatcher context_augment=10" and label(long) == "tpatcher"
    lines = table([short, long]).splitlines()
    assert len(lines) == 4
    first, second = (line.split(" | ") for line in lines[2:])
    # edits, SR, GR, cr of the first three mistakes; ER = right_at_end over rows 1..3 (1 and 3 of 3)
    assert first[1:5] == ["3 of 3", "1.000", "0.500", "1.000"]
    assert second[1:5] == ["3 of 6", "0.000", "0.250", "0.000"]
    assert first[8] == second[8] == "0.667"
    assert first[10].rstrip(" |") == "2.0"  # median of 1, 2, 3 seconds


def test_trainer_and_gate_settings_that_differ_label_the_runs() -> None:
    a = report(2, True, 1.0, train_config={"equivalent_steps": 100, "lr": 0.01}, gate_config={"retries": 2})
    b = report(2, True, 1.0, train_config={"equivalent_steps": 300, "lr": 0.01}, gate_config={"retries": 2})
    assert differing([a, b]) == ["trainer.equivalent_steps"]
    assert label(a, ["trainer.equivalent_steps"]) == "tpatcher equivalent_steps=100"
    first, second = (line.split(" | ")[0] for line in table([a, b]).splitlines()[2:])
    assert first.endswith("equivalent_steps=100") and second.endswith("equivalent_steps=300")
    # a report written before a setting existed ran with its default: not a difference at the default
    old = report(2, True, 1.0, train_config={"equivalent_steps": 300}, gate_config={"retries": 2})
    assert differing([old, b]) == []
    margin = report(
        2, True, 1.0, train_config={"equivalent_steps": 300, "stop_logit_margin": 0.5}, gate_config={"retries": 2}
    )
    assert differing([old, margin]) == ["trainer.stop_logit_margin"]
    assert label(old, ["trainer.stop_logit_margin"]) == "tpatcher stop_logit_margin=0.0"
    # the subject key existed off and was turned on later: a report without it ran the plain key
    subject = report(
        2, True, 1.0, train_config={"equivalent_steps": 300, "subject_key": True}, gate_config={"retries": 2}
    )
    assert differing([old, subject]) == ["trainer.subject_key"]
    assert label(old, ["trainer.subject_key"]) == "tpatcher subject_key=False"


def test_editors_without_trainer_settings_are_labelled_by_name_beside_tpatcher_runs() -> None:
    a = report(2, True, 1.0, train_config={"equivalent_steps": 100}, gate_config={"retries": 2})
    b = report(2, True, 1.0, train_config={"equivalent_steps": 300}, gate_config={"retries": 2})
    grace = {**report(2, True, 0.0), "editor": "grace", "train_config": None, "gate_config": None}
    # only the tpatcher runs' own difference, not every setting grace lacks
    assert differing([a, grace]) == [] and differing([a, b, grace]) == ["trainer.equivalent_steps"]
    assert label(grace, ["trainer.equivalent_steps"]) == "grace"
    assert [line.split(" | ")[0].lstrip("| ") for line in table([a, b, grace]).splitlines()[2:]] == [
        "tpatcher equivalent_steps=100",
        "tpatcher equivalent_steps=300",
        "grace",
    ]
