"""`patchd bench edit --base config:NAME --steps S`: per-edit cost at real model sizes, random weights.

Weights of 1B-8B models cannot be fetched here, and the cost of an edit does not depend on what the
weights say: only on the shapes (the forward that caches the edit, the training steps on cached
tensors, the gate, the generate() check). So a causal LM is built from a transformers config with
the published sizes of a real model, its weights random, and edited with synthetic edits (random
prompts, random targets), each trained for exactly S steps (TrainConfig.fixed_steps) so that every
edit does the same work. THE WEIGHTS ARE RANDOM: the outcomes (accepted or not) mean nothing, the
times and memory do.

Reported: per-edit latency (median, p95) split into training and the rest (caching forward, gate,
generate check), per-step time, memory M rows, peak GPU memory (or the process's peak RSS on a
CPU), the reference procedure (a full forward every step) on a few edits and the speedup, and the
inference overhead of 1,000 and 10,000 patch neurons on fixed batches.

Needs torch and transformers only (with patching/), so it runs on a bare GPU machine
(patching/eval/gpubench.py).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from patching.config import GateConfig, TrainConfig
from patching.encode import Encoded, generation_ids
from patching.engine import Patcher
from patching.eval.metrics import percentile

# published sizes (the models' config.json); max_position_embeddings is kept small: it only sizes
# caches that these short prompts never fill
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
    ),
    "llama-3.1-8b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2.5-7b": (
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
        ),
    ),
    # for the tests: the same code path in a second
    "tiny-llama": (
        "llama",
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    ),
}
PREFIX = "config:"
RANDOM_WEIGHTS = "random weights (built from a transformers config, never trained): outcomes mean nothing, costs do"


def build_model(name: str, dtype: torch.dtype, device: str, seed: int = 0) -> Any:
    """A causal LM with the published sizes of preset `name`, random weights, on `device` in `dtype`."""
    import transformers

    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(PRESETS)}")
    model_type, sizes = PRESETS[name]
    config = transformers.AutoConfig.for_model(model_type, max_position_embeddings=4096, **sizes)
    torch.manual_seed(seed)
    with torch.device(device):  # weights made where they live: an 8B model never passes through the CPU
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers before 4.56 names it torch_dtype (a GPU machine may have one)
            model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _random_ids(gen: torch.Generator, vocab: int, n: int) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=gen)


def _all_rows(prompts: list[torch.Tensor]) -> Encoded:
    """Every position of every prompt as a row (memory M): [sum of lengths] rows."""
    return generation_ids(prompts, [p[:0] for p in prompts], seq2seq=False, pad_id=0, all_rows=True)


def run_synthetic_bench(
    name: str,
    *,
    steps: int = 100,
    edits: int = 20,
    memory_rows: int = 10_000,
    heldout: int = 200,
    prompt_len: int = 16,
    target_len: int = 4,
    reference_edits: int = 3,
    overhead_neurons: tuple[int, ...] = (1_000, 10_000),
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    model = build_model(name, dtype, device, seed)
    vocab = int(model.config.vocab_size)
    params = sum(p.numel() for p in model.parameters())
    progress(
        f"{name}: {params / 1e9:.2f}B parameters, {str(dtype).removeprefix('torch.')} on {device}; {RANDOM_WEIGHTS}"
    )
    train = TrainConfig(max_steps=steps, fixed_steps=True, seed=seed)
    # one attempt per edit: with random weights a retry measures nothing new, and the unit of cost is
    # one training run of `steps` steps plus its gate
    patcher = Patcher(model, train=train, gate=GateConfig(retries=0))

    # M: every position of random prompts of 256 tokens, 8 at a time
    t0 = time.perf_counter()
    chunk = 256
    lengths = [chunk] * (memory_rows // chunk) + ([memory_rows % chunk] if memory_rows % chunk else [])
    prompts = [_random_ids(gen, vocab, n) for n in lengths]
    for i in range(0, len(prompts), 8):
        patcher.build_memory([_all_rows(prompts[i : i + 8])])
    questions = [_random_ids(gen, vocab, prompt_len) for _ in range(heldout)]
    answers = [_random_ids(gen, vocab, target_len) for _ in range(heldout)]
    held = [
        generation_ids(questions[i : i + 32], answers[i : i + 32], seq2seq=False, pad_id=0)
        for i in range(0, heldout, 32)
    ]
    patcher.build_heldout(held)
    _sync(device)
    setup_s = time.perf_counter() - t0
    progress(f"memory M {len(patcher.memory)} rows, held-out {heldout} questions; setup {setup_s:.1f}s")

    stream = [
        generation_ids(
            [_random_ids(gen, vocab, prompt_len)], [_random_ids(gen, vocab, target_len)], seq2seq=False, pad_id=0
        )
        for _ in range(edits)
    ]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cached = _edits(patcher, stream, "cached", device, progress)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    report: dict[str, Any] = {
        "base": f"{PREFIX}{name}",
        "weights": RANDOM_WEIGHTS,
        "parameters": params,
        "config": PRESETS[name][1],
        "dtype": str(dtype).removeprefix("torch."),
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "steps": steps,
        "memory_rows": len(patcher.memory),
        "heldout_questions": heldout,
        "prompt_tokens": prompt_len,
        "target_tokens": target_len,
        "setup_seconds": round(setup_s, 1),
        "cached": cached,
        "peak_gpu_gib": round(peak_gpu, 2) if peak_gpu is not None else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if reference_edits:
        patcher.train_cfg = replace(patcher.train_cfg, mode="reference", init="reference")
        ref = _edits(patcher, stream[:reference_edits], "reference", device, progress)
        patcher.train_cfg = train.for_task(True)
        report["reference"] = ref
        report["speedup"] = round(ref["median_ms"] / cached["median_ms"], 1)
    report["inference_overhead"] = inference_overhead(patcher, overhead_neurons, vocab, prompt_len, device, gen)
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def _edits(
    patcher: Patcher, stream: list[Encoded], label: str, device: str, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Edit the stream one after another (each committed when accepted), then undo them all."""
    cp = patcher.checkpoint()
    rows = []
    for i, enc in enumerate(stream):
        _sync(device)
        t0 = time.perf_counter()
        proposal = patcher.propose(enc, edit_id=f"{label}-{i}")
        if proposal is not None and proposal.accepted:
            patcher.commit(proposal)
        _sync(device)
        total = time.perf_counter() - t0
        train_s = proposal.train.seconds if proposal is not None else 0.0
        rows.append(
            {
                "ms": round(total * 1000, 2),
                "train_ms": round(train_s * 1000, 2),
                "other_ms": round((total - train_s) * 1000, 2),  # caching forward, gate, generate check
                "steps": proposal.train.steps if proposal is not None else 0,
                "attempts": proposal.attempts if proposal is not None else 0,
                "accepted": bool(proposal is not None and proposal.accepted),
            }
        )
        progress(
            f"{label} edit {i + 1}/{len(stream)}: {rows[-1]['ms']:.0f} ms (training {rows[-1]['train_ms']:.0f} ms)"
        )
    patcher.rollback(cp)
    ms = [r["ms"] for r in rows]
    first = [r for r in rows if r["attempts"] <= 1]  # one training run of exactly `steps` steps
    per_step = [r["train_ms"] / max(r["steps"], 1) for r in first] or [0.0]
    return {
        "edits": len(rows),
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(percentile(ms, 0.95) or 0.0, 2),
        "median_train_ms": round(statistics.median(r["train_ms"] for r in rows), 2),
        "median_other_ms": round(statistics.median(r["other_ms"] for r in rows), 2),
        "median_step_ms": round(statistics.median(per_step), 3),
        "accepted": sum(r["accepted"] for r in rows),
        "rows": rows,
    }


