"""Phrasing templates mined from question pairs (the zsre task's train equivalents)."""

from __future__ import annotations

from patching.bases.templates import TemplateGraph, template


def key(text: str) -> str:
    return text.casefold().strip()


RECORDS = [
    # (subject, question, rephrase): two records of one relation, one of another
    ("Epaspidoceras", "Which family does Epaspidoceras belong to?", "What family are Epaspidoceras?"),
    ("Hyperbaniana", "What family are Hyperbaniana?", "What kind of family is Hyperbaniana?"),
    ("Olivia Johnson", "Who created Olivia Johnson?", "Who is the creator of Olivia Johnson?"),
]


def test_template_replaces_the_first_mention_only() -> None:
    assert template("Is Foo the son of Foo?", "Foo") == "Is \x00 the son of Foo?"
    assert template("Who made it?", "Foo") is None


def test_an_edit_never_gets_its_own_rephrase_back() -> None:
    graph = TemplateGraph(RECORDS, key)
    out = graph.phrasings("Which family does Epaspidoceras belong to?", "Epaspidoceras")
    # its own pair is not evidence: the only route to other phrasings is gone
    assert out == []
    # a new question of the same relation gets both phrasings, nearest first
    out = graph.phrasings("Which family does Cyclura belong to?", "Cyclura")
    assert out == ["What family are Cyclura?", "What kind of family is Cyclura?"]


def test_two_hops_through_other_records_and_nothing_across_relations() -> None:
    graph = TemplateGraph(RECORDS, key)
    out = graph.phrasings("What kind of family is Zonitis?", "Zonitis")
    assert out == ["What family are Zonitis?", "Which family does Zonitis belong to?"]
    assert not any("creat" in text for text in out)
    assert graph.phrasings("What kind of family is Zonitis?", "Zonitis", hops=1) == ["What family are Zonitis?"]


def test_by_use_orders_templates_by_their_records() -> None:
    graph = TemplateGraph(RECORDS, key)
    # "What family are X?" is in both family records; the others in one each
    assert graph.by_use()[0] == "What family are \x00?"
    assert set(graph.by_use()) == {
        "Which family does \x00 belong to?",
        "What family are \x00?",
        "What kind of family is \x00?",
        "Who created \x00?",
        "Who is the creator of \x00?",
    }
