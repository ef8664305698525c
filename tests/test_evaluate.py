"""patchd evaluate: metrics on hand-made cases, the generic-format loader, one tiny end-to-end run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patching.eval import metrics
from patching.eval.evaldata import DataError, load_eval_data, load_generic
from patching.eval.evaluate import run_evaluate
from tests.tinybase import WORDS, tiny_base


def test_metrics_on_known_cases() -> None:
    assert metrics.success_rate([True, True, False, True]) == 0.75
    assert metrics.success_rate([]) is None
    assert metrics.generalization_rate([1.0, None, 0.5, 0.0]) == pytest.approx(0.5)
    assert metrics.generalization_rate([None, None]) is None
    assert metrics.edit_retention([True, False]) == 0.5
    # 3/4 right before, 2/4 after -> 0.5 / 0.75
    assert metrics.relative_accuracy([True, True, True, False], [True, False, True, False]) == pytest.approx(2 / 3)
    assert metrics.relative_accuracy([False, False], [True, True]) is None  # undefined, not infinite
    assert metrics.locality(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == 0.75
    assert metrics.running_mean([1, 0, 1, 1]) == [1.0, 0.5, 2 / 3, 0.75]
    assert metrics.percentile([5, 1, 3, 2, 4], 0.5) == 3
    with pytest.raises(ValueError):
        metrics.locality(["a"], [])


def test_teacher_forced_token_accuracy_on_hand_made_logits() -> None:
    """Two examples in a [2, 3, 4] batch: example 0 has target rows at positions 0 and 1 (tokens
    2 and 3), example 1 at position 2 (token 1); example 2 has none."""
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 2] = 1.0  # right
    logits[0, 1, 0] = 1.0  # wrong: 0 is the argmax, 3 the target
    logits[1, 2, 1] = 5.0  # right
    rows_b, rows_t, targets = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]), torch.tensor([2, 3, 1])
    assert metrics.token_accuracy(logits, rows_b, rows_t, targets, 3) == [0.5, 1.0, None]
    assert metrics.mean_score([0.5, 1.0, None]) == 0.75 and metrics.mean_score([None]) is None


def test_progress_bar_shows_running_sr_gr_and_the_last_er_checkpoint() -> None:
    from patching.eval.evaluate import _running

    rows = [
        {"status": "fixed_along_the_way"},
        {"sr": True, "gr": 1.0},
        {"sr": False, "gr": 0.0},
        {"sr": True, "gr": None},
        {"sr": True, "gr": 0.5},
    ]
    curve = [{"edits": 2, "retention": 1.0, "locality": 1.0}, {"edits": 4, "retention": 0.75, "locality": 0.995}]
    assert _running(rows, curve, 7) == {"sr": "0.75", "gr": "0.50", "er": "0.75", "loc": "0.995", "neurons": "7"}
    assert _running(rows[1:2], [], 1) == {"sr": "1.00", "gr": "1.00", "neurons": "1"}  # no checkpoint yet


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_generic_loader_reads_good_files(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "edits.jsonl",
        [{"input": "a b", "target": "X", "equivalents": ["b a"]}, {"input": "c", "target": "Y"}],
    )
    write_jsonl(tmp_path / "heldout.jsonl", [{"input": "h", "target": ""}])
    write_jsonl(tmp_path / "test.jsonl", [{"input": "t", "target": "X"}])
    data = load_eval_data(str(tmp_path))
    assert [e.input for e in data.edits] == ["a b", "c"]
    assert data.edits[0].equivalents == ("b a",) and data.has_paraphrases
    assert data.heldout[0].input == "h" and data.test[0].target == "X"
    assert data.memory == data.test  # no memory.jsonl and no train_eval: the test inputs


def test_generic_folder_without_memory_inputs_is_refused(tmp_path: Path) -> None:
    """edits + heldout alone once built an empty memory and failed every edit without a word."""
    write_jsonl(tmp_path / "edits.jsonl", [{"input": "a", "target": "X"}])
    write_jsonl(tmp_path / "heldout.jsonl", [{"input": "h", "target": ""}])
    with pytest.raises(DataError, match="memory.jsonl"):
        load_eval_data(str(tmp_path))
    write_jsonl(tmp_path / "memory.jsonl", [{"input": "m"}])
    assert [e.input for e in load_eval_data(str(tmp_path)).memory] == ["m"]


def test_generic_loader_reports_every_bad_line(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "edits.jsonl",
        [
            {"input": "ok", "target": "X"},
            "{not json",
            {"input": "", "target": "X"},
            {"input": "x", "target": 3},
            {"input": "y", "target": "Y", "equivalents": "not a list"},
            "[1, 2]",
        ],
    )
    with pytest.raises(DataError) as err:
        load_generic(tmp_path)
    msg = str(err.value)
    for line in (2, 3, 4, 5, 6):
        assert f"edits.jsonl:{line}:" in msg
    assert "edits.jsonl:1:" not in msg
    with pytest.raises(DataError, match="no edits.jsonl"):
        load_generic(tmp_path / "missing")


def tiny_data(tmp_path: Path) -> Path:
    rng = random.Random(0)
    firsts = rng.sample(WORDS, 260)  # a unique first word keeps the tiny model's states distinct

    def sentence(i: int) -> str:
        return " ".join([firsts[i]] + rng.choices(WORDS, k=6))

    labels = ["SUPPORTS", "REFUTES"]
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "edits.jsonl", [{"input": sentence(i), "target": rng.choice(labels)} for i in range(30)])
    write_jsonl(data / "heldout.jsonl", [{"input": sentence(i), "target": ""} for i in range(30, 110)])
    write_jsonl(data / "memory.jsonl", [{"input": sentence(i)} for i in range(110, 230)])
    write_jsonl(data / "test.jsonl", [{"input": sentence(i), "target": rng.choice(labels)} for i in range(230, 260)])
    return data


def test_tiny_end_to_end_evaluate(tmp_path: Path) -> None:
    data = tiny_data(tmp_path)
    report = run_evaluate(
        str(tiny_base(tmp_path)), load_eval_data(str(data)), editor="tpatcher", progress=lambda _msg: None
    )
    assert report["edits"] > 5  # roughly half of random targets are mistakes
    assert report["sr"] == 1.0 and report["er"] == 1.0
    assert report["sr_tf"] == 1.0 and report["er_tf"] == 1.0 and report["gr_tf"] is None  # a label is one token
    assert report["locality"] == 1.0  # the strict gate lets no held-out prediction change
    assert report["gr"] is None  # no paraphrases in this data
    # every edit asked behind 3 of the 12 texts held out of memory.jsonl; no paraphrase, no cgr
    assert report["cr"] is not None and 0.0 <= report["cr"] <= 1.0 and report["cgr"] is None
    assert report["cr_chat"] is None  # a classifier has no chat form
    assert all(r["cr"] in (0.0, 1 / 3, 2 / 3, 1.0) for r in report["rows"] if "sr" in r)
    assert report["neurons"] == report["edits"] - report["gate_rejected"]
    assert report["parameters_added"] == report["neurons"] * (2 * 64 + 1)  # the tiny BERT's hidden size
    assert isinstance(report["inference_overhead_b16"], float)
    assert len([r for r in report["rows"] if "sr" in r]) == report["edits"]
    from patching.eval.plots import plot_reports

    plot_reports([report, report], tmp_path / "cmp.png")  # what --plot and --compare write
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stopped_stream_resumed_ends_as_the_uninterrupted_one(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from patching.eval.resume import Resume, ResumeError, patches_path

    data, base = load_eval_data(str(tiny_data(tmp_path))), str(tiny_base(tmp_path))
    quiet = {"editor": "tpatcher", "progress": lambda _msg: None, "curve_points": 2}
    whole = run_evaluate(base, data, patches=tmp_path / "whole.patches.safetensors", **quiet)
    assert whole["segments"] == 1 and whole["neurons"] > 3
    # the first 3 mistakes, as a run stopped there would leave them
    first = run_evaluate(base, data, edits=3, patches=patches_path(tmp_path / "first.json"), **quiet)
    (tmp_path / "first.json").write_text(json.dumps(first))
    resumed = run_evaluate(
        base,
        data,
        resume=Resume.read(tmp_path / "first.json"),
        patches=tmp_path / "resumed.patches.safetensors",
        **quiet,
    )
    same = ("status", "sr", "neurons", "right_at_end")

    def outcome(report: dict) -> list[dict]:
        return [{k: r.get(k) for k in same} for r in report["rows"]]

    assert outcome(resumed) == outcome(whole)
    for key in ("edits", "neurons", "sr", "er", "locality", "test_r", "gate_rejected"):
        assert resumed[key] == whole[key], key
    assert resumed["segments"] == 2 and resumed["wall_seconds"] > first["wall_seconds"]
    a = load_file(str(tmp_path / "whole.patches.safetensors"))
    b = load_file(str(tmp_path / "resumed.patches.safetensors"))
    assert all(torch.allclose(a[k], b[k]) for k in ("keys", "biases", "values"))
    # another setting is another stream: refused, naming the key
    with pytest.raises(ResumeError, match="seed"):
        run_evaluate(base, data, seed=1, resume=Resume.read(tmp_path / "first.json"), **quiet)
    # a damaged patches file is a clear error, not a traceback
    patches_path(tmp_path / "first.json").write_bytes(b"not safetensors")
    with pytest.raises(ResumeError, match="safetensors"):
        Resume.read(tmp_path / "first.json")


def test_a_stopped_grace_stream_resumes_from_its_state_file_as_the_uninterrupted_one(tmp_path: Path) -> None:
    """GRACE and WISE hold no neurons: a stopped run leaves the editor's state beside its report
    (patching/eval/editorstate.py), and the resumed stream ends as the uninterrupted one."""
    from safetensors.torch import load_file

    from patching.eval.editorstate import read_state, state_path, write_state
    from patching.eval.resume import Resume, ResumeError

    data, base = load_eval_data(str(tiny_data(tmp_path))), str(tiny_base(tmp_path))
    quiet = {"editor": "grace", "progress": lambda _msg: None, "curve_points": 0}
    whole = run_evaluate(base, data, state=state_path(tmp_path / "whole.json"), **quiet)
    assert whole["neurons"] > 3
    first = run_evaluate(base, data, edits=3, state=state_path(tmp_path / "first.json"), **quiet)
    (tmp_path / "first.json").write_text(json.dumps(first))
    assert first["editor_config"] == {"eps_init": 1.0, "steps": 100}
    resumed = run_evaluate(
        base, data, resume=Resume.read(tmp_path / "first.json"), state=state_path(tmp_path / "resumed.json"), **quiet
    )
    same = ("status", "sr", "right_at_end")
    assert [{k: r.get(k) for k in same} for r in resumed["rows"]] == [
        {k: r.get(k) for k in same} for r in whole["rows"]
    ]
    for key in ("edits", "neurons", "sr", "er", "locality", "test_r"):
        assert resumed[key] == whole[key], key
    assert resumed["segments"] == 2 and resumed["editor_summary"]["actions"] == whole["editor_summary"]["actions"]
    a, b = load_file(str(state_path(tmp_path / "whole.json"))), load_file(str(state_path(tmp_path / "resumed.json")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another radius is another stream
    with pytest.raises(ResumeError, match="editor_config"):
        run_evaluate(
            base, data, resume=Resume.read(tmp_path / "first.json"), editor_options={"grace_eps": 2.0}, **quiet
        )
    # a state from another point of the stream than its report (a second Ctrl-C in the final passes)
    st = read_state(state_path(tmp_path / "first.json"))
    write_state(state_path(tmp_path / "first.json"), type(st)(st.editor, st.tensors, st.meta, rows=st.rows + 1))
    with pytest.raises(ResumeError, match="after"):
        Resume.read(tmp_path / "first.json")
    state_path(tmp_path / "first.json").write_bytes(b"not safetensors")
    with pytest.raises(ResumeError, match="safetensors"):
        Resume.read(tmp_path / "first.json")
    # an editor with no saved state is named
    (tmp_path / "ft.json").write_text(json.dumps({**first, "editor": "ft-last"}))
    with pytest.raises(ResumeError, match="ft-last"):
        Resume.read(tmp_path / "ft.json")


def test_a_trainer_setting_added_after_a_run_stopped_blocks_its_resume_only_off_its_default() -> None:
    from dataclasses import asdict

    from patching.config import TrainConfig
    from patching.eval.resume import differences

    now = asdict(TrainConfig(equivalent_steps=300))
    there = {k: v for k, v in now.items() if k != "stop_logit_margin"}  # a report written before the knob
    assert differences("train_config", there, now) == []
    assert differences("train_config", there, {**now, "stop_logit_margin": 2.0}) == [
        "train_config.stop_logit_margin is 2.0 now; the stopped run had no such setting"
    ]
    assert differences("train_config", {**there, "lr": 0.5}, now) == [
        "train_config.lr differs from the stopped run (0.5 there, 0.01 now)"
    ]
    assert differences("train_config", {**now, "gone": 1}, now) == ["train_config.gone is no setting now (1 there)"]
    assert differences("seed", 0, 1) == ["seed differs from the stopped run (0 there, 1 now)"]
    # a setting turned on after it was added: a report without it ran with it off
    before = {k: v for k, v in now.items() if k != "band_generation"}
    assert now["band_generation"] is True
    assert differences("train_config", before, now) == [
        "train_config.band_generation is True now; the stopped run had no such setting"
    ]
    assert differences("train_config", before, {**now, "band_generation": False}) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_background_evaluate_can_be_stopped_for_its_partial_report(signum: int) -> None:
    # a shell's background job starts with SIGINT ignored: the run must still stop on kill -INT / kill
    code = f"""