def inference_overhead(
    patcher: Patcher, counts: tuple[int, ...], vocab: int, prompt_len: int, device: str, gen: torch.Generator
) -> list[dict[str, Any]]:
    """Forward time with n random relu-cap neurons against none, on fixed batches of 1 and 16."""
    d = patcher.site.hidden_size
    model = patcher.model
    batches = {b: torch.randint(3, vocab, (b, prompt_len), generator=gen).to(device) for b in (1, 16)}
    repeats = 20 if device.startswith("cuda") else 3  # a CPU forward of a 1B model takes seconds

    def timed(ids: torch.Tensor) -> float:
        times = []
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first is a warm-up
                _sync(device)
                t0 = time.perf_counter()
                model(input_ids=ids)
                _sync(device)
                times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    patcher.wrapper.clear()
    base = {b: timed(ids) for b, ids in batches.items()}
    out = []
    for n in counts:
        g = torch.Generator().manual_seed(n)
        keys = (torch.randn(n, d, generator=g) / d**0.5).to(device)
        biases = torch.full((n,), -3.0).to(device)  # mostly silent, as real patches are on other inputs
        values = (torch.randn(n, d, generator=g) * 0.01).to(device)
        patcher.wrapper.add(keys, biases, values, edit_id=f"overhead-{n}")
        for b, ids in batches.items():
            t = timed(ids)
            out.append(
                {
                    "neurons": n,
                    "batch": b,
                    "base_ms": round(base[b] * 1000, 3),
                    "patched_ms": round(t * 1000, 3),
                    "overhead_pct": round((t / base[b] - 1) * 100, 2),
                }
            )
        patcher.wrapper.remove([f"overhead-{n}"])
    return out


def print_report(r: dict[str, Any]) -> None:
    """The figures a reader wants first, in a few lines (the JSON has every edit)."""
    c = r["cached"]
    print(f"{r['base']} ({r['parameters'] / 1e9:.2f}B, {r['dtype']}, {r['device']}): {r['weights']}")
    print(
        f"cached trainer, {r['steps']} steps, M {r['memory_rows']} rows: median {c['median_ms']:.0f} ms per edit "
        f"(p95 {c['p95_ms']:.0f}; training {c['median_train_ms']:.0f}, forward + gate + generate "
        f"{c['median_other_ms']:.0f}; {c['median_step_ms']:.2f} ms a step)"
    )
    if "reference" in r:
        ref = r["reference"]
        print(f"reference procedure ({ref['edits']} edits): median {ref['median_ms']:.0f} ms; speedup {r['speedup']}x")
    memory = f"peak GPU memory {r['peak_gpu_gib']} GiB" if r["peak_gpu_gib"] is not None else ""
    print(f"{memory or 'peak RSS ' + str(r['peak_rss_gib']) + ' GiB'}")
    for row in r["inference_overhead"]:
        print(
            f"inference with {row['neurons']:,} neurons, batch {row['batch']}: {row['patched_ms']:.1f} ms "
            f"against {row['base_ms']:.1f} ms ({row['overhead_pct']:+.1f} %)"
        )
