"""Train the neurons of one edit on cached tensors (the fast path of DESIGN §3).

One frozen forward of the current patched model gave, at the R positions that matter for the
edit, the FFN input q, the FFN output and the residual ([R, d] each). A training step then only
runs the new neurons on q, `tail` (residual + norm + head, see arch.tail_logits) and one product
of the memory M [N, d] with the keys. The model itself is never run here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from patching import init, losses
from patching.config import TrainConfig
from patching.fasttail import LinearTail
from patching.layer import activate

Tail = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ffn_out [R, d], residual [R, d]) -> logits


@dataclass
class EditTensors:
    """The cached edit: R rows (positions) of the patched layer."""

    q: torch.Tensor  # [R, d] FFN input
    ffn: torch.Tensor  # [R, d] FFN output of the current model
    residual: torch.Tensor  # [R, d]
    targets: torch.Tensor  # [R] target label / token ids
    group: torch.Tensor | None = None  # [R] example index of each row (for sets of several examples)

    @property
    def rows(self) -> int:
        return int(self.q.shape[0])


@dataclass
class Neurons:
    keys: torch.Tensor  # [n, d]
    biases: torch.Tensor  # [n]
    values: torch.Tensor  # [n, d]

    @property
    def n(self) -> int:
        return int(self.keys.shape[0])


@dataclass
class TrainResult:
    neurons: Neurons
    success: bool  # the stop rule was met (edit right, memory within margins)
    steps: int
    seconds: float
    edit_activation: float  # min pre-activation of the neurons at their anchors
    memory_max: float  # max pre-activation over the whole memory
    losses: dict[str, float] = field(default_factory=dict)
    equivalents: int = 0  # train equivalents still trained on at the end (the rest were dropped)


@dataclass(frozen=True)
class Objective:
    """Loss weights and margins for one training run (the retry logic strengthens them)."""

    act_margin: float
    mem_margin: float
    rel_margin: float
    mem_weight: float
    stop_mem_margin: float
    stop_rel_margin: float

    @classmethod
    def from_config(cls, cfg: TrainConfig, generation: bool, strength: float = 1.0) -> Objective:
        # a retry multiplies the memory weight and pushes the stop margins further from the edge
        return cls(
            act_margin=cfg.act_margin,
            mem_margin=cfg.mem_margin,
            rel_margin=cfg.rel_margin,
            mem_weight=cfg.memory_weight(generation) * strength,
            stop_mem_margin=cfg.stop_mem_margin - (strength - 1.0) * 0.5,
            stop_rel_margin=cfg.stop_rel_margin * strength,
        )


def init_neurons(
    edit: EditTensors,
    anchors: torch.Tensor,
    memory: torch.Tensor,
    tail: Tail,
    cfg: TrainConfig,
    gen: torch.Generator,
    activation: str,
    whiten: tuple[torch.Tensor, torch.Tensor] | None = None,
    extra: EditTensors | None = None,
) -> Neurons:
    """Starting weights of the neurons anchored at edit rows `anchors` (see patching/init.py).

    Keys start from the edit's rows alone, or with cfg.init_from = "copies" from the rows of the
    edit and of its K equivalents in `extra` (K*R rows in the edit's row order, as train_cached
    takes them). Neither paid: with train equivalents GR 0.475 vs 0.45 (zsRE, 40 sequential edits),
    with context and chat copies cr 0.65 vs 0.78 (first 100 zsRE mistakes; TrainConfig.init_from)."""
    q = edit.q[anchors]  # [n, d]
    rows = None
    if cfg.init_from == "copies" and extra is not None and extra.rows >= edit.rows:
        R, K = edit.rows, extra.rows // edit.rows
        copies = extra.q[: K * R].reshape(K, R, -1)[:, anchors]  # [K, n, d]
        rows = torch.cat([q[None], copies])  # [1 + K, n, d]
    if cfg.init == "reference":
        keys, biases = init.reference_keys(q)
        values = init.random_values(q.shape, edit.ffn, cfg, gen)
    else:
        # the Patcher fills in the by-task default; a bare call gets the classification one
        threshold = cfg.for_task(generation=False).init_threshold
        assert threshold is not None
        keys, biases = init.margin_keys(q, memory, threshold, whiten if cfg.init == "fisher" else None, rows)
        values = init.init_values(
            edit.q, edit.ffn, edit.residual, edit.targets, anchors, keys, biases, tail, activation, cfg.value_scale
        )
    return Neurons(keys.clone(), biases.clone(), values.clone())


def augmented_q(q: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """[R, d] -> [(1 + copies) * R, d]: the clean rows first, then dropout-perturbed copies."""
    if cfg.augment_copies == 0:
        return q
    copies = q.repeat(cfg.augment_copies, 1)
    keep = torch.rand(copies.shape, generator=gen, dtype=torch.float32).to(q) >= cfg.augment_dropout
    return torch.cat([q, copies * keep / (1.0 - cfg.augment_dropout)])


def logit_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [R, V], targets [R] -> [R]: the target's logit minus the largest other logit
    (> 0 exactly where the argmax is the target)."""
    top2 = logits.topk(2, dim=-1)  # [R, 2]: the best and the runner-up
    target = logits.gather(-1, targets[:, None]).squeeze(-1)
    best_other = torch.where(top2.indices[:, 0] == targets, top2.values[:, 1], top2.values[:, 0])
    return target - best_other


