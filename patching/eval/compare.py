"""Reports of `patchd evaluate` side by side on the stream they share: `evaluate --compare A B ...`.

Runs of one stream stopped at different points (a partial report, a slower lever) are compared on
their common prefix: the first K mistakes of the stream that every report edited, matched by their
index in the stream. SR, GR, cr, cgr and the teacher-forced scores are measured right after each
edit, so they are exact on any prefix. ER is the share of those K edits still right when the run
stopped (a longer run had more later edits to survive), and locality is each run's own final figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from patching.config import GateConfig, TrainConfig
from patching.eval import metrics

_SETTINGS = ("context_augment", "augment_source", "chat_copies", "site_depth", "train_equivalents", "dtype")
# config section as the daemon and --set name it -> the report field holding it
_CONFIGS = {"trainer": "train_config", "gate": "gate_config"}
COLUMNS = (
    "run", "edits", "SR", "GR", "cr", "cgr", "SR_tf", "GR_tf",
    "ER (of these, at its end)", "locality (its end)", "edit s median",
)  # fmt: skip


# how a run whose report lacks a setting ran: a report written before the setting existed lacks it,
# and its run had the setting's default (a new knob is off by default), except where a setting was
# added and later turned on by default; those name the value they had before they existed
ABSENT_MEANS: dict[str, dict[str, Any]] = {
    "train_config": {
        # added 2026-12-06 and turned on the same day: before it, no generation edit was ever banded
        "band_generation": False,
        # added off (2026-12-06, floor and locator 2026-12-06/07), on by default since 2026-12-07
        "subject_key": False,
        "subject_floor": False,
        "subject_locator": "memory",
    },
    "gate_config": {},
}
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "train_config": {**asdict(TrainConfig()), **ABSENT_MEANS["train_config"]},
    "gate_config": {**asdict(GateConfig()), **ABSENT_MEANS["gate_config"]},
}


def with_defaults(field: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A report's train_config or gate_config with the settings added since it was written filled
    in as its run had them (CONFIG_DEFAULTS); {} for a run without one (an editor other than tpatcher)."""
    return {**CONFIG_DEFAULTS[field], **config} if config else {}


def differing(reports: Sequence[dict[str, Any]]) -> list[str]:
    """The trainer and gate settings ("trainer.equivalent_steps") whose values differ among the
    reports that have them (tpatcher's; grace, wise and mend runs have none)."""
    out = []
    for section, field in _CONFIGS.items():
        configs = [with_defaults(field, r.get(field)) for r in reports if r.get(field)]
        for key in sorted(set().union(*configs)):
            if len({repr(c.get(key)) for c in configs}) > 1:
                out.append(f"{section}.{key}")
    return out


def label(report: dict[str, Any], settings: Sequence[str] = ()) -> str:
    """The editor and the settings that set this run apart, e.g. "tpatcher context_augment=10";
    `settings` adds those dotted trainer/gate settings (`differing`) with this report's values."""
    parts = [str(report.get("editor"))]
    parts += [f"{k}={report[k]}" for k in _SETTINGS if report.get(k) not in (None, False, 0)]
    for dotted in settings:
        section, key = dotted.split(".", 1)
        if report.get(_CONFIGS[section]):  # another editor has no such setting
            config = with_defaults(_CONFIGS[section], report[_CONFIGS[section]])
            parts.append(f"{key}={config.get(key)}")
    if not report.get("sequential", True):
        parts.append("single")
    return " ".join(parts)


def _edited(report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(r["i"]): r for r in report.get("rows", []) if "sr" in r}


def common_prefix(reports: Sequence[dict[str, Any]]) -> list[int]:
    """Stream indices edited by every report, up to the first index one of them lacks."""
    edited = [_edited(r) for r in reports]
    shared = sorted(set.intersection(*(set(e) for e in edited))) if edited else []
    last = min((max(e) for e in edited if e), default=-1)
    return [i for i in shared if i <= last]


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def table(reports: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the reports on their common prefix (module docstring)."""
    idx = common_prefix(reports)
    settings = differing(reports)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for rep in reports:
        rows = [_edited(rep)[i] for i in idx]
        at_end = [r["right_at_end"] for r in rows if "right_at_end" in r]
        secs = [float(r["seconds"]) for r in rows]
        cells = [
            label(rep, settings),
            f"{len(rows)} of {rep.get('edits')}",
            _fmt(metrics.success_rate([bool(r["sr"]) for r in rows])),
            _fmt(metrics.generalization_rate([r.get("gr") for r in rows])),
            _fmt(metrics.mean_score([r.get("cr") for r in rows])),
            _fmt(metrics.mean_score([r.get("cgr") for r in rows])),
            _fmt(metrics.mean_score([r.get("sr_tf") for r in rows])),
            _fmt(metrics.mean_score([r.get("gr_tf") for r in rows])),
            _fmt(metrics.edit_retention(at_end) if at_end else None),
            _fmt(rep.get("locality")),
            f"{statistics.median(secs):.1f}" if secs else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
