"""`patchd evaluate`: the sequential-editing protocol (DESIGN §7) on real data, any editor.

The stream: the edit-set inputs the base gets wrong, in order, edited one after another without
any reset. An input the current model already gets right when its turn comes (fixed through the
generality of earlier patches) is counted, not edited. Ctrl-C stops the stream and the report
covers what was done.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from patching.augment import Source, augment_prefixes, chat_trainable, with_context
from patching.augment import chat_copies as chat_copies_of
from patching.bases.load import load_base, resolve_dtype
from patching.bases.tasks import TaskAdapter
from patching.config import GateConfig, TrainConfig
from patching.engine import Patcher, resolved_config
from patching.eval import metrics
from patching.eval.contexts import chat_prompt, contexts_for
from patching.eval.editors import TPatcherEditor, make_editor
from patching.eval.editorstate import write_state
from patching.eval.evaldata import EvalData
from patching.eval.record import Editor
from patching.eval.resume import Resume, ResumeError, save_patches
from patching.eval.timing import alternating

CURVE_POINTS = 20  # retention/locality checkpoints along the stream (each costs a prediction pass)
CURVE_SAMPLE = 300  # held-out inputs predicted at each checkpoint (the full set at the end)


def _right(adapter: TaskAdapter, examples: list[Any]) -> list[bool]:
    preds = adapter.predict([e.input for e in examples])
    return [adapter.right(p, e.target) for p, e in zip(preds, examples, strict=True)]


def _in_context(adapter: TaskAdapter, ex: Any, contexts: list[str]) -> dict[str, Any]:
    """cr, cgr and cr_chat of one edit just after it (None where it has no such input), and
    `cr_missed`: each context the edit's own input failed behind, with the answer given there (the
    failure analyses of issue 21 need the text, and a report cannot rebuild it cheaply)."""
    if not contexts:
        return {"cr": None, "cgr": None, "cr_chat": None}
    answers = adapter.predict([with_context(c, ex.input) for c in contexts])
    own = [adapter.right(a, ex.target) for a in answers]
    paras = [type(ex)(with_context(contexts[j % len(contexts)], q), ex.target) for j, q in enumerate(ex.equivalents)]
    para = _right(adapter, paras) if paras else []
    chat = None
    if adapter.generation:
        prompt = chat_prompt(adapter.base.tokenizer, adapter.text(ex.input), contexts[0])
        if prompt is not None:
            chat = float(adapter.right(adapter.predict_prompts([prompt])[0], ex.target))
    return {
        "cr": sum(own) / len(own),
        "cgr": sum(para) / len(para) if para else None,
        "cr_chat": chat,
        "cr_missed": [{"context": c, "answer": a} for c, a, ok in zip(contexts, answers, own, strict=True) if not ok],
    }


def _inference_overhead(adapter: TaskAdapter, ed: Any, inputs: list[Any], rounds: int = 11) -> float | None:
    """Forward time of a serving batch of the inputs with the editor's additions / without them - 1,
    alternating rounds, median; None for an editor that cannot step aside (it changed weights)."""
    if not hasattr(ed, "disabled"):
        return None
    batch = adapter.serving_batch(inputs)
    model = adapter.base.model
    edited, base, _ = alternating(lambda: model(**batch), ed.disabled, rounds)
    return round(edited / base - 1, 4)


def _running(rows: list[dict[str, Any]], curve: list[dict[str, Any]], neurons: int) -> dict[str, str]:
    """The progress bar's running numbers: SR and GR so far, ER and locality at the last checkpoint."""
    done = [r for r in rows if "sr" in r]
    out = {"sr": f"{statistics.fmean(r['sr'] for r in done):.2f}"}
    gr = metrics.generalization_rate([r["gr"] for r in done])
    if gr is not None:
        out["gr"] = f"{gr:.2f}"
    if curve:
        out["er"] = f"{curve[-1]['retention']:.2f}"
        out["loc"] = f"{curve[-1]['locality']:.3f}"
    out["neurons"] = str(neurons)
    return out