def stop_met(edit_ok: bool, a_min: float, m_max: float, obj: Objective) -> bool:
    """The stop rule: the edit right, memory silent, and the edit's weakest anchor well above it."""
    return edit_ok and m_max < obj.stop_mem_margin and a_min - m_max >= obj.stop_rel_margin


def total_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    a_rows: torch.Tensor,
    a_edit: torch.Tensor,
    m: torch.Tensor,
    obj: Objective,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """l_e + l_a + c_m (l_abs + l_rel). a_rows [C, n] activations at each neuron's anchor (all copies).
    The parts stay tensors (detached): read them once after the loop (losses_of), not every step."""
    le = losses.edit_loss(logits, targets)
    la = losses.activation_loss(a_rows, obj.act_margin, cfg.act_topk)
    lm_abs = losses.memory_abs_loss(m, obj.mem_margin, cfg.mem_topk)
    lm_rel = losses.memory_rel_loss(m, a_edit, obj.rel_margin, cfg.mem_topk)
    total = le + la + obj.mem_weight * (lm_abs + lm_rel)
    parts = {"edit": le, "act": la, "mem_abs": lm_abs, "mem_rel": lm_rel}
    return total, {k: v.detach() for k, v in parts.items()}


def losses_of(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """The last step's loss parts as numbers (one host copy, after the loop)."""
    if not parts:
        return {}
    values = torch.stack([v.float() for v in parts.values()]).tolist()
    return dict(zip(parts, values, strict=True))


class MemoryScorer:
    """M @ k with optional hard-negative mining: the full product every `interval` steps, and in
    between only the rows that were on top then (the memory terms only ever read the top-k).
    The mined rows are gathered once per refresh into a small contiguous tensor that stays in
    cache, which is where the saving comes from (M @ k is memory-bound)."""

    def __init__(self, memory: torch.Tensor, cfg: TrainConfig):
        self.memory = memory  # [N, d]
        self.interval = cfg.mining_interval
        self.rows = cfg.mining_rows
        self.mined: torch.Tensor | None = None  # [rows, d] gathered top rows

    @property
    def partial(self) -> bool:
        return self.mined is not None

    def full(self, nr: Neurons) -> torch.Tensor:
        return self.memory @ nr.keys.T + nr.biases  # [N, n]

    def __call__(self, nr: Neurons, step: int) -> torch.Tensor:
        if self.interval == 0 or self.memory.shape[0] <= self.rows:
            return self.full(nr)
        if self.mined is None or step % self.interval == 0:
            with torch.no_grad():
                top = self.full(nr).max(dim=1).values
                self.mined = self.memory[top.topk(self.rows).indices]
        return self.mined @ nr.keys.T + nr.biases


def train_cached(
    edit: EditTensors,
    anchors: torch.Tensor,
    memory: torch.Tensor,
    tail: Tail,
    cfg: TrainConfig,
    obj: Objective,
    activation: str,
    seed: int = 0,
    whiten: tuple[torch.Tensor, torch.Tensor] | None = None,
    extra: EditTensors | None = None,
    fast: LinearTail | None = None,
) -> TrainResult:
    """Train len(anchors) neurons (neuron i anchored at edit row anchors[i]) until the stop rule holds.

    memory [N, d] must already hold the q rows of every earlier accepted edit.
    extra [K*R rows]: K equivalent inputs of the edit with the same target (train equivalents), R
    rows each in the edit's row order; neuron i is anchored at row i of every one of them too, and
    the stop rule also needs them right. Every cfg.equivalent_steps steps, the equivalents not yet
    right are dropped and the edit trains on with the rest (equivalents help, never block an edit).
    While a wrong row of the edit has no neuron anchored at it (more wrong tokens than
    max_neurons), the attempt ends unsuccessfully once cfg.stall_steps steps pass without fewer
    wrong rows: the caller's retry anchors more rows. Wrong rows that all have neurons train on.
    fast: the model's factored tail (patching/fasttail.py), used for the loop's logits when given.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    nr = init_neurons(edit, anchors, memory, tail, cfg, gen, activation, whiten, extra)
    params = [nr.keys.requires_grad_(), nr.biases.requires_grad_(), nr.values.requires_grad_()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    scorer = MemoryScorer(memory, cfg)
    R = edit.rows
    n = anchors.shape[0]
    copies = 1 + cfg.augment_copies
    targets_all = edit.targets.repeat(copies)
    ffn_all = edit.ffn.repeat(copies, 1)
    res_all = edit.residual.repeat(copies, 1)
    q_all = augmented_q(edit.q, cfg, gen)
    K = 0
    if extra is not None and extra.rows:
        if extra.rows % R:
            raise ValueError(f"train equivalents have {extra.rows} rows, not a multiple of the edit's {R}")
        K = extra.rows // R
        q_all, targets_all = torch.cat([q_all, extra.q]), torch.cat([targets_all, extra.targets])
        ffn_all, res_all = torch.cat([ffn_all, extra.ffn]), torch.cat([res_all, extra.residual])
    # anchor row of neuron i in copy c (dropout copies, then equivalents) is c * R + anchors[i]
    device = edit.q.device
    anchor_rows = torch.arange(copies + K, device=device)[:, None] * R + anchors[None, :].to(device)  # [C+K, n]
    eq_ok = torch.zeros(K, dtype=torch.bool, device=edit.q.device)  # [K] per equivalent: all its rows right
    cols = torch.arange(n, device=device)
    info: dict[str, torch.Tensor] = {}
    success = False
    step = 0
    a_edit = torch.zeros(n, device=edit.q.device)
    m_max = float("inf")
    fewest_wrong, progress_step = R + 1, 0  # stall rule: when the edit last had fewer wrong rows
    unanchored = torch.ones(R, dtype=torch.bool, device=device)
    unanchored[anchors.to(device)] = False  # [R] rows no neuron is anchored at
    bound = fast.bind(ffn_all, res_all) if fast is not None else None
    for step in range(cfg.max_steps + 1):
        due = step > 0 and step % cfg.equivalent_steps == 0 if cfg.equivalent_steps else step == 0
        if K and due:
            # not done within the equivalents' budget: those still wrong are dropped and the rest
            # train on, so an equivalent that cannot be fitted within the memory margins never costs
            # max_steps, nor takes away the help of the others; when none is wrong, the margins are
            # what the equivalents pull against, and all of them go (all at step 0 with budget 0)
            kept = eq_ok.nonzero().flatten()  # [K'] the right ones (one sync, every equivalent_steps steps)
            if kept.numel() == K:
                kept = kept[:0]  # all right (or none left): all go, as the comment above says
            K, base = int(kept.numel()), copies * R
            span = torch.arange(R, device=device)
            rows = torch.cat([torch.arange(base, device=device), (base + kept[:, None] * R + span[None, :]).flatten()])
            q_all, targets_all, ffn_all, res_all = q_all[rows], targets_all[rows], ffn_all[rows], res_all[rows]
            anchor_rows = torch.arange(copies + K, device=device)[:, None] * R + anchors[None, :].to(device)
            bound = bound.select(rows) if bound is not None else None
        pre = q_all @ nr.keys.T + nr.biases  # [C*R, n]
        act = activate(pre, activation)  # type: ignore[arg-type]
        if bound is not None:
            logits = bound(act, nr.values)  # [C*R, V]: one [n, V] product instead of [C*R, V]
        else:
            logits = tail(ffn_all + act @ nr.values, res_all)  # [C*R, V]
        a_rows = pre[anchor_rows, cols[None, :]]  # [C, n]
        a_edit = a_rows[0]
        m = scorer(nr, step)
        last = step == cfg.max_steps
        # the stop and stall rules read a few numbers off the device: a check is one copy to the host
        # (a GPU sync), made every check_every steps; fixed_steps runs without any until the end
        if last or (not cfg.fixed_steps and step % cfg.check_every == 0):
            with torch.no_grad():
                wrong_rows = logits[:R].argmax(-1) != edit.targets  # [R]
                # [K] per equivalent: all its rows right (which ones are dropped at equivalent_steps)
                eq_ok = (logits[copies * R :].argmax(-1) == targets_all[copies * R :]).reshape(K, R).all(1)
                short, eq_stop = wrong_rows.any(), eq_ok.all()  # the stop rule's "edit and equivalents right"
                if cfg.stop_logit_margin > 0:
                    # right with headroom, for the stop rule only (the stall and drop rules count wrong
                    # rows): behind a context or in other words the logits shift a little
                    short = (logit_margin(logits[:R], edit.targets) < cfg.stop_logit_margin).any()
                    eq_margin = logit_margin(logits[copies * R :], targets_all[copies * R :])  # [K*R]
                    eq_stop = (eq_margin >= cfg.stop_logit_margin).all()
                m_top = m.max() if m.numel() else m.new_full((), float("-inf"))
                numbers = torch.stack(
                    [
                        wrong_rows.sum(),
                        (wrong_rows & unanchored).any(),  # a wrong row without a neuron anchored at it
                        short,
                        eq_stop,
                        m_top,
                        a_edit.min() if a_edit.numel() else a_edit.new_full((), float("inf")),
                    ]
                ).float()
                wrong_f, stray, short_f, extra_all, m_max, a_min = numbers.tolist()
                wrong = int(wrong_f)
                edit_ok = not short_f
                # progress: fewer wrong rows, or none wrong without an anchor (those train on as before)
                if wrong < fewest_wrong or not stray:
                    fewest_wrong, progress_step = min(wrong, fewest_wrong), step
                if stop_met(edit_ok, a_min, m_max, obj) and scorer.partial:
                    m_max = float(scorer.full(nr).max())  # mined rows passed: confirm on the whole memory
                if stop_met(edit_ok and bool(extra_all), a_min, m_max, obj):
                    success = True
                    if not cfg.fixed_steps:
                        break
        if last or (cfg.stall_steps and not cfg.fixed_steps and step - progress_step >= cfg.stall_steps):
            break
        loss, info = total_loss(logits, targets_all, a_rows, a_edit, m, obj, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    final = Neurons(nr.keys.detach(), nr.biases.detach(), nr.values.detach())
    return TrainResult(
        neurons=final,
        success=success,
        steps=step,
        seconds=time.perf_counter() - t0,
        edit_activation=float(a_edit.detach().min()),
        memory_max=m_max,
        losses=losses_of(info),
        equivalents=K,
    )
