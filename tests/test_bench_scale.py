"""The scale benchmark's streams are real FEVER claims and real CounterFact cases only, in the order
the issue asks, and its window figures are what they say (the long run itself is `patchd bench
scale`)."""

from __future__ import annotations

from patching.bases.datasets import NEI, counterfact_cases, load_task, text_key
from patching.eval.scale import counterfact_stream, fever_stream, summarize_window


def test_the_fever_stream_is_real_claims_outside_memory_heldout_and_test_mistakes_first() -> None:
    def always(xs: list[str]) -> list[str]:
        return ["SUPPORTS"] * len(xs)  # a base that says SUPPORTS to everything

    stream = fever_stream(always, 3000, memory_size=4000)
    splits = load_task("fever")
    gold = {text_key(e.input): e.target for part in (splits.edit, splits.train, splits.memory) for e in part}
    used = {text_key(e.input) for e in (*splits.heldout, *splits.test, *splits.memory[:4000])}
    assert len(stream.edits) == 3000 and stream.memory == [e.input for e in splits.memory[:4000]]
    assert not any(text_key(e.input) in used for e in stream.edits)
    assert len({text_key(e.input) for e in stream.edits}) == 3000  # no claim twice
    kinds = [e.kind for e in stream.edits]
    first_flip = kinds.index("flip") if "flip" in kinds else len(kinds)
    assert set(kinds[:first_flip]) == {"mistake"} and "mistake" not in kinds[first_flip:]
    for e in stream.edits:
        if e.kind == "mistake":  # the base is wrong: the gold label is the target
            assert e.target == gold[text_key(e.input)] == "REFUTES"
        else:  # a flip: the label the base does not predict; NEI claims are flips too
            assert e.target == "REFUTES" and (gold[text_key(e.input)] == NEI) == (e.kind == "flip_nei")
    assert stream.facts["edits_by_kind"] == {k: kinds.count(k) for k in set(kinds)}
    assert stream.facts["memory_claims"] == 4000 and not stream.facts["ran_out"]
    everything = fever_stream(always, 10**6, memory_size=4000)
    assert everything.facts["ran_out"] and len(everything.edits) == everything.facts["claims_available"]


def test_the_counterfact_stream_is_real_rewrites_disjoint_from_memory_heldout_and_test() -> None:
    stream = counterfact_stream(3000, memory_size=2000)
    splits = load_task("counterfact")
    cases = {text_key(c.prompt): c for c in counterfact_cases()}
    assert len(stream.edits) == 3000 and len(stream.memory) == 2000
    assert stream.heldout == [e.input for e in splits.heldout]
    # the memory and held-out sets hold no prompt that is or may become an edit
    assert not any(text_key(x) in cases for x in stream.memory)
    used = {text_key(x) for x in (*stream.memory, *stream.heldout)} | {text_key(e.input) for e in splits.test}
    assert not any(text_key(e.input) in used for e in stream.edits)
    assert len({text_key(e.input) for e in stream.edits}) == 3000  # no case twice
    for e in stream.edits:  # every edit is a real case's rewrite
        assert e.kind == "counterfact" and e.target == cases[text_key(e.input)].target_new.strip()
    # the counterfact task's edit part comes first, in its order
    first = [e.input for e in splits.edit if text_key(e.input) not in used][:100]
    assert [e.input for e in stream.edits[:100]] == first
    assert stream.facts["edits_by_kind"] == {"counterfact": 3000} and not stream.facts["ran_out"]
    everything = counterfact_stream(10**6, memory_size=2000)
    assert everything.facts["ran_out"] and len(everything.edits) == everything.facts["cases_available"] > 15_000


def test_window_figures() -> None:
    rows = [{"ms": float(i), "train_ms": 1.0, "gate_ms": 2.0, "outcome": "patched"} for i in range(1, 101)]
    rows[0]["outcome"] = "gate_rejected"
    w = summarize_window(rows)
    assert w["latency_ms_median"] == 50.5 and w["latency_ms_p95"] == 95.0 and w["sr"] == 0.99
    assert w["outcomes"] == {"patched": 99, "gate_rejected": 1}


def test_a_window_that_published_nothing_reports_the_version_served() -> None:
    """A window whose last edits were not patched publishes nothing new: its version is the last
    one published (kept in the report for --resume), not None."""
    from types import SimpleNamespace

    from daemon.tools.bench_scale import _note_published

    report: dict[str, object] = {}
    assert _note_published(report, None) is None  # nothing published yet
    assert _note_published(report, SimpleNamespace(number=3, size=1200)) == {"number": 3, "size": 1200}
    assert _note_published(report, None) == {"number": 3, "size": 1200}
    assert report["last_published"] == {"number": 3, "size": 1200}
