"""`patchd mend train`: train a MEND editor for one base on a task's training examples.

One step (MEND's `edit_step`, first order): the edit's gradient rows (u, δ) at the base weights
θ0 -> the editor -> W' = W - α·Σ δ̃ ũᵀ for every edited matrix -> the edited model (functional_call
on the cached top layers) gives
    L = c_edit · NLL(edited model, edit target on the paraphrase: here the edit input itself)
      + c_loc  · KL(base ‖ edited) on a group of unrelated inputs,
backpropagated into the editor and the step sizes only. Adam on the editor (lr) and a second Adam
on the step sizes only (lr_lr; MEND also stepped them with the first optimiser, a quirk not kept);
gradients accumulated over `accumulate` steps, clipped; a step whose gradient is NaN/Inf is skipped
and counted. The editor is checkpointed (safetensors) every few minutes and on Ctrl-C, and a run
pointed at the same directory resumes where it stopped (data order is a function of the step).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from patching.bases.load import LoadedBase
from patching.bases.tasks import TaskAdapter
from patching.eval.mend import store
from patching.eval.mend.data import Item, MendData, build
from patching.eval.mend.nets import MendNet
from patching.eval.mend.stack import GradCapture, Target, TopStack, select_targets, target_modules
from patching.loading import base_identity


@dataclass(frozen=True)
class MendTrainConfig:
    rank: int = 256  # LRLinear rank (MEND: 1920, i.e. full rank for our widths; 256 buys ~3x the steps)
    n_layers: int = 3  # the last n layers' FFN matrices are edited (MEND: last 3)
    gate_proj: bool = False  # Llama-style models: also edit mlp.gate_proj
    mlp_layers: int = 2  # LRLinear layers per editor (MEND: n_hidden + 1 = 2)
    edit_lr: float = 1e-4  # initial per-matrix step size α (MEND: 1e-4)
    lr: float = 1e-4  # Adam on the editor (MEND: 1e-6 with V ~ N(0, 1); ours is V ~ N(0, 1/d))
    lr_lr: float = 1e-4  # Adam on the step sizes (MEND: 1e-4)
    c_edit: float = 0.1
    c_loc: float = 1.0
    loc_batch: int = 4  # unrelated inputs per step for the KL term (MEND: 1)
    accumulate: int = 1  # steps per optimiser update (MEND: 10)
    grad_clip: float = 100.0
    val_every: int = 1000
    val_edits: int = 100
    checkpoint_minutes: float = 5.0
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MendTrainConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class StepOut:
    loss: torch.Tensor
    l_edit: float
    l_loc: float
    success: bool  # every edit row right after the edit
    loc_changed: float  # share of locality rows whose argmax moved


def kl_loc(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ edited), averaged over rows (softmax over classes or the vocabulary)."""
    return F.kl_div(
        F.log_softmax(logits.float(), -1),
        F.log_softmax(base_logits.float(), -1),
        log_target=True,
        reduction="batchmean",
    )


