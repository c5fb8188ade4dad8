"""The demo report's plots (matplotlib, optional): each a function that returns a figure from plain
numbers, so that a test can render it and read its text boxes.

* :func:`repetition_figure`: every model's rep-3 and CREP under each decoding the claims are judged
  on (one panel per metric x condition), a dot per training seed and the mean with its 95% interval
  (across seeds for the arms, over documents for the references); horizontal, so long model names
  stay readable.
* :func:`effects_figure`: each comparison's per-seed effect, its mean and 95% t interval, 0 and the
  paper's effect, one row per comparison and metric, one panel per condition.
* :func:`training_figure`: ``loss/ce`` of every run (the term all arms share), and the extra terms
  (FOCUS / KD / RePAIR margin / DPO's loss) in a second panel.
"""

from __future__ import annotations

from typing import Sequence

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401 - optional (the eval extra)
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib  # optional (the eval extra) and heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional (the eval extra) and heavy

    return plt


def _height(rows: int) -> float:
    return 1.2 + 0.34 * max(rows, 3)


def repetition_figure(panels: Sequence[tuple[str, list[dict]]]):
    """``panels``: ``(title, rows)``; a row is ``{"label", "mean", "lower", "upper", "seeds": [...]}``
    (``seeds`` may be empty). One horizontal dot-and-whisker panel per title, models top to bottom."""
    plt = _pyplot()
    labels = [r["label"] for r in panels[0][1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 2.2, _height(len(labels))), sharey=True,
                             squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        for y, row in enumerate(rows):
            color = COLORS[y % len(COLORS)]
            lower = row.get("lower")
            _dot_whisker(ax, y, row.get("seeds") or [], lower, row.get("upper"), row["mean"], color, color)
        _axis(ax, title, labels)
    axes[0][0].invert_yaxis()
    fig.suptitle("Repetition per model: diamond = mean; bar = 95% interval (arms: across training seeds, dots = the "
                 "seeds; references: over documents)", fontsize=9)
    fig.tight_layout()
    return fig


def _dot_whisker(ax, y: float, seeds, lower, upper, mean, seed_color: str, color: str) -> None:
    """One row: the seeds as dots, the interval as a bar (when finite), the mean as a diamond (when finite)."""
    if len(seeds):
        ax.plot(seeds, [y] * len(seeds), "o", ms=3, alpha=0.5, color=seed_color)
    if lower is not None and lower == lower:
        ax.plot([lower, upper], [y, y], "-", lw=2, color=color)
    if mean == mean:
        ax.plot([mean], [y], "D", ms=6, color=color)


def _axis(ax, title: str, labels: list[str]) -> None:
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.tick_params(axis="x", labelsize=8)


def effects_figure(panels: Sequence[tuple[str, list[dict]]]):
    """``panels``: ``(condition, rows)``; a row is ``{"label", "mean", "lower", "upper", "per_seed",
    "effect", "verdict"}`` (relative effects). One panel per condition, rows top to bottom."""
    plt = _pyplot()
    labels = [r["label"] for r in panels[0][1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 3.2, _height(len(labels))), sharey=True,
                             squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        ax.axvline(0, color="black", lw=0.8)
        for y, row in enumerate(rows):
            seeds = [100 * v for v in row["per_seed"] if v is not None]
            _dot_whisker(ax, y, seeds, 100 * row["lower"], 100 * row["upper"], 100 * row["mean"], "#555555", "#1f77b4")
            ax.plot([100 * row["effect"]], [y], "|", ms=14, mew=2, color="#d62728")
            ax.annotate(row["verdict"], (1.0, y), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7)
        _axis(ax, title, labels)
        ax.set_xlabel("relative change of A vs B (%)", fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle("Effects across training seeds: dots = seeds, diamond + bar = mean and 95% t interval, "
                 "red tick = the paper's effect (PPL gates: the +10% bound)", fontsize=9)
    fig.tight_layout()
    return fig


def training_figure(runs: dict[str, list[dict]], groups: dict[str, str]):
    """``runs``: ``{run: logged step dicts}``; ``groups``: ``{run: arm label}`` (one color per arm,
    every seed a line). Left: ``loss/ce``; right: the arm's extra terms."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    arms = list(dict.fromkeys(groups.values()))
    extra_terms = ("loss/focus", "loss/kd", "loss/repair")
    for run, logs in runs.items():
        color = COLORS[arms.index(groups[run]) % len(COLORS)]
        ce = [row["loss/ce"] for row in logs if "loss/ce" in row]
        if ce:
            left.plot(ce, color=color, alpha=0.7, lw=1)
        for style, term in zip(("-", "--", ":"), extra_terms):
            values = [row[term] for row in logs if term in row]
            if values:
                right.plot(values, style, color=color, alpha=0.7, lw=1)
        if not ce and logs:  # preference training: its own loss
            right.plot([row["loss"] for row in logs], "-.", color=color, alpha=0.7, lw=1)
    for i, arm in enumerate(arms):
        left.plot([], [], color=COLORS[i % len(COLORS)], label=arm)
    right.plot([], [], "k-", label="FOCUS term")
    right.plot([], [], "k--", label="KD term")
    right.plot([], [], "k:", label="RePAIR margin")
    right.plot([], [], "k-.", label="DPO loss")
    left.set_title("loss/ce of every run (one line per training seed)", fontsize=9)
    right.set_title("the extra terms (each arm's own, not comparable across arms)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    plt = _pyplot()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlapping_labels(fig) -> list[tuple[str, str]]:
    """Pairs of tick labels of one axis of ``fig`` whose drawn boxes overlap (matplotlib's own
    text extents after a draw)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    clashes = []
    for ax in fig.axes:
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            shown = [(t.get_text(), t.get_window_extent(renderer)) for t in ticks if t.get_visible() and t.get_text()]
            for i in range(len(shown)):
                for j in range(i + 1, len(shown)):
                    if shown[i][1].overlaps(shown[j][1]):
                        clashes.append((shown[i][0], shown[j][0]))
    return clashes
