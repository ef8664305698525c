"""Probe of WISE's routing on zsre-smollm2 (editors-22.md, "WISE's collapse, checked").

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/editors-22/probe-wise-routing.py MODE N OUT.json \
        [--score paper|code] [--unrelated memory|nq] [--steps 70,300]

MODE sequential: N edits in one stream (as `evaluate --editor wise`); after each, the threshold and
  the routing scores of 100 held-out zsRE questions, 100 NQ questions (the `loc` prompts WISE's
  paper uses) and every earlier edit's prompt under the side memory as it now is (no decoding).
MODE activations: no edit; the side memory's inputs (the FFN activations at its layer) over the real
  positions of 100 held-out questions and the first N edit prompts: their mean cosine to their mean.
MODE single: each of the first N mistakes from the base (reset between), at each step budget;
  per step the edit's and the unrelated input's scores in the margin loss (every 10th kept).
--score code: the score as the authors' code computes it (the model's activation function applied
  to the main and the side memory's outputs before the norm), instead of the paper's ||a (W'-W)^T||.
--unrelated nq: the margin loss's unrelated input drawn from NQ questions (after the first 100),
  as in the paper's zsRE setup, instead of the task's memory inputs.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

import patching.eval.wise as W
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.eval.evaldata import load_eval_data

NQ = "raw/easyedit_portability_dummy/zsre_mend_eval_portability_gpt4.dummy.json"

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["sequential", "single", "activations"])
ap.add_argument("n", type=int)
ap.add_argument("out")
ap.add_argument("--score", choices=["paper", "code"], default="paper")
ap.add_argument("--unrelated", choices=["memory", "nq"], default="memory")
ap.add_argument("--steps", default="70")
ap.add_argument("--data-dir", default="../shared/data")
args = ap.parse_args()

data = load_eval_data("zsre", args.data_dir, seed=0)
adapter = TaskAdapter(load_base("zsre-smollm2"))
nqs = [r["loc"] for r in json.load(open(f"{args.data_dir}/{NQ}"))]
unrelated = nqs[100:] if args.unrelated == "nq" else [e.input for e in data.memory]
stream = adapter.mistakes(data.edits, limit=args.n, base=True)
held = [e.input for e in data.heldout[:100]]

trace: list[tuple[float, float]] = []
paper_margin = W.margin_loss


def spy(e: torch.Tensor, u: torch.Tensor, a: float, b: float, g: float) -> torch.Tensor:
    trace.append((float(e.detach().mean()), float(u.detach().mean())))
    return paper_margin(e, u, a, b, g)


W.margin_loss = spy
if args.mode == "activations":
    ed = W.WiseEditor(adapter, unrelated, seed=0)
    batch = adapter.serving_batch(held + [e.input for e in stream])
    batch.pop("logits_to_keep", None)
    acts, _ = ed._capture(batch)  # [B, T, d_ff]
    real = acts[batch["attention_mask"].bool()]  # [positions, d_ff]
    cos = F.cosine_similarity(real, real.mean(0, keepdim=True), dim=-1)  # [positions]
    result = {"args": vars(args), "layer": ed.layer_index, "sequences": len(acts), "positions": len(real),
              "mean_cosine_to_mean": float(cos.mean()), "median_cosine_to_mean": float(cos.median())}  # fmt: skip
    print(json.dumps(result))
    json.dump(result, open(args.out, "w"), indent=1)
    raise SystemExit(0)
log: list[dict] = []
for steps in [int(s) for s in args.steps.split(",")]:
    ed = W.WiseEditor(adapter, unrelated, W.WiseConfig(steps=steps), seed=0)
    if args.score == "code":
        act = F.silu  # SmolLM2's hidden_act

        def code_scores(a: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            base = F.linear(a, ed.main.to(a.dtype))  # [B, T, d_model]
            norms = (act(base + F.linear(a, delta)) - act(base)).norm(dim=-1)  # [B, T]
            m = torch.ones_like(norms) if mask is None else mask.to(norms.dtype)
            return (norms * m).sum(1) / m.sum(1).clamp(min=1.0)

        W.route_scores = code_scores  # the editor's training, threshold and routing all read it

    def scores(texts: list[str]) -> torch.Tensor:
        b = adapter.serving_batch(texts)
        b.pop("logits_to_keep", None)
        a, _ = ed._capture(b)
        return W.route_scores(a, ed.current - ed.main, b.get("attention_mask"))

    for i, ex in enumerate(stream):
        if args.mode == "single":
            ed.reset()
        trace.clear()
        t0 = time.time()
        rec = ed.edit(ex.input, ex.target, str(i))
        s_h, s_n = scores(held), scores(nqs[:100])
        s_e = scores([e.input for e in stream[: i + 1]])  # the prompts alone, as greedy decoding routes
        row = {
            "steps_budget": steps, "i": i, "steps": rec.steps, "threshold": ed.threshold,
            "edit_train_score_end": trace[-1][0], "unrelated_score_end": trace[-1][1],
            "held_median": float(s_h.median()), "held_max": float(s_h.max()),
            "held_routed": float((s_h > ed.threshold).float().mean()),
            "nq_median": float(s_n.median()), "nq_routed": float((s_n > ed.threshold).float().mean()),
            "prompt": float(s_e[-1]), "earlier_prompts_routed": float((s_e > ed.threshold).float().mean()),
            "delta_abs_mean": float((ed.current - ed.main).abs().mean()),
            "trace_every10": trace[::10], "seconds": round(time.time() - t0, 1),
        }  # fmt: skip
        log.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace_every10"}), flush=True)
        json.dump({"args": vars(args), "rows": log}, open(args.out, "w"), indent=1)
    ed.close()
