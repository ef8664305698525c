"""Typed settings of the trainer and the gate. Every default carries its reason.

These dataclasses are the single definition of the algorithm's knobs; the daemon's
settings file maps its `[trainer]` and `[gate]` sections onto them field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal, get_args

Activation = Literal["relu", "gelu", "relu-cap"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)  # the one list: settings check, CLI choices
# the frozen model's dtype ([model] dtype, --dtype): "auto" is bfloat16 on CUDA and float32 elsewhere;
# the patch neurons are float32 whatever this is (patching/layer.py)
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
LOCATORS: tuple[str, ...] = ("memory", "surprise", "name")  # trainer.subject_locator
TrainerMode = Literal["cached", "reference"]


@dataclass(frozen=True)
class TrainConfig:
    # relu gives exact zeros on unrelated inputs, so thousands of neurons cannot leak (DESIGN §3);
    # relu-cap is that relu capped after training (see saturation): at equal locality it answers half
    # again as many paraphrases on zsRE's paper protocol (first 100 mistakes: GR 0.29 vs 0.19) and
    # leaves FEVER's every-mistake stream as it was (SR/ER 0.995, locality 1.00)
    activation: Activation = "relu-cap"
    # relu-cap only: a neuron is trained as a relu, then capped (min(relu(x), 1), key and value
    # rescaled) so that it gives its full output, the edit's own, from 1/saturation of the edit's
    # pre-activation on: a paraphrase that fires more weakly than the edit gets the edit's output.
    # When the capped neuron fails the gate, the same neuron capped at 1 (the relu's output on the
    # edit, never more elsewhere) is tried before a retry. 1 = no boost.
    saturation: float = 3.0
    # relu-cap only: when every attempt failed the gate because the neurons fired where they must
    # not (a held-out input or an earlier edit changed), the last attempt's neurons are tried once
    # more as a band: full output only within +-band of the edit's own pre-activation, zero below
    # (1 - 2 band) and above (1 + 2 band) of it (patching/saturation.py). A single relu fires on a
    # half-space, so an input that projects BEYOND the edit on its key (FEVER: a longer paraphrase
    # of the claim, at 1.1-3.3x the edit's pre-activation) can never be left out by a threshold;
    # a band leaves it out with one more neuron. 0 = off.
    band: float = 0.05
    # the band on a generator too: each neuron's band spans its pre-activations on the edit's answer
    # rows (a generation neuron fires on several at different strengths), and the banded edit must
    # still generate its target. Of the 22 edits a 1,096-edit CounterFact stream on zsre-smollm2
    # refused, each made again alone: 9 pass the regular attempts, 11 more pass only as a band, 2
    # stay refused (docs/results/scale-20/probe-band-generation.json).
    band_generation: bool = True
    # Adam learning rate of the reference implementation
    lr: float = 1e-2
    # hard cap; the stop rule usually ends training after tens of steps
    max_steps: int = 500
    # steps between two checks of the stop and stall rules; each check copies a few numbers to the
    # host (a sync on a GPU); 1 checks every step (a CPU pays nothing for it)
    check_every: int = 1
    # benchmarks: run exactly max_steps steps with no check before the last (fixed work per edit)
    fixed_steps: bool = False
    # k_a: the activation loss averages the top-k of exp(margin_a - a) over edit positions
    act_topk: int = 5
    # pre-activation the edit should reach (the init puts it at exactly 1)
    act_margin: float = 1.0
    # k: memory terms average the top-k memory rows (reference: 1000)
    mem_topk: int = 1000
    # beta: memory pre-activations are pushed below this (reference: -3)
    mem_margin: float = -3.0
    # gamma: the edit's activation must beat every memory row by this much (reference: 3)
    rel_margin: float = 3.0
    # c_m: weight of both memory terms (reference: 5 for classification, 10 for generation);
    # None = pick by task kind
    mem_weight: float | None = None
    # stop rule: every memory pre-activation below this (0 = relu exactly silent on M)
    stop_mem_margin: float = 0.0
    # stop rule: edit activation minus the largest memory activation at least this
    stop_rel_margin: float = 0.5
    # stop rule: every trained row's target logit at least this far above the runner-up (edit and
    # train equivalents); 0 = the argmax right, as the paper's rule. 2.0 ran most zsRE edits to
    # max_steps (5x the edit time) for no gain behind context (docs/results/levers-21.md)
    stop_logit_margin: float = 0.0
    # generation: one neuron per wrong target token, at most this many. 10, not the reference's 5:
    # on zsRE's first 99 with context and chat copies, an answer of more rows than neurons lost its
    # copies at equivalent_steps; 10 kept all of them in 91 edits against 76, cr 0.87 against 0.84,
    # GR 0.77 against 0.75, with 22 % fewer steps (docs/results/levers-21.md, "Ten neurons")
    max_neurons: int = 10
    # "margin": key placed half-way between the edit and its closest memory row, value along the
    # loss's descent direction (usually zero steps); "reference": q/|q|^2 and a random value
    # "fisher": the same with the key whitened by the memory covariance (larger margins, paraphrases fire)
    init: Literal["fisher", "margin", "reference"] = "fisher"
    # what a margin / fisher key starts from: "edit", its row alone; "copies", the centroid of the
    # edit's row and its equivalents' (context copies, chat copies, train equivalents), +1 at the
    # weakest of them. An edit-row key fired at the start on 0.07-0.71 of its 13 copies for the
    # zsRE edits that lost them all, and training widened it until held-out questions of the same
    # template fired too; the centroid key fires on all of them at the start. In the stream it lost
    # (first 100 zsRE mistakes, chat copies: cr 0.78 -> 0.65, GR 0.75 -> 0.71): placed at the weakest
    # copy it starts wide, and the gate refused it for locality three times as often
    # (docs/results/levers-21.md, "The key's start")
    init_from: Literal["edit", "copies"] = "edit"
    # the initial value is this multiple of the shortest one that makes the edit right: headroom
    # for paraphrases, which activate the neuron less than the edit itself
    value_scale: float = 1.0
    # where the firing threshold sits between the closest memory row (0) and the edit (1); None = by
    # task kind: 0.5 for classification, 0.25 for generation, where a paraphrased question reaches only
    # about half the edit's pre-activation (zsRE/SmolLM2, 30 independent edits: GR 0.12 at 0.5, 0.33 at
    # 0.25 with 0.97 passing the strict gate, 0.33 at 0.1 with only 0.90 passing)
    init_threshold: float | None = None
    # std of the initial value vector (reference init), relative to the residual scale; small keeps the
    # neuron from moving the output before its key is trained
    value_init_std: float = 0.1
    # perturbed copies of the edit's q (dropout on q) trained alongside the clean one;
    # the cached stand-in for the reference's dropout-on-8-copies, which buys generality
    augment_copies: int = 0
    augment_dropout: float = 0.1
    # train equivalents (paraphrases sent with an edit): every this many steps, those not yet right
    # are dropped and the rest train on, so a paraphrase that cannot be fitted within the memory
    # margins never costs max_steps per try, nor takes the others' help away (0 = drop all at once).
    # 300, not 100: a generator's context prefixes need the time; at 100 half of zsRE's edits lost
    # some or all of theirs, and on the first 100 mistakes 300 gave GR 0.58 -> 0.69, cr 0.60 -> 0.71
    # for 112 training steps per edit on average instead of 81 (docs/results/levers-21.md)
    equivalent_steps: int = 300
    # generation: while a wrong answer token has no neuron anchored at it (a long answer whose wrong
    # tokens outnumber max_neurons), an attempt ends (unsuccessful) once this many steps pass without
    # fewer wrong tokens, so the retry that anchors more rows comes without max_steps first; 0 = off
    stall_steps: int = 100
    # LM heads: the training loop's logits through the factored tail (patching/fasttail.py), which
    # costs one [neurons, vocab] product per step instead of one [rows, vocab]; false = plain tail
    fast_tail: bool = True
    # hard-negative mining: recompute M @ k in full every this many steps and train on
    # the current top rows in between (0 = full product every step)
    mining_interval: int = 0
    mining_rows: int = 4096
    # reference mode only: its fixed schedule (at least 100 steps, checks every 25)
    reference_min_steps: int = 100
    reference_check_every: int = 25
    mode: TrainerMode = "cached"
    seed: int = 0
    # generation: a key that also reads the subject (patching/subject.py): each edit's neurons add
    # c * (running max of a detector of its subject at layer subject_layer x depth), so a paraphrase
    # or a context that names the subject opens them and another subject's fact does not. None (the
    # default): on for a decoder-only generator trained cached whose subject layer (int(subject_layer
    # x layers)) lies below the patched one (engine.resolved_config), off for any other model. In the
    # stream on zsre-smollm2 (levers-21.md, "To the subject's last token") it holds the fix behind
    # context and in the chat template far more often at no loss in GR. Patch files, engine
    # snapshots and versions (patchd-checkpoint/3) carry the detectors.
    subject_key: bool | None = None
    subject_layer: float = 0.5
    # with subject_key: the key starts as the plain one (the subject term at 0, whitening_apart) and
    # each edit's own rows are also trained with the term at its floor, so that the term adds to a
    # key that already fires on the edit and never replaces it (engine.with_floor_copy)
    subject_floor: bool = True
    # with subject_key: how the detector's positive token is found (subject.locate_token). "memory":
    # the prompt token least like the memory texts without it; "surprise": the token the base least
    # expected (-log p given the tokens before it), a name's first piece; "name": from that token to
    # the last of its name (subject.end_of_name), where ROME finds the entity. All only among tokens
    # in at most 0.5 % of the memory's texts
    subject_locator: str = "name"

    def __post_init__(self) -> None:
        _check_positive(self, "lr", "max_steps", "act_topk", "mem_topk", "max_neurons", "check_every")
        if self.activation not in ACTIVATIONS:
            names = ", ".join(repr(a) for a in ACTIVATIONS)
            raise ValueError(f"trainer.activation must be one of {names}, got {self.activation!r}")
        if not self.stop_logit_margin >= 0.0:
            raise ValueError(f"trainer.stop_logit_margin must be >= 0, got {self.stop_logit_margin!r}")
        if not self.saturation >= 1.0:
            raise ValueError(f"trainer.saturation must be >= 1, got {self.saturation!r}")
        if not 0.0 <= self.band < 0.5:
            raise ValueError(f"trainer.band must be in [0, 0.5), got {self.band!r}")
        if self.init not in ("fisher", "margin", "reference"):
            raise ValueError(f"trainer.init must be 'fisher', 'margin' or 'reference', got {self.init!r}")
        if self.init_from not in ("edit", "copies"):
            raise ValueError(f"trainer.init_from must be 'edit' or 'copies', got {self.init_from!r}")
        if self.init_threshold is not None and not 0.0 < self.init_threshold < 1.0:
            raise ValueError("trainer.init_threshold must be in (0, 1)")
        if not 0.0 <= self.subject_layer < 1.0:
            raise ValueError(f"trainer.subject_layer must be in [0, 1), got {self.subject_layer!r}")
        if self.subject_locator not in LOCATORS:
            names = ", ".join(repr(a) for a in LOCATORS)
            raise ValueError(f"trainer.subject_locator must be one of {names}, got {self.subject_locator!r}")
        if self.subject_key and self.mode != "cached":
            raise ValueError("trainer.subject_key needs trainer.mode = 'cached'")
        if self.mode not in ("cached", "reference"):
            raise ValueError(f"trainer.mode must be 'cached' or 'reference', got {self.mode!r}")
        if not 0.0 <= self.augment_dropout < 1.0:
            raise ValueError("trainer.augment_dropout must be in [0, 1)")
        if min(self.augment_copies, self.mining_interval, self.equivalent_steps, self.stall_steps) < 0:
            raise ValueError(
                "trainer.augment_copies, trainer.mining_interval, trainer.equivalent_steps and "
                "trainer.stall_steps must be >= 0"
            )

    def for_task(self, generation: bool) -> TrainConfig:
        """The config with every by-task-kind default (None) filled in."""
        if self.init_threshold is not None:
            return self
        return replace(self, init_threshold=0.25 if generation else 0.5)

    def memory_weight(self, generation: bool) -> float:
        if self.mem_weight is not None:
            return self.mem_weight
        return 10.0 if generation else 5.0


@dataclass(frozen=True)
class GateConfig:
    # strict default: a new neuron may not change a single held-out prediction
    max_changed: int = 0
    # "changed" counts every flip; "regressed" counts only right->wrong (needs labels)
    policy: Literal["changed", "regressed"] = "changed"
    # a failed gate is retried this many times, each with a stronger memory weight
    retries: int = 2
    # multiplier of the memory weight and margins per retry
    retry_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.max_changed < 0 or self.retries < 0:
            raise ValueError("gate.max_changed and gate.retries must be >= 0")
        if self.policy not in ("changed", "regressed"):
            raise ValueError(f"gate.policy must be 'changed' or 'regressed', got {self.policy!r}")
        if self.retry_factor < 1.0:
            raise ValueError("gate.retry_factor must be >= 1")


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"trainer.{name} must be > 0, got {getattr(obj, name)!r}")


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]
