"""Plots of evaluation reports (matplotlib, PNG): SR/GR running averages, retention, locality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patching.eval.metrics import running_mean


def plot_reports(reports: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise RuntimeError("plots need matplotlib: pip install 'patchd[eval]' (deploy/setup.sh installs it)") from None

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for rep in reports:
        single = " T=1 (each edit on the base)" if rep.get("sequential") is False else ""
        trained = " + train equivalents" if rep.get("train_equivalents") else ""
        # the levers of issue 21 tell apart runs that share everything else
        trained += "".join(f" {k}={rep[k]}" for k in ("context_augment", "augment_source", "site_depth") if rep.get(k))
        # the patch activation tells apart two tpatcher runs on the same stream (relu vs relu-cap)
        act = (rep.get("train_config") or {}).get("activation")
        label = f"{rep['editor']}{f' {act}' if act else ''}{trained}{single} ({rep['base']}, {rep['data']})"
        done = [r for r in rep["rows"] if "sr" in r]
        x = list(range(1, len(done) + 1))
        (line,) = axes[0].plot(x, running_mean([float(r["sr"]) for r in done]), label=f"{label} SR")
        grs = [r["gr"] for r in done if r.get("gr") is not None]
        if grs:
            axes[0].plot(
                range(1, len(grs) + 1), running_mean(grs), ls="--", color=line.get_color(), label=f"{label} GR"
            )
        curve = list(rep.get("curve") or [])
        final = rep.get("er") is not None and rep.get("locality") is not None
        if final and (not curve or curve[-1]["edits"] < len(done)):
            # the end of the stream: ER and the locality over the whole held-out set
            curve.append({"edits": len(done), "retention": rep["er"], "locality": rep["locality"]})
        axes[1].plot([c["edits"] for c in curve], [c["retention"] for c in curve], marker="o", ms=3, label=label)
        axes[2].plot([c["edits"] for c in curve], [c["locality"] for c in curve], marker="o", ms=3, label=label)
    titles = ("SR (solid) / GR (dashed), running mean", "retention of earlier edits", "locality (held-out unchanged)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("edits")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
