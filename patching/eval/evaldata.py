"""Evaluation data: a built-in task, or a folder in the generic JSON Lines format.

Generic format (one JSON object per line, UTF-8):

- `edits.jsonl` (required): `{"input": str, "target": str, "equivalents": [str, ...]}`;
  `equivalents` (paraphrases that must get the same target) are only measured (GR), never
  trained on; `train_equivalents` may be given for paraphrases a trainer may use; `contexts`
  (optional) are texts to ask the edit behind (cr, cgr: patching/eval/contexts.py), never
  trained on. An edit without them is asked behind texts held out of memory.jsonl.
  `neighbours` (optional): inputs of the same kind about something else, whose answers must not
  change (locality_nb, measured at the end of a sequential run).
- `heldout.jsonl`, `train_eval.jsonl`, `test.jsonl` (optional): `{"input": str, "target": str}`.
  heldout measures locality (target may be ""), train_eval TrainR, test TestR.
- `memory.jsonl` (optional): `{"input": str}` unrelated inputs for the activation memory; when
  missing, the memory is built from train_eval (or test) inputs. A folder with none of the three
  is refused: with an empty memory a neuron is trained against nothing it must stay silent on, and
  every edit fails (a run must never silently do nothing).

Every bad line is reported with its file and line number, and nothing runs on invalid data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patching.bases.datasets import Example, TaskSplits, load_task, text_key
from patching.eval.contexts import pool_from_memory

BUILTIN = ("fever", "zsre", "counterfact")


class DataError(ValueError):
    """Invalid evaluation data; the message lists every problem with file:line."""


@dataclass
class EvalData:
    name: str
    edits: list[Example]
    heldout: list[Example] = field(default_factory=list)
    train_eval: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    memory: list[Example] = field(default_factory=list)
    # unrelated texts to ask edits behind (cr / cgr), held out of the memory part: never in M
    context_pool: list[str] = field(default_factory=list)

    @property
    def has_paraphrases(self) -> bool:
        return any(e.equivalents for e in self.edits)

    @classmethod
    def from_splits(cls, s: TaskSplits, train_eval_size: int = 1000) -> EvalData:
        # TrainR is measured on a fixed subset of the training split (the paper's protocol)
        memory, pool = pool_from_memory(s.memory)
        return cls(s.name, s.edit, s.heldout, s.train[:train_eval_size], s.test, memory, pool)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _read_jsonl(path: Path, need_target: bool, errors: list[str]) -> list[Example]:
    out: list[Example] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(f"{path}: cannot read: {exc}")
        return out
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{where}: expected a JSON object")
            continue
        inp, target = obj.get("input"), obj.get("target", "")
        if not isinstance(inp, str) or not inp.strip():
            errors.append(f"{where}: 'input' must be a non-empty string")
            continue
        if not isinstance(target, str) or (need_target and not target.strip()):
            errors.append(f"{where}: 'target' must be a {'non-empty ' if need_target else ''}string")
            continue
        lists = [obj.get(k, []) for k in ("equivalents", "train_equivalents", "contexts", "neighbours")]
        if not all(_strings(v) for v in lists):
            errors.append(
                f"{where}: 'equivalents' / 'train_equivalents' / 'contexts' / 'neighbours' must be lists of strings"
            )
            continue
        eq, teq, ctx, near = (tuple(v) for v in lists)
        out.append(Example(inp, target, eq, teq, ctx, near))
    return out


def load_generic(folder: Path) -> EvalData:
    errors: list[str] = []
    edits_path = folder / "edits.jsonl"
    if not edits_path.is_file():
        raise DataError(f"{folder}: no edits.jsonl (see `patchd evaluate --help` for the format)")
    edits = _read_jsonl(edits_path, True, errors)
    parts: dict[str, list[Example]] = {}
    for name, need in (("heldout", False), ("train_eval", True), ("test", True), ("memory", False)):
        p = folder / f"{name}.jsonl"
        parts[name] = _read_jsonl(p, need, errors) if p.is_file() else []
    if errors:
        raise DataError(f"{len(errors)} problem(s) in {folder}:\n  " + "\n  ".join(errors[:50]))
    if not edits:
        raise DataError(f"{edits_path}: no edits")
    memory = parts["memory"] or parts["train_eval"] or parts["test"]
    if not memory:
        raise DataError(
            f"{folder}: no inputs for the activation memory M: add memory.jsonl with unrelated inputs, one "
            '{"input": ...} per line (about 1,000 or more, none of them an edit or held-out input), or a '
            "train_eval.jsonl / test.jsonl to build it from; with an empty M every edit fails"
        )
    trained = {text_key(t) for e in edits for t in (e.input, *e.train_equivalents)} | {
        text_key(m.input) for m in memory
    }
    clashes = [
        f"edits.jsonl: context {c!r} is also an edit, train equivalent or memory input"
        for e in edits
        for c in e.contexts
        if text_key(c) in trained
    ]
    if clashes:  # a context must be a text no editor trains on
        raise DataError(f"{len(clashes)} problem(s) in {folder}:\n  " + "\n  ".join(clashes[:50]))
    pool: list[str] = []
    if parts["memory"]:  # only memory.jsonl gives context texts: train_eval and test are measured
        memory, pool = pool_from_memory(memory)
    return EvalData(folder.name, edits, parts["heldout"], parts["train_eval"], parts["test"], memory, pool)


def load_eval_data(data: str, data_dir: Path | None = None, seed: int = 0) -> EvalData:
    """A built-in task name, or a folder in the generic format."""
    path = Path(data).expanduser()
    if data in BUILTIN and not path.is_dir():
        return EvalData.from_splits(load_task(data, data_dir, seed=seed))
    if path.is_dir():
        return load_generic(path)
    raise DataError(f"--data {data!r} is neither a built-in task ({', '.join(BUILTIN)}) nor a folder")
