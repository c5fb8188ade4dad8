"""The plots (``plots/*.png``): repetition per model, FOCUS's reweighting of the teacher
distribution (Figure 2a), the distribution study (section 6) and rep-n against FOCUS's
(beta, gamma) (Figure 3a)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..train.losses import focus_weights
from .config import EXTRA, REP_NS
from .focus import toy_zipf
from .report import flat_metrics


def make_plots(results: list[dict], out_dir: str | os.PathLike, focus_params: dict | None = None,
               toy_params: Sequence[tuple[float, float]] = ((5.0, 1.0), (15.0, 1.0), (15.0, 3.0))) -> str | None:
    """PNG plots; returns a message (and writes nothing) when matplotlib is missing.

    ``repetition.png`` (CREP and rep-n per model, open-ended top-p), ``focus_reweighting.png``
    (q vs q~ for the toy Zipf distribution and, when a distribution study ran, real teacher
    distributions), ``distribution.png`` (AR/COR per model), ``focus_beta_gamma.png`` (rep-n
    against (beta, gamma) when at least two models have FOCUS parameters).
    """
    try:
        import matplotlib  # optional (the eval extra) and heavy

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional (the eval extra) and heavy
    except ImportError:
        return f"plots skipped: matplotlib is not installed ({EXTRA})"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [r["model"] for r in results]
    dec = next((d for r in results for d in r.get("open_ended", {}).get("decodings", {}) if d != "greedy"), "greedy")
    flat = [flat_metrics(r, "open_ended", dec) for r in results]
    if any("crep" in f for f in flat):
        _repetition_plot(plt, out / "repetition.png", names, flat, dec)
    _reweighting_plot(plt, out / "focus_reweighting.png", results, toy_params)
    dist = [(r["model"], r["distribution"]) for r in results if r.get("distribution")]
    if dist:
        _distribution_plot(plt, out / "distribution.png", dist)
    runs = sorted((p, f) for name, f in zip(names, flat) if (p := (focus_params or {}).get(name)) and "rep-3" in f)
    if len(runs) >= 2:
        _beta_gamma_plot(plt, out / "focus_beta_gamma.png", runs)
    return None


def _repetition_plot(plt, path: Path, names: list[str], flat: list[dict], dec: str) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.bar(names, [f.get("crep", float("nan")) for f in flat], color="tab:red")
    a1.set_ylabel("CREP (%)")
    a1.set_title(f"CREP ({dec})")
    width = 0.8 / len(REP_NS)
    for k, n in enumerate(REP_NS):
        a2.bar([i + k * width for i in range(len(names))], [f.get(f"rep-{n}", float("nan")) for f in flat],
               width, label=f"n={n}")
    a2.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    a2.set_ylabel("rep-n (%)")
    a2.set_title("rep-n (lower = more diverse)")
    a2.legend()
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _reweighting_plot(plt, path: Path, results: list[dict], toy_params: Sequence[tuple[float, float]]) -> None:
    examples = next((r["distribution"].get("teacher_examples") for r in results if r.get("distribution")), None) or []
    fig, axes = plt.subplots(1, 1 + len(examples), figsize=(5 * (1 + len(examples)), 4), squeeze=False)
    dists = [("toy Zipf (0.8 / 0.1 / tail)", toy_zipf(), 0.0)]
    dists += [(f"teacher, top-1 q = {e['top'][0]:.2f}", torch.tensor(e["top"], dtype=torch.float64), e["rest_mass"])
              for e in examples]
    for ax, (title, q, rest) in zip(axes[0], dists):
        # a real distribution is shown by its top-k; the rest of the vocabulary enters Z as one lump
        # (tiny q, so w ~ 1 there): Z = sum_topk w q + rest.
        x = range(1, len(q) + 1)
        ax.plot(x, q.numpy(), "k-o", ms=3, label="q")
        for beta, gamma in toy_params:
            wq = focus_weights(q, beta, gamma) * q
            ax.plot(x, (wq / (wq.sum() + rest)).numpy(), "-", label=f"q~ β={beta:g} γ={gamma:g}")
        ax.set_yscale("log")
        ax.set_xlabel("token rank")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _distribution_plot(plt, path: Path, dist: list[tuple[str, dict]]) -> None:
    keys = ["ar_head", "ar_tail", "cor_head", "cor_tail"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(dist)
    for k, (name, d) in enumerate(dist):
        ax.bar([i + k * width for i in range(len(keys))],
               [d.get(key) if d.get(key) is not None else float("nan") for key in keys], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
    ax.set_title("Agreement / correlation with the teacher (section 6)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _beta_gamma_plot(plt, path: Path, runs: list[tuple[tuple[float, float], dict]]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"β={b:g}\nγ={g:g}" for (b, g), _ in runs]
    for n in REP_NS:
        ax.plot(labels, [f[f"rep-{n}"] for _, f in runs], "-o", label=f"n={n}")
    ax.set_ylabel("rep-n (%)")
    ax.set_title("Unique n-gram vs FOCUS β, γ (Figure 3a)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
