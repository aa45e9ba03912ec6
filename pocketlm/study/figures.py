"""The report's figures (matplotlib, Agg): Pareto fronts of quality against each cost, validation curves,
and loss against the other quality measures. Each figure comes back as SVG text."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pocketlm.study.measures import lower_is_better  # noqa: E402

LABELS = {"trainable_params": "trainable parameters", "peak_memory_bytes": "peak memory (bytes)",
          "tokens_per_s": "training tokens/s", "size_bytes": "size on disk (bytes)", "train_s": "training time (s)",
          "decode_tokens_per_s": "decode tokens/s", "val_loss": "validation loss", "bits_per_byte": "bits per byte",
          "chrf": "chrF", "form_pass_rate": "form pass rate", "hellaswag_acc": "HellaSwag accuracy",
          "forgetting_bpb": "forgetting (Δ bits/byte on general text)", "kl_from_base": "KL from base",
          "zero_shot_acc": "zero-shot accuracy"}


def label(column: str) -> str:
    arrow = "lower is better" if lower_is_better(column) else "higher is better"
    return f"{LABELS.get(column, column)} ({arrow})"


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]], cost_lower: bool, quality_lower: bool) -> list[int]:
    """Indices of the points no other point beats on both cost and quality."""
    def better_eq(a: float, b: float, lower: bool) -> bool:
        return a <= b if lower else a >= b

    front = []
    for i, (c, q) in enumerate(points):
        dominated = any(
            better_eq(c2, c, cost_lower) and better_eq(q2, q, quality_lower) and (c2 != c or q2 != q)
            for j, (c2, q2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def pareto_figure(groups: list[dict], cost: str, quality: str) -> str | None:
    """groups: [{"name", cost: (mean, std), quality: (mean, std)}]; None if fewer than two points."""
    pts = [(g["name"], g[cost], g[quality]) for g in groups if g.get(cost) and g.get(quality)
           and _finite(g[cost][0]) and _finite(g[quality][0])]
    if len(pts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xy = [(p[1][0], p[2][0]) for p in pts]
    front = pareto_front(xy, lower_is_better(cost), lower_is_better(quality))
    for i, (name, (cx, cs), (qy, qs)) in enumerate(pts):
        on = i in front
        ax.errorbar(cx, qy, xerr=cs or None, yerr=qs or None, fmt="o", ms=7 if on else 5,
                    color="tab:red" if on else "tab:gray", ecolor="lightgray", capsize=2, zorder=3)
        ax.annotate(name, (cx, qy), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    color="black" if on else "dimgray")
    line = sorted((xy[i] for i in front), key=lambda t: t[0])
    ax.plot([p[0] for p in line], [p[1] for p in line], "-", color="tab:red", alpha=0.6, zorder=2,
            label="Pareto front")
    positive = [x for x, _ in xy if x > 0]
    if positive and max(positive) / max(min(positive), 1e-12) > 50:
        ax.set_xscale("log")
    ax.set_xlabel(label(cost))
    ax.set_ylabel(label(quality))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _svg(fig)


def curves_figure(curves: dict[str, list[tuple[int, float]]], key: str = "val_loss") -> str | None:
    drawn = {k: v for k, v in curves.items() if v}
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    cmap = plt.get_cmap("tab20")
    for i, (name, pts) in enumerate(drawn.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=2.5, lw=1.2, color=cmap(i % 20), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(label(key))
    ax.grid(alpha=0.3)
    if len(drawn) <= 24:
        ax.legend(fontsize=6, ncol=2 if len(drawn) > 8 else 1, loc="best")
    return _svg(fig)


def agreement_figure(groups: list[dict], loss: str, other: str) -> str | None:
    """The loss against another quality measure: where they disagree, the loss alone misleads."""
    pts = [(g["name"], g[loss][0], g[other][0]) for g in groups
           if g.get(loss) and g.get(other) and _finite(g[loss][0]) and _finite(g[other][0])]
    if len(pts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    ax.scatter([p[1] for p in pts], [p[2] for p in pts], color="tab:blue", zorder=3)
    for name, x, y in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(label(loss))
    ax.set_ylabel(label(other))
    ax.grid(alpha=0.3)
    return _svg(fig)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
