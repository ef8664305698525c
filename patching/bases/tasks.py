"""A prepared base and a task's splits turned into what the Patcher eats (Encoded batches).

Shared by `patchd bench edit` and `patchd evaluate`: memory and held-out sets are built
exactly the same way in both, and the same way the daemon builds them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from patching import encode
from patching import gate as gating
from patching.bases.datasets import Example
from patching.bases.load import LoadedBase, cache_root
from patching.bases.qa import exact_match, greedy_answers, greedy_ids, prompt_for
from patching.encode import Encoded, ModelInput
from patching.engine import Patcher
from patching.loading import base_identity
from patching.prompt import Prompt

BATCH = 64  # inputs per frozen forward while building memory / held-out caches


@dataclass
class TaskAdapter:
    base: LoadedBase

    @property
    def generation(self) -> bool:
        return self.base.kind == "generation"

    @property
    def seq2seq(self) -> bool:
        """An encoder-decoder generator (bart, t5): the patched stack is the decoder."""
        return self.generation and bool(getattr(self.base.model.config, "is_encoder_decoder", False))

    @property
    def decoder_start_id(self) -> int | None:
        start = getattr(self.base.model.config, "decoder_start_token_id", None)
        return int(start) if self.seq2seq and start is not None else None

    def text(self, question: ModelInput) -> str:
        """A generator's prompt for a question (generators read one text, never a pair)."""
        if not isinstance(question, str):
            raise ValueError("a text pair cannot be asked of a generator: send the question as one text")
        if not self.generation or isinstance(question, Prompt):  # a chat form is already a prompt
            return question
        assert self.base.prompt_format is not None  # load_base gives every generator one
        return prompt_for(question, self.base.prompt_format)

    def label_id(self, label: str) -> int:
        assert self.base.labels is not None
        return self.base.labels.index(label)

    # ------------------------------------------------------------------ encoding
    def edit(self, inp: ModelInput, target: str, train_equivalents: Sequence[ModelInput] = ()) -> Encoded:
        """One edit: the input and its right answer (label name or answer text); the edit is
        example 0, its train equivalents (same target) follow as examples 1.. (Patcher.propose)."""
        inputs = [inp, *train_equivalents]
        if self.generation:
            return encode.generation(
                self.base.tokenizer,
                [self.text(x) for x in inputs],
                [target] * len(inputs),
                seq2seq=self.seq2seq,
                decoder_start_id=self.decoder_start_id,
                names=True,
            )
        return encode.classification(self.base.tokenizer, inputs, [self.label_id(target)] * len(inputs))

    def memory_batches(self, inputs: Sequence[ModelInput], progress: bool = True) -> Iterator[Encoded]:
        """Classification: position 0 of each input. Generation: every position of each prompt; for an
        encoder-decoder, whose patched decoder sees no prompt, every position of its own greedy answer."""
        tok = self.base.tokenizer
        for i in tqdm(range(0, len(inputs), BATCH), desc="memory", unit="batch", disable=not progress):
            chunk = inputs[i : i + BATCH]
            if self.seq2seq:
                yield self._answered(chunk, all_rows=True)
            elif self.generation:
                yield encode.generation(tok, [self.text(x) for x in chunk], [""] * len(chunk), all_rows=True)
            else:
                yield encode.classification(tok, chunk)

    def heldout_batches(
        self,
        inputs: Sequence[ModelInput],
        labels: Sequence[str] | None = None,
        progress: bool = True,
        base: bool = False,
    ) -> Iterator[Encoded]:
        """Held-out rows: position 0 (classification), or the positions that produce the model's own
        greedy answer (generation: unchanged argmax there <=> unchanged greedy output). `base`: the
        model is the unpatched base (its answers may come from the disk cache, base_answer_ids)."""
        tok = self.base.tokenizer
        for i in tqdm(range(0, len(inputs), BATCH), desc="held-out", unit="batch", disable=not progress):
            chunk = inputs[i : i + BATCH]
            if self.generation:
                yield self._answered(chunk, base=base)
            else:
                ids = [self.label_id(x) for x in labels[i : i + BATCH]] if labels else None
                yield encode.classification(tok, chunk, ids)

    def _answered(self, inputs: Sequence[ModelInput], all_rows: bool = False, base: bool = False) -> Encoded:
        """The prompts teacher-forced on the model's own greedy answers (generation); `base`: the
        model is the unpatched base, whose answers may come from the disk cache."""
        tok = self.base.tokenizer
        prompts = [self.text(x) for x in inputs]
        gen = self.base_answer_ids(prompts) if base else greedy_ids(self.base.model, tok, prompts)
        p_ids = [torch.tensor(tok(p)["input_ids"], dtype=torch.long) for p in prompts]
        return encode.generation_ids(
            p_ids,
            [torch.tensor(g, dtype=torch.long) for g in gen],
            seq2seq=self.seq2seq,
            pad_id=int(tok.pad_token_id),
            decoder_start_id=self.decoder_start_id,
            all_rows=all_rows,
        )

    # ------------------------------------------------------------------ predicting
    @torch.no_grad()
    def predict(self, inputs: Sequence[ModelInput], progress: bool = False) -> list[str]:
        """The current model's outputs: label names, or greedy answers."""
        if self.generation:
            return greedy_answers(
                self.base.model, self.base.tokenizer, [self.text(x) for x in inputs], progress=progress
            )
        assert self.base.labels is not None
        out: list[str] = []
        for i in range(0, len(inputs), BATCH):
            enc = encode.classification(self.base.tokenizer, inputs[i : i + BATCH])
            logits = self.base.model(**enc.batch).logits
            out.extend(self.base.labels[j] for j in logits.argmax(-1).tolist())
        return out

    @torch.no_grad()
    def token_accuracy(self, inputs: Sequence[ModelInput], targets: Sequence[str]) -> list[float | None]:
        """Teacher-forced scores of the current model (eval/metrics.token_accuracy): per input, the
        share of its target's tokens (" " + answer, no stop token) that are the argmax given the
        prompt and the earlier answer tokens; a classifier scores 1.0 or 0.0 on its label."""
        from patching.eval import metrics  # evaluation code: the daemon never calls this

        if not self.generation:
            return [float(self.right(p, t)) for p, t in zip(self.predict(inputs), targets, strict=True)]
        out: list[float | None] = []
        for i in range(0, len(inputs), BATCH):
            chunk = inputs[i : i + BATCH]
            enc = encode.generation(
                self.base.tokenizer,
                [self.text(x) for x in chunk],
                list(targets[i : i + BATCH]),
                seq2seq=self.seq2seq,
                decoder_start_id=self.decoder_start_id,
                stop="",
            )
            logits = self.base.model(**enc.batch).logits
            out.extend(metrics.token_accuracy(logits, enc.rows_b, enc.rows_t, enc.targets, len(chunk)))
        return out

    @torch.no_grad()
    def predict_prompts(self, prompts: Sequence[str]) -> list[str]:
        """A generator's greedy answers to finished prompts (a chat template already applied)."""
        if not self.generation:
            raise ValueError("predict_prompts is for generators")
        return greedy_answers(self.base.model, self.base.tokenizer, list(prompts))

    def serving_batch(self, inputs: Sequence[ModelInput]) -> dict[str, Any]:
        """The forward kwargs a serving call sends for `inputs`: a classifier's batch, or a causal
        LM's prefill as generate() sends it (left-padded, the last position's logits only)."""
        tok = self.base.tokenizer
        if not self.generation:
            return dict(encode.classification(tok, inputs).batch)
        side, tok.padding_side = tok.padding_side, "left"
        try:
            batch = dict(tok([self.text(x) for x in inputs], return_tensors="pt", padding=True))
        finally:
            tok.padding_side = side
        return {**batch, "logits_to_keep": 1}

    def base_predict(self, inputs: Sequence[str], progress: bool = False) -> list[str]:
        """`predict` for the UNPATCHED base only: greedy answers are cached on disk per base, prompt
        format and input list (a zsRE edit or held-out set costs minutes of decoding on a CPU, and
        every evaluate run starts with them). Classification outputs are cheap and not cached."""
        path = self._answers_path(inputs) if self.generation else None
        answers = _json_cached(path, len(inputs), lambda: self.predict(inputs, progress=progress))
        return [str(a) for a in answers]

    def base_answer_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """The UNPATCHED base's greedy continuation ids of each prompt (qa.greedy_ids), cached on
        disk as `base_predict` caches its answers: a held-out set teacher-forced on them is built
        again by every editor that gates at its own layer (patching/eval/deepsite.py)."""
        path = self._keyed_path("answer-ids", ".json", _joined(prompts))
        ids = _json_cached(path, len(prompts), lambda: greedy_ids(self.base.model, self.base.tokenizer, prompts))
        return [[int(t) for t in row] for row in ids]

    def _answers_path(self, inputs: Sequence[ModelInput]) -> Path | None:
        return self._keyed_path("answers", ".json", self.base.prompt_format or "", _joined(inputs))

    def _keyed_path(self, folder: str, suffix: str, *parts: str) -> Path | None:
        """A cache file under cache_root()/folder named by this base's identity and `parts`;
        None when the base directory has no identity (no weight files to hash)."""
        try:
            identity = base_identity(self.base.directory)
        except (OSError, ValueError):
            return None
        h = hashlib.sha256()
        # a bfloat16 model computes other numbers from the same weights (float32 keeps its old keys)
        dtype = str(next(self.base.model.parameters()).dtype).removeprefix("torch.")
        for part in (identity, *parts, *((dtype,) if dtype != "float32" else ())):
            h.update(part.encode() + b"\x02")
        return cache_root() / folder / f"{self.base.name}-{h.hexdigest()[:24]}{suffix}"

    def right(self, predicted: str, target: str) -> bool:
        return exact_match(predicted, target) if self.generation else predicted == target

    def mistakes(
        self, examples: Sequence[Example], limit: int | None = None, progress: bool = True, base: bool = False
    ) -> list[Example]:
        """The examples the current model gets wrong, in order, up to `limit`.
        `base=True`: the model is the unpatched base, so its answers may come from the disk cache."""
        found: list[Example] = []
        step = 256
        predict = self.base_predict if base else self.predict
        for i in range(0, len(examples), step):
            chunk = [e for e in examples[i : i + step] if e.target]
            preds = predict([e.input for e in chunk], progress=progress)
            found.extend(e for e, p in zip(chunk, preds, strict=True) if not self.right(p, e.target))
            if limit is not None and len(found) >= limit:
                return found[:limit]
        return found

    def patcher(
        self,
        patcher: Patcher,
        memory: Sequence[ModelInput],
        heldout: Sequence[ModelInput],
        progress: bool = True,
        cache: bool = True,
    ) -> Patcher:
        """Build M and the held-out cache, reusing tensors cached on disk for this exact base,
        layer and input lists (a zsRE held-out set costs minutes of greedy decoding). With
        trainer.subject_key the file also holds layer L_s's sequences behind those rows
        (Patcher.subject_base, as "subject.SPLIT.NAME"), keyed by L_s as well."""
        path = self._cache_path(patcher, memory, heldout) if cache else None
        if path is not None and path.is_file():
            tensors = load_file(str(path), device=str(patcher.memory.device))
            subject = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("subject.")]}
            if patcher.subject is not None:
                parts: dict[str, dict[str, torch.Tensor]] = {}
                for key, value in subject.items():
                    _, split, name = key.split(".")
                    parts.setdefault(split, {})[name] = value
                patcher.load_subject_base(parts)  # before M's rows: add_memory checks they match
            patcher.add_memory(tensors.pop("memory"))
            patcher.heldout = gating.HeldoutTensors(**{k[len("heldout.") :]: v for k, v in tensors.items()})
            return patcher
        patcher.build_memory(self.memory_batches(memory, progress))
        patcher.build_heldout(self.heldout_batches(heldout, progress=progress))
        if path is not None and patcher.heldout is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {"memory": patcher.memory.view().contiguous()}
            tensors.update({f"heldout.{k}": v.contiguous() for k, v in vars(patcher.heldout).items() if v is not None})
            if patcher.subject is not None:
                for split, named in patcher.subject_base().items():
                    tensors.update({f"subject.{split}.{k}": v.contiguous() for k, v in named.items()})
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(tensors, str(tmp))
            os.replace(tmp, path)  # never a half-written cache file
        return patcher

    def _cache_path(self, patcher: Patcher, memory: Sequence[ModelInput], heldout: Sequence[ModelInput]) -> Path | None:
        if patcher.wrapper.n:
            return None  # the cache holds the unpatched model's tensors only
        # layer L_s's sequences are in the file too: their own key per L_s (the plain key's name unchanged)
        subject = () if patcher.subject is None else (f"subject{patcher.subject.site.layer_index}",)
        return self._keyed_path(
            "activations",
            ".safetensors",
            patcher.site.spec.layers,
            str(patcher.site.layer_index),
            *subject,
            self.base.prompt_format or "",
            _joined(memory),
            "\x01",
            _joined(heldout),
        )


def _json_cached(path: Path | None, n: int, compute: Callable[[], list[Any]]) -> list[Any]:
    """The list of n items in the JSON file `path`, else compute() written there (atomically)."""
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        if isinstance(cached, list) and len(cached) == n:
            return cached
    items = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(items))
        os.replace(tmp, path)  # never a half-written cache file
    return items


def _joined(inputs: Sequence[ModelInput]) -> str:
    """Inputs as one string for a cache key (a text pair's two texts joined by \x03)."""
    return "\x00".join(x if isinstance(x, str) else f"{x[0]}\x03{x[1]}" for x in inputs)