import os, signal
from daemon.cli.evaluate import interruptible
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    with interruptible():
        os.kill(os.getpid(), {int(signum)})
        signal.pause()
except KeyboardInterrupt:
    print("partial report")
assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # put back afterwards
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "partial report"


@pytest.mark.parametrize("editor", ["tpatcher", "grace"])
def test_a_single_edit_run_edits_the_unedited_model_each_time(tmp_path: Path, editor: str) -> None:
    """--single (T = 1): every edit is made on the base and undone after it is scored, so the
    editor ends with nothing added; tpatcher and grace each fix every mistake alone."""
    data = tiny_data(tmp_path)
    report = run_evaluate(
        str(tiny_base(tmp_path)),
        load_eval_data(str(data)),
        editor=editor,
        edits=6,
        sequential=False,
        progress=lambda _msg: None,
        editor_options={"grace_eps": 1e-3},
    )
    assert report["edits"] == 6 and report["sr"] == 1.0 and report["sr_tf"] == 1.0
    assert report["neurons"] == 0  # reset after the last edit too
    assert report["er"] is None and report["locality"] is None  # sequential figures only


def test_locality_nb_counts_the_edited_cases_neighbours_whose_answer_moved(tmp_path: Path) -> None:
    """Edit 0's neighbours: a held-out input (the strict gate keeps it) and edit 1's input (a
    mistake the stream fixes, so its answer moves): locality_nb = 1/2 exactly."""
    data = tiny_data(tmp_path)
    edits = [json.loads(line) for line in (data / "edits.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines()]
    base = tiny_base(tmp_path)
    first = run_evaluate(str(base), load_eval_data(str(data)), edits=4, curve_points=0, progress=lambda _msg: None)
    fixed = [r["input"] for r in first["rows"] if r.get("status") == "accepted"]  # rows index the mistakes
    assert len(fixed) >= 2
    a = next(e for e in edits if e["input"] == fixed[0])
    a["neighbours"] = [heldout[0]["input"], fixed[1]]
    write_jsonl(data / "edits.jsonl", edits)
    report = run_evaluate(str(base), load_eval_data(str(data)), edits=4, curve_points=0, progress=lambda _msg: None)
    assert report["sizes"]["neighbours"] == 2 and report["locality_nb"] == 0.5
    assert first["locality_nb"] is None  # no neighbours, no figure


@pytest.mark.parametrize(
    ("raised", "code", "said"),
    [
        (KeyboardInterrupt(), 130, "interrupted before the stream began: no report written"),
        (ValueError("--chat-copies needs a generator"), 2, "error: --chat-copies needs a generator"),
    ],
)
def test_the_evaluate_command_ends_with_a_line_not_a_traceback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raised: BaseException,
    code: int,
    said: str,
) -> None:
    """A signal before the first edit, or a setting the base cannot run, ends `patchd evaluate` with
    one line and an exit code (a stopped stream is the partial report's business, tested above)."""
    from daemon.cli import main
    from patching.eval import evaluate

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(evaluate, "run_evaluate", refuse)
    args = ["evaluate", "--base", str(tiny_base(tmp_path)), "--data", str(tiny_data(tmp_path)), "--edits", "1"]
    assert main(args) == code
    assert said in capsys.readouterr().out


def test_compare_with_a_missing_or_broken_report_says_which_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from daemon.cli import main

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path in (tmp_path / "missing.json", broken):
        assert main(["evaluate", "--compare", str(path)]) == 2
        assert f"--compare {path}: not a readable report" in capsys.readouterr().err