class MendTrainer:
    def __init__(self, model: torch.nn.Module, net: MendNet, targets: list[Target], cfg: MendTrainConfig):
        self.model, self.net, self.targets, self.cfg = model, net, targets, cfg
        model.requires_grad_(False)  # the base is frozen: only the editor and its step sizes learn
        self.stack = TopStack(model, min(t.layer for t in targets))
        self.mods = target_modules(model, targets)
        params = dict(model.named_parameters())
        self.weights = {t.name: params[t.name] for t in targets}

    def edit_rows(self, item: Item) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(u, δ) rows of the edit's NLL at the base weights (cached input, top layers only)."""
        with torch.enable_grad(), GradCapture(self.mods) as cap:
            logits = self.stack.logits(item.cached, item.rows_b, item.rows_t)
            loss = F.cross_entropy(logits.float(), item.targets)
            return cap.rows(loss)

    def edited(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        deltas = self.net.updates(rows)
        return {n: self.weights[n].detach() + deltas[n] for n in self.weights}

    def step(self, edit: Item, loc: Item) -> StepOut:
        params = self.edited(self.edit_rows(edit))
        post = self.stack.logits(edit.cached, edit.rows_b, edit.rows_t, params, self.targets)
        l_edit = F.cross_entropy(post.float(), edit.targets)
        post_loc = self.stack.logits(loc.cached, loc.rows_b, loc.rows_t, params, self.targets)
        l_loc = kl_loc(loc.base_logits, post_loc)
        loss = self.cfg.c_edit * l_edit + self.cfg.c_loc * l_loc
        with torch.no_grad():
            success = bool((post.argmax(-1) == edit.targets).all())
            changed = float((post_loc.argmax(-1) != loc.base_logits.argmax(-1)).float().mean())
        return StepOut(loss, l_edit.item(), l_loc.item(), success, changed)

    @torch.no_grad()
    def validate(self, data: MendData) -> dict[str, float]:
        """Single edits on the unedited base: success and the share of unrelated outputs kept."""
        was = self.net.training
        self.net.eval()
        succ, kept, le, ll = [], [], [], []
        try:
            for item in data.val_edits:
                out = self.step(item, data.val_loc)
                succ.append(out.success)
                kept.append(1.0 - out.loc_changed)
                le.append(out.l_edit)
                ll.append(out.l_loc)
        finally:
            self.net.train(was)
        return {
            "edit_success": statistics.fmean(succ),
            "loc_unchanged": statistics.fmean(kept),
            "l_edit": statistics.fmean(le),
            "l_loc": statistics.fmean(ll),
        }


def _finite_grads(params: list[torch.nn.Parameter]) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def train(
    lb: LoadedBase,
    pool: list[Any],
    source: str,
    out: Path,
    cfg: MendTrainConfig | None = None,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    data: MendData | None = None,
) -> dict[str, Any]:
    """Train (or resume) the editor in `out` until `steps` total steps or `minutes` of wall time."""
    t_start = time.perf_counter()
    model = lb.model.eval()
    cfg = cfg or MendTrainConfig()
    try:
        identity = base_identity(lb.directory)
    except (OSError, ValueError):
        identity = None
    state: dict[str, Any] = {"step": 0, "seconds": 0.0, "nan_skipped": 0, "history": [], "val": []}
    resumed = (out / store.CONFIG_FILE).is_file()
    if resumed:
        net, saved = store.load(out)
        store.check_matches(saved, model)
        if saved.get("base_identity") != identity:
            raise store.MendStateError(f"{out} holds an editor for another base; use another --out")
        cfg = MendTrainConfig.from_dict(saved["train_config"])
        state = saved["training"]
        targets = [t for t in select_targets(model, cfg.n_layers, cfg.gate_proj)]
        if [t.name for t in targets] != net.names:
            raise store.MendStateError(f"{out}: edited matrices differ from this configuration")
        log(f"resuming {out} at step {state['step']} (its own settings: rank {cfg.rank}, lr {cfg.lr})")
    else:
        torch.manual_seed(cfg.seed)
        targets = select_targets(model, cfg.n_layers, cfg.gate_proj)
        net = MendNet([t.name for t in targets], [t.shape for t in targets], cfg.rank, cfg.edit_lr, cfg.mlp_layers)
    net.train()
    opt = torch.optim.Adam(net.editor_parameters(), lr=cfg.lr)
    opt_lr = torch.optim.Adam([net.edit_lrs], lr=cfg.lr_lr)
    if resumed:
        store.load_optimizers(out, {"editor": opt, "edit_lrs": opt_lr})
    trainer = MendTrainer(model, net, targets, cfg)
    if data is None:
        data = build(
            TaskAdapter(lb),
            trainer.stack,
            pool,
            source,
            val=cfg.val_edits,
            loc_batch=cfg.loc_batch,
            seed=cfg.seed,
            progress=progress,
        )
    config = {
        "base": lb.name,
        "base_identity": identity,
        "model_type": model.config.model_type,
        "edited": [
            {
                "name": t.name,
                "shape": list(t.shape),
                "layer": t.layer,
                "editor": f"{t.shape[0]}x{t.shape[1]}",
                "mode": m,
            }
            for t, m in zip(targets, net.modes, strict=True)
        ],
        "net": store.net_config(net, cfg.rank, cfg.mlp_layers),
        "train_config": asdict(cfg),
        "data": data.info,
        "editor_parameters": sum(p.numel() for p in net.editor_parameters()),
    }

    def save() -> None:
        state["seconds"] = round(state["seconds"], 1)
        store.save(out, net, {**config, "training": state}, {"editor": opt, "edit_lrs": opt_lr})

    target_steps = steps if steps is not None else (None if minutes else 5000)
    deadline = t_start + minutes * 60 if minutes else None
    n = len(data.edits)
    ema: dict[str, float] = {}
    step_times: list[float] = []
    bar = tqdm(total=target_steps, initial=state["step"], desc="mend train", unit="step", disable=not progress)
    last_ckpt = time.perf_counter()
    interrupted = False
    try:
        while target_steps is None or state["step"] < target_steps:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            t0 = time.perf_counter()
            s = state["step"]
            epoch, pos = divmod(s, n)
            order = list(range(n))
            random.Random(cfg.seed * 7919 + epoch).shuffle(order)
            e_idx = order[pos]
            rng = random.Random(cfg.seed * 1_000_003 + s)
            group = rng.choice(data.loc_groups)
            while e_idx in group.members and len(data.loc_groups) > 1:
                group = rng.choice(data.loc_groups)
            out_s = trainer.step(data.edits[e_idx], group)
            (out_s.loss / cfg.accumulate).backward()
            if (s + 1) % cfg.accumulate == 0:
                params = [*net.editor_parameters(), net.edit_lrs]
                if _finite_grads(params) and torch.isfinite(out_s.loss):
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    opt_lr.step()
                else:
                    state["nan_skipped"] += 1
                opt.zero_grad(set_to_none=True)
                opt_lr.zero_grad(set_to_none=True)
            state["step"] = s + 1
            dt = time.perf_counter() - t0
            state["seconds"] += dt
            step_times.append(dt)
            for k, v in (
                ("l_edit", out_s.l_edit),
                ("l_loc", out_s.l_loc),
                ("success", float(out_s.success)),
                ("loc_changed", out_s.loc_changed),
            ):
                ema[k] = v if k not in ema else 0.99 * ema[k] + 0.01 * v
            bar.update(1)
            if state["step"] % 20 == 0:
                bar.set_postfix(
                    edit=f"{ema['l_edit']:.3f}",
                    loc=f"{ema['l_loc']:.4f}",
                    ok=f"{ema['success']:.2f}",
                    moved=f"{ema['loc_changed']:.3f}",
                    lr=f"{float(net.edit_lrs.detach().mean()):.1e}",
                    nan=state["nan_skipped"],
                )
            if state["step"] % 100 == 0:
                state["history"].append(
                    {
                        "step": state["step"],
                        **{k: round(v, 5) for k, v in ema.items()},
                        "edit_lr_mean": float(net.edit_lrs.detach().mean()),
                    }
                )
            if cfg.val_every and state["step"] % cfg.val_every == 0:
                scores = trainer.validate(data)
                state["val"].append({"step": state["step"], **{k: round(x, 4) for k, x in scores.items()}})
                log(f"step {state['step']}: validation {state['val'][-1]}")
            if time.perf_counter() - last_ckpt > cfg.checkpoint_minutes * 60:
                save()
                last_ckpt = time.perf_counter()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: saving the editor")
    finally:
        bar.close()
    if not state["val"] or state["val"][-1]["step"] != state["step"]:
        scores = trainer.validate(data)
        state["val"].append({"step": state["step"], **{k: round(x, 4) for k, x in scores.items()}})
    save()
    return {
        "out": str(out),
        **{k: config[k] for k in ("base", "model_type", "edited", "data", "editor_parameters")},
        "train_config": asdict(cfg),
        "steps": state["step"],
        "train_seconds": state["seconds"],
        "this_run": {
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            "steps": len(step_times),
            "median_step_seconds": round(statistics.median(step_times), 4) if step_times else None,
        },
        "nan_skipped": state["nan_skipped"],
        "interrupted": interrupted,
        "running": {k: round(v, 5) for k, v in ema.items()},
        "validation": state["val"],
        "edit_lrs": [float(x) for x in net.edit_lrs.detach()],
    }
