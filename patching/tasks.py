"""A prepared base and a task's splits turned into what the Patcher eats (Encoded batches).

Shared by `patchd bench edit` and `patchd evaluate`: memory and held-out sets are built
exactly the same way in both, and the same way the daemon builds them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from patching import encode
from patching.bases import LoadedBase
from patching.datasets import Example
from patching.encode import Encoded
from patching.engine import Patcher
from patching.qa import exact_match, greedy_answers, prompt_for

BATCH = 64  # inputs per frozen forward while building memory / held-out caches


@dataclass
class TaskAdapter:
    base: LoadedBase

    @property
    def generation(self) -> bool:
        return self.base.kind == "generation"

    def text(self, question: str) -> str:
        return prompt_for(question, self.base.prompt_format) if self.generation else question

    def label_id(self, label: str) -> int:
        assert self.base.labels is not None
        return self.base.labels.index(label)

    # ------------------------------------------------------------------ encoding
    def edit(self, inp: str, target: str) -> Encoded:
        """One edit: the input and its right answer (label name or answer text)."""
        if self.generation:
            return encode.generation(self.base.tokenizer, [self.text(inp)], [target])
        return encode.classification(self.base.tokenizer, [inp], [self.label_id(target)])

    def memory_batches(self, inputs: Sequence[str], progress: bool = True) -> Iterator[Encoded]:
        """Classification: position 0 of each input. Generation: every position of each prompt."""
        tok = self.base.tokenizer
        for i in tqdm(range(0, len(inputs), BATCH), desc="memory", unit="batch", disable=not progress):
            chunk = inputs[i : i + BATCH]
            if self.generation:
                yield encode.generation(tok, [self.text(x) for x in chunk], [""] * len(chunk), all_rows=True)
            else:
                yield encode.classification(tok, chunk)

    def heldout_batches(self, inputs: Sequence[str], labels: Sequence[str] | None = None,
                        progress: bool = True) -> Iterator[Encoded]:
        """Held-out rows: position 0 (classification), or the positions that produce the model's own
        greedy answer (generation: unchanged argmax there <=> unchanged greedy output)."""
        tok = self.base.tokenizer
        answers = self.predict(inputs, progress=progress) if self.generation else None
        for i in tqdm(range(0, len(inputs), BATCH), desc="held-out", unit="batch", disable=not progress):
            chunk = inputs[i : i + BATCH]
            if answers is not None:
                yield encode.generation(tok, [self.text(x) for x in chunk], answers[i : i + BATCH])
            else:
                ids = [self.label_id(x) for x in labels[i : i + BATCH]] if labels else None
                yield encode.classification(tok, chunk, ids)

    # ------------------------------------------------------------------ predicting
    @torch.no_grad()
    def predict(self, inputs: Sequence[str], progress: bool = False) -> list[str]:
        """The current model's outputs: label names, or greedy answers."""
        if self.generation:
            return greedy_answers(self.base.model, self.base.tokenizer, [self.text(x) for x in inputs],
                                  progress=progress)
        assert self.base.labels is not None
        out: list[str] = []
        for i in range(0, len(inputs), BATCH):
            enc = encode.classification(self.base.tokenizer, inputs[i : i + BATCH])
            logits = self.base.model(**enc.batch).logits
            out.extend(self.base.labels[j] for j in logits.argmax(-1).tolist())
        return out

    def right(self, predicted: str, target: str) -> bool:
        return exact_match(predicted, target) if self.generation else predicted == target

    def mistakes(self, examples: Sequence[Example], limit: int | None = None, progress: bool = True) -> list[Example]:
        """The examples the current model gets wrong, in order, up to `limit`."""
        found: list[Example] = []
        step = 256
        for i in range(0, len(examples), step):
            chunk = [e for e in examples[i : i + step] if e.target]
            preds = self.predict([e.input for e in chunk], progress=progress)
            found.extend(e for e, p in zip(chunk, preds, strict=True) if not self.right(p, e.target))
            if limit is not None and len(found) >= limit:
                return found[:limit]
        return found

    def patcher(self, patcher: Patcher, memory: Sequence[str], heldout: Sequence[str],
                progress: bool = True) -> Patcher:
        patcher.build_memory(self.memory_batches(memory, progress))
        patcher.build_heldout(self.heldout_batches(heldout, progress=progress))
        return patcher
