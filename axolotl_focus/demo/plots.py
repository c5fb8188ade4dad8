"""The demo report's plots under ``plots/`` (matplotlib, optional)."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

from ..files import read_json
from .settings import RUNS

if TYPE_CHECKING:
    from .stages import Demo


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def make_demo_plots(demo: Demo, results: list[dict], t1: dict | None, tr: dict | None) -> list[tuple[str, str]]:
    """``plots/table1.png``, ``plots/training_loss.png`` and the evaluation's plots (copied); returns
    ``(relative path, description)`` pairs of the plots that exist."""
    if not has_matplotlib():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = demo.out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    if t1:
        rows = list(t1["rows"]) + (read_json(demo.dir("eval") / "table1_finetuned.json") or {}).get("rows", [])
        models = list(dict.fromkeys(r["model"] for r in rows))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key in zip(axes, ("crep", "rep-2")):
            for k, dec in enumerate(("greedy", "top-p 0.9")):
                vals = [next((r[key] for r in rows if r["model"] == m and r["decoding"] == dec), float("nan"))
                        for m in models]
                ax.bar([i + 0.4 * k for i in range(len(models))], vals, 0.4, label=dec)
            ax.set_xticks([i + 0.2 for i in range(len(models))], models, rotation=20, fontsize=8)
            ax.set_title(f"{'CREP (%)' if key == 'crep' else 'rep-2'}, {t1['new_tokens']} new tokens")
            ax.legend()
        fig.suptitle("Table 1 (micro): repetition before / after pruning")
        fig.tight_layout()
        fig.savefig(folder / "table1.png", dpi=110)
        plt.close(fig)
        made.append(("plots/table1.png", "Table 1: CREP and rep-2 per model and decoding"))
    if tr:
        fig, ax = plt.subplots(figsize=(8, 4))
        styles = ("-", "--", ":", "-.")
        for k, (run, rec) in enumerate(tr["runs"].items()):  # styles: runs that overlap stay visible
            ax.plot([r["loss"] for r in rec["logs"]], styles[k % len(styles)], label=RUNS[run][0], alpha=0.85)
        ax.set_xlabel("step")
        ax.set_ylabel("logged training loss")
        ax.set_title("axolotl train runs (each run's own objective; not comparable across methods)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "training_loss.png", dpi=110)
        plt.close(fig)
        made.append(("plots/training_loss.png", "logged loss per step of every fine-tuning run"))
    eval_plots = demo.dir("eval") / "plots"
    for name, desc in (("repetition.png", "CREP and rep-n per model (evaluation, top-p)"),
                       ("focus_reweighting.png", "FOCUS's reweighted target q~ against q (toy Zipf)")):
        if results and (eval_plots / name).is_file():
            shutil.copyfile(eval_plots / name, folder / name)
            made.append((f"plots/{name}", desc))
    return made