def run_evaluate(
    base: str,
    data: EvalData,
    *,
    editor: str = "tpatcher",
    edits: int | None = None,
    seed: int = 0,
    train: TrainConfig | None = None,
    gate: GateConfig | None = None,
    progress: Callable[[str], None] = print,
    sequential: bool = True,
    editor_options: dict[str, Any] | None = None,
    curve_points: int = CURVE_POINTS,
    train_equivalents: bool = False,
    context_augment: int = 0,
    augment_source: Source = "memory",
    chat_copies: int = 0,
    resume: Resume | None = None,
    patches: Path | None = None,
    state: Path | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    """`sequential=False`: every edit on the unedited model (T = 1; the editor must have `reset()`);
    ER, TrainR, TestR, locality and the curve then do not apply and are None.
    `train_equivalents`: editors also train on each edit's `train_equivalents` (never on the
    `equivalents` that GR measures).
    `context_augment`: editors also train on each edit behind that many prefixes taken from
    `augment_source` (patching/augment.py); `chat_copies`: and as that many chat forms of its
    prompt (a generator with a chat template; their earlier questions are those prefixes).
    `patches` (tpatcher, sequential): write every accepted edit's neurons there at the end, also
    when interrupted; `state` (grace, wise, sequential): the editor's state, the same way;
    `resume`: a stopped run of the same settings, continued (patching/eval/resume.py)."""
    t_start = time.perf_counter()
    torch_dtype = resolve_dtype(dtype, str(torch.get_default_device()))  # evaluate runs where torch's default is
    lb = load_base(base, dtype=torch_dtype)
    adapter = TaskAdapter(lb)
    rng = random.Random(seed)
    train = train or TrainConfig(seed=seed)
    gate = gate or GateConfig()
    settings = {
        "editor": editor,
        "base": lb.name,
        "data": data.name,
        "seed": seed,
        "train_equivalents": train_equivalents,
        # these two named only when set (not float32), so reports written before they existed still resume
        **({"context_augment": context_augment} if context_augment else {}),
        # "generated" was the only source before the setting existed: unnamed, so those reports resume
        **({"augment_source": augment_source} if context_augment and augment_source != "generated" else {}),
        **({"chat_copies": chat_copies} if chat_copies else {}),
        **({"dtype": str(torch_dtype).removeprefix("torch.")} if torch_dtype != torch.float32 else {}),
        # tpatcher below the last FFN (patching/eval/deepsite.py)
        **({"site_depth": depth} if (depth := (editor_options or {}).get("site_depth")) is not None else {}),
        "train_config": asdict(resolved_config(lb.model, train)) if editor == "tpatcher" else None,
        "gate_config": asdict(gate) if editor == "tpatcher" else None,
    }

    def factory() -> Patcher:
        p = Patcher(lb.model, train=train, gate=gate)
        return adapter.patcher(p, [e.input for e in data.memory], [e.input for e in data.heldout])

    options = {
        "heldout": [e.input for e in data.heldout],
        "memory": [e.input for e in data.memory],
        "seed": seed,
        "train": train,
        "gate": gate,
        **(editor_options or {}),
    }
    ed: Editor = make_editor(editor, adapter, factory, options)
    if hasattr(ed, "settings"):  # grace, wise: their own settings make another stream too
        settings["editor_config"] = ed.settings()
    if resume is not None:
        resume.check({**settings, "sequential": sequential})
    prefixes = augment_prefixes(adapter, [m.input for m in data.memory], context_augment, augment_source)
    if prefixes:
        progress(f"context augmentation: each edit also trained behind {len(prefixes)} prefixes, e.g. {prefixes[0]!r}")
    if chat_copies and not chat_trainable(adapter, prefixes):
        raise ValueError("--chat-copies needs a generator whose tokenizer has a chat template, and --context-augment")
    if not sequential and not hasattr(ed, "reset"):
        raise ValueError(
            f"editor {editor!r} cannot reset to the base: single-edit runs need tpatcher, mend, grace or wise"
        )
    # the model is still the base here: its answers may come from the disk cache
    stream = adapter.mistakes(data.edits, limit=edits, base=True)
    progress(
        f"{len(stream)} mistakes of the base in {len(data.edits)} edit inputs"
        + (f" (asked for {edits})" if edits and len(stream) < edits else "")
    )
    held_inputs = [e.input for e in data.heldout]
    held_before = adapter.base_predict(held_inputs, progress=True)
    # neighbourhood prompts of the stream's edits (CounterFact): the base's answers, for locality_nb
    nb_inputs = sorted({n for ex in stream for n in ex.neighbours})
    nb_before = dict(zip(nb_inputs, adapter.base_predict(nb_inputs, progress=True), strict=True)) if nb_inputs else {}
    sample = sorted(rng.sample(range(len(held_inputs)), min(CURVE_SAMPLE, len(held_inputs))))
    # TrainR and TestR are sequential figures: a single-edit run does not spend minutes of decoding on them
    train_before = _right(adapter, data.train_eval) if sequential else []
    test_before = _right(adapter, data.test) if sequential else []

    rows: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    # 0 = no curve: on a generator each checkpoint is hundreds of greedy decodes
    every = max(1, len(stream) // curve_points) if curve_points > 0 else 0
    edited: list[Any] = []
    interrupted = False
    earlier_wall, segments = 0.0, 1
    if resume is not None:
        rows = [dict(r) for r in resume.rows([e.input for e in stream])]
        curve = list(resume.report.get("curve", []))
        edited = [stream[r["i"]] for r in rows if "sr" in r]
        _replay(ed, adapter, stream, rows, resume, progress)
        earlier_wall, segments = float(resume.report["wall_seconds"]), int(resume.report.get("segments", 1)) + 1
    start = len(rows)
    bar = tqdm(stream[start:], desc=f"{editor} stream", unit="edit", initial=start, total=len(stream))
    try:
        for i, ex in enumerate(bar, start=start):
            if adapter.right(adapter.predict([ex.input])[0], ex.target):
                rows.append({"i": i, "input": ex.input, "target": ex.target, "status": "fixed_along_the_way"})
                continue
            trained = (
                *(ex.train_equivalents if train_equivalents else ()),
                *(with_context(c, ex.input) for c in prefixes),
                *chat_copies_of(lb.tokenizer, adapter.text(ex.input), prefixes, chat_copies, offset=i),
            )
            rec = ed.edit(ex.input, ex.target, edit_id=str(i), train_equivalents=trained)
            right = adapter.right(adapter.predict([ex.input])[0], ex.target)
            para = _right(adapter, [type(ex)(q, ex.target) for q in ex.equivalents]) if ex.equivalents else []
            tf = adapter.token_accuracy([ex.input, *ex.equivalents], [ex.target] * (1 + len(ex.equivalents)))
            in_context = _in_context(adapter, ex, contexts_for(i, ex.contexts, data.context_pool))
            rows.append(
                {
                    "i": i,
                    "input": ex.input,
                    "target": ex.target,
                    "status": rec.status,
                    "sr": right,
                    "gr": (sum(para) / len(para)) if para else None,
                    "sr_tf": tf[0],
                    "gr_tf": metrics.mean_score(tf[1:]),
                    **in_context,
                    "seconds": round(rec.seconds, 4),
                    "steps": rec.steps,
                    "attempts": rec.attempts,
                    "equivalents_trained": rec.equivalents,
                    "saturation": rec.saturation,
                    "neurons": rec.neurons,
                    "gate": rec.gate,
                    "reasons": rec.reasons,
                    # why a retried edit ended as it did (each gated try), only where there were several
                    **({"tries": rec.tries} if len(rec.tries) > 1 else {}),
                    **({"subject_detector": rec.subject} if rec.subject is not None else {}),
                }
            )
            edited.append(ex)
            if not sequential:
                ed.reset()  # type: ignore[attr-defined]
            elif every and len(edited) % every == 0:
                kept = _right(adapter, edited)
                now = adapter.predict([held_inputs[j] for j in sample])
                curve.append(
                    {
                        "edits": len(edited),
                        "retention": sum(kept) / len(kept),
                        "locality": metrics.locality([held_before[j] for j in sample], now),
                    }
                )
            bar.set_postfix(_running(rows, curve, ed.neurons))
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: writing the partial report")
    # before the final passes: a second Ctrl-C keeps the edits
    if patches is not None and isinstance(ed, TPatcherEditor) and sequential:
        save_patches(patches, ed.patcher)
    if state is not None and hasattr(ed, "state") and sequential:
        write_state(state, replace(ed.state(), rows=len(rows)))
    done = [r for r in rows if "sr" in r]
    final_right = _right(adapter, edited) if sequential else []
    final_tf = adapter.token_accuracy([e.input for e in edited], [e.target for e in edited]) if sequential else []
    for r, ok, tf_end in zip(done, final_right, final_tf, strict=False):
        r["right_at_end"] = ok
        r["tf_at_end"] = tf_end
    held_after = adapter.predict(held_inputs, progress=True) if sequential else held_before
    nb_edited = sorted({n for ex in edited for n in ex.neighbours}) if sequential else []
    nb_after = adapter.predict(nb_edited, progress=True) if nb_edited else []
    secs = [r["seconds"] for r in done]
    overhead = _inference_overhead(adapter, ed, held_inputs[:16]) if sequential and held_inputs else None
    report: dict[str, Any] = {
        **settings,
        "edits": len(done),
        "stream": len(stream),
        "interrupted": interrupted,
        "train_equivalents_per_edit": (
            statistics.fmean(len(e.train_equivalents) for e in edited) if train_equivalents and edited else 0.0
        ),
        "fixed_along_the_way": sum(r["status"] == "fixed_along_the_way" for r in rows),
        "neurons": ed.neurons,
        "sr": metrics.success_rate([r["sr"] for r in done]),
        "gr": metrics.generalization_rate([r["gr"] for r in done]) if data.has_paraphrases else None,
        "er": metrics.edit_retention(final_right) if sequential else None,
        # teacher-forced beside them (metrics.token_accuracy), as published editors are scored
        "sr_tf": metrics.mean_score([r.get("sr_tf") for r in done]),
        "gr_tf": metrics.mean_score([r.get("gr_tf") for r in done]) if data.has_paraphrases else None,
        "er_tf": metrics.mean_score(final_tf) if sequential else None,
        # behind unrelated context (patching/eval/contexts.py)
        "cr": metrics.mean_score([r.get("cr") for r in done]),
        "cgr": metrics.mean_score([r.get("cgr") for r in done]),
        "cr_chat": metrics.mean_score([r.get("cr_chat") for r in done]),
        "train_r": metrics.relative_accuracy(train_before, _right(adapter, data.train_eval)) if sequential else None,
        "test_r": metrics.relative_accuracy(test_before, _right(adapter, data.test)) if sequential else None,
        "locality": metrics.locality(held_before, held_after) if sequential else None,
        # the edited cases' neighbourhood prompts (same relation, other subject) answered as before
        "locality_nb": metrics.locality([nb_before[n] for n in nb_edited], nb_after) if nb_edited else None,
        "sequential": sequential,
        "gate_rejected": sum(r["status"] == "rejected" for r in done),
        # editors without a gate (mend) report per edit what patchd's gate would have said
        "gate_would_reject": sum(r["gate"].get("would_pass") is False for r in done),
        "edit_seconds": {"median": statistics.median(secs) if secs else None, "p95": metrics.percentile(secs, 0.95)},
        # what the editor left in the model at the end, against the unedited base
        "parameters_added": getattr(ed, "parameters_added", None),
        "inference_overhead_b16": overhead,
        "wall_seconds": round(earlier_wall + time.perf_counter() - t_start, 1),
        "segments": segments,  # runs that made this stream (1 + times it was resumed)
        "sizes": {
            "heldout": len(held_inputs),
            "train_eval": len(data.train_eval),
            "test": len(data.test),
            "memory_inputs": len(data.memory),
            "neighbours": len(nb_edited),
        },
        "augment_prefixes": prefixes,
        "curve": curve,
        "editor_summary": ed.summary() if hasattr(ed, "summary") else None,
        "rows": rows,
    }
    return report


def _replay(
    ed: Editor,
    adapter: TaskAdapter,
    stream: list[Any],
    rows: list[dict[str, Any]],
    resume: Resume,
    progress: Callable[[str], None],
) -> None:
    """Re-apply the stopped run's accepted edits, in order, on the fresh editor (tpatcher), or load
    the editor's state (grace, wise)."""
    if resume.state is not None and hasattr(ed, "load_state"):
        ed.load_state(resume.state)
        progress(f"resumed after {len(rows)} mistakes: the {ed.name} state loaded ({ed.neurons} entries)")
        return
    if not isinstance(ed, TPatcherEditor):
        raise ResumeError("only tpatcher, grace and wise runs can be resumed")
    accepted = [r for r in rows if r.get("status") == "accepted"]
    saved = resume.saved
    missing = [r["i"] for r in accepted if str(r["i"]) not in saved.neurons]
    if missing:
        raise ResumeError(f"cannot resume: no neurons saved for accepted edits {missing[:5]}")
    differs = 0
    for r in tqdm(accepted, desc="replaying", unit="edit"):
        ex = stream[r["i"]]
        # the edit alone: only its own rows were gated, kept for retention and added to M
        edit_id = str(r["i"])
        enc = adapter.edit(ex.input, ex.target)
        verdict = ed.patcher.replay(enc, edit_id, saved.neurons[edit_id], saved.detectors.get(edit_id), saved.scale)
        differs += not verdict.passed
    progress(
        f"resumed after {len(rows)} mistakes: {len(accepted)} edits re-applied"
        + (f"; {differs} of them would not pass the gate again here (another machine?)" if differs else "")
    )
