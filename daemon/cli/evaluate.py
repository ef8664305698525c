"""`patchd evaluate`: the sequential-editing protocol with baselines, JSON report and plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from daemon.tools.interrupt import interruptible
from patching.augment import SOURCES
from patching.config import ACTIVATIONS, DTYPES, GateConfig, TrainConfig

FORMAT_HELP = """\
DATA is a built-in task (fever, zsre, counterfact; read from --data-dir, default ../shared/data)
or a folder in the generic JSON Lines format:
  edits.jsonl       {"input": ..., "target": ..., "equivalents": [...], "train_equivalents": [...]}   (required)
                    equivalents: measured (GR), never trained on; train_equivalents: trained on
                    with --train-equivalents (zsre: mined from other questions' templates)
  heldout.jsonl     {"input": ..., "target": ...}   locality
  train_eval.jsonl  {"input": ..., "target": ...}   TrainR
  test.jsonl        {"input": ..., "target": ...}   TestR
  memory.jsonl      {"input": ...}                  activation memory (default: train_eval inputs)
"""


def register(sub: Any, bench: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="sequential editing on real data: SR, GR, ER, TrainR, TestR, locality",
        description="Edit the mistakes of BASE on DATA one after another (no reset) with the chosen "
        "editor and report the paper's metrics.",
        epilog=FORMAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--base", help="fever-minilm, zsre-smollm2, zsre-smollm2-qa (prepared bases) or a local model directory"
    )
    p.add_argument("--data", help="built-in task name or generic-format folder")
    p.add_argument("--data-dir", type=Path, default=None, help="where the built-in tasks' files are")
    p.add_argument("--edits", type=int, default=None, help="edit at most N mistakes (default: all)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed (default: 0)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="the frozen model's weights; patch neurons stay float32 (default: auto = bfloat16 on CUDA, else float32)",
    )
    p.add_argument(
        "--editor",
        choices=["tpatcher", "ft-last", "ft-all", "mend", "grace", "wise"],
        default="tpatcher",
        help="editor to run (default: tpatcher; grace: a codebook at the patched FFN, patching/eval/grace.py; "
        "wise: a side memory of a mid-to-late FFN, causal LMs only, patching/eval/wise.py)",
    )
    p.add_argument(
        "--wise-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="wise: one of its settings for this run (patching/eval/wise.py WiseConfig, e.g. "
        "--wise-set shard_edits=100 --wise-set steps=30); repeatable",
    )
    p.add_argument(
        "--grace-eps",
        type=float,
        default=None,
        help="grace: the initial deferral radius, Euclidean in the FFN input's units (default: 1.0, the paper's)",
    )
    p.add_argument(
        "--mend-dir",
        type=Path,
        default=None,
        help="trained MEND editor (mend; default: the cache's mend/BASE, see `patchd mend train`)",
    )
    p.add_argument(
        "--single",
        action="store_true",
        help="single-edit run (T = 1): every edit on the unedited model (tpatcher, mend, grace, wise)",
    )
    p.add_argument(
        "--site-depth",
        type=float,
        default=None,
        metavar="F",
        help="tpatcher: add the neurons to the FFN at this depth of the stack (0 = first layer, 1 = last; "
        "e.g. 0.8) instead of the last FFN the daemon patches; each step runs the layers above it "
        "(patching/eval/deepsite.py; issue 21's lever 2). Not resumable",
    )
    p.add_argument("--activation", choices=ACTIVATIONS, default=None, help="patch activation (tpatcher)")
    p.add_argument("--augment-copies", type=int, default=None, help="perturbed copies of q per edit (tpatcher)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        dest="overrides",
        help="a trainer or gate setting for this run, as in the daemon's config "
        "(e.g. --set trainer.value_scale=2 --set gate.max_changed=1); repeatable",
    )
    p.add_argument(
        "--curve-points",
        type=int,
        default=20,
        metavar="N",
        help="retention/locality checkpoints along the stream for the plot (default: 20; 0 = none, "
        "the final numbers only: each checkpoint costs a prediction pass)",
    )
    p.add_argument(
        "--train-equivalents",
        action="store_true",
        help="editors also train on each edit's train_equivalents (paraphrases a producer could "
        "send with a correction; zsre: mined from other questions, docs/data.md); GR is still "
        "measured on the held-apart equivalents only",
    )
    p.add_argument(
        "--context-augment",
        type=int,
        default=0,
        metavar="N",
        help="editors also train on each edit behind N unrelated prefixes (--augment-source; never the "
        "texts cr / cgr are measured behind); default 0",
    )
    p.add_argument(
        "--augment-source",
        choices=SOURCES,
        default="memory",
        help="where --context-augment's prefixes come from: memory = the last N memory inputs (default), "
        "generated = a generator's own continuations of up to 10 seed words (a classifier: memory)",
    )
    p.add_argument(
        "--chat-copies",
        type=int,
        default=0,
        metavar="N",
        help="with --context-augment, on a generator with a chat template: each edit is also trained as N chat "
        "forms of its prompt (a training system prompt and an earlier exchange whose question is one of the "
        "prefixes; never the ones cr_chat is asked with); default 0",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the JSON report here (and beside it, so that --resume can go on from it, "
        "tpatcher: the edits' neurons, REPORT.patches.safetensors; grace, wise: the editor's state, "
        "REPORT.state.safetensors)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="REPORT",
        help="go on with the stream of a stopped run (Ctrl-C / kill): the same command line plus "
        "--resume with its report; its edits are re-applied (tpatcher) or its editor's state loaded "
        "(grace, wise), not trained again (default --out: REPORT)",
    )
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    p.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        default=None,
        metavar="REPORT",
        help="instead of running: print existing reports side by side as a table, on the stream's "
        "mistakes they all edited (patching/eval/compare.py), and plot them with --plot",
    )
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from patching.eval.evaldata import DataError, load_eval_data
    from patching.eval.plots import plot_reports

    if args.compare:
        from patching.eval.compare import table

        reports = []
        for path in args.compare:
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                print(f"error: --compare {path}: not a readable report ({exc})", file=sys.stderr)
                return 2
        print(table(reports))
        if args.plot:
            plot_reports(reports, args.plot)
            print(f"wrote {args.plot}")
        return 0
    if not args.base or not args.data:
        print("patchd evaluate needs --base and --data (or --compare)")
        return 2
    try:
        data = load_eval_data(args.data, args.data_dir, seed=args.seed)
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    from patching.eval.evaluate import run_evaluate

    try:
        train, gate = _patch_settings(args.overrides)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    train = replace(train, seed=args.seed)
    if args.activation:
        train = replace(train, activation=args.activation)
    if args.augment_copies is not None:
        train = replace(train, augment_copies=args.augment_copies)
    from patching.eval.editorstate import state_path
    from patching.eval.resume import Resume, ResumeError, patches_path

    resume = None
    if args.resume is not None:
        try:
            resume = Resume.read(args.resume)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}")
            return 2
        args.out = args.out or args.resume
    options = {}
    if args.editor == "mend":
        from patching.bases.load import cache_root

        options["mend_dir"] = args.mend_dir or cache_root() / "mend" / Path(args.base).name
    if args.editor == "grace" and args.grace_eps is not None:
        options["grace_eps"] = args.grace_eps
    if args.site_depth is not None:
        if args.editor != "tpatcher" or not 0.0 <= args.site_depth <= 1.0:
            print("error: --site-depth is a tpatcher setting within [0, 1]")
            return 2
        if args.resume is not None:
            print("error: --site-depth runs cannot be resumed (their neurons are not saved)")
            return 2
        options["site_depth"] = args.site_depth
    if args.wise_set:
        from patching.eval.wise import parse_settings

        try:
            options["wise"] = parse_settings(args.wise_set)
        except ValueError as exc:
            print(f"error: --wise-set: {exc}")
            return 2
    try:
        with interruptible():
            report = run_evaluate(
                args.base,
                data,
                editor=args.editor,
                edits=args.edits,
                seed=args.seed,
                train=train,
                gate=gate,
                sequential=not args.single,
                editor_options=options,
                curve_points=args.curve_points,
                train_equivalents=args.train_equivalents,
                context_augment=args.context_augment,
                augment_source=args.augment_source,
                chat_copies=args.chat_copies,
                resume=resume,
                patches=patches_path(args.out) if args.out else None,
                state=state_path(args.out) if args.out else None,
                dtype=args.dtype,
            )
    except ResumeError as exc:  # a stopped run that does not fit this command line
        print(f"error: {exc}")
        return 2
    except ValueError as exc:  # settings the base cannot run (--chat-copies without a chat template ...)
        print(f"error: {exc}")
        return 2
    except KeyboardInterrupt:  # a signal before the first edit (a stopped stream returns its partial report)
        print("interrupted before the stream began: no report written")
        return 130
    summary = {
        k: report[k]
        for k in (
            "editor",
            "base",
            "data",
            "sequential",
            "train_equivalents",
            "edits",
            "neurons",
            "sr",
            "gr",
            "er",
            "sr_tf",
            "gr_tf",
            "er_tf",
            "cr",
            "cgr",
            "cr_chat",
            "train_r",
            "test_r",
            "locality",
            "locality_nb",
            "gate_rejected",
            "gate_would_reject",
            "edit_seconds",
            "parameters_added",
            "inference_overhead_b16",
            "wall_seconds",
        )
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        plot_reports([report], args.plot)
        print(f"wrote {args.plot}")
    return 0


def _patch_settings(overrides: list[str]) -> tuple[TrainConfig, GateConfig]:
    """`trainer.KEY=VALUE` / `gate.KEY=VALUE` pairs read exactly like the daemon's PATCHD_* variables,
    so a value that the daemon would refuse is refused here with the same message."""
    from daemon.settings import ENV_PREFIX, load_settings

    env: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in ("trainer", "gate"):
            raise ValueError(f"--set {item!r}: expected trainer.KEY=VALUE or gate.KEY=VALUE")
        env[f"{ENV_PREFIX}{section.upper()}_{name.upper()}"] = value
    settings = load_settings(None, env)
    return settings.trainer, settings.gate
