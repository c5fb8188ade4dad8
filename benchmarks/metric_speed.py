"""Timing of the evaluation's model-free heavy parts (a benchmark, not a test).

* the distribution study's per-position statistics (``distribution_stats``: two top-p sets, two
  masked Pearson correlations over the vocabulary) on random Zipf-like distributions, per chunk
  of positions, at a LLaMA-3 vocabulary size;
* MAUVE (``compute_mauve`` on precomputed features, as the evaluation calls it) for p and q of
  ``--texts`` rows of ``--dim`` features, per seed (skipped without ``mauve-text``).

The rep-n / CREP / EAD timings are in degeneration_speed.py.

    python benchmarks/metric_speed.py [--vocab 128256] [--positions 256] [--chunk 64] [--texts 1000] [--dim 1280]
"""

from __future__ import annotations

import argparse
import time

import torch

from axolotl_focus.evaluate import distribution_stats


def zipf_like(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Softmax of Gumbel-perturbed Zipf log-weights: a random peaked distribution per row."""
    base = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    noise = -torch.log(-torch.log(torch.rand(n, vocab, generator=gen)))
    perm = torch.argsort(torch.rand(n, vocab, generator=gen), dim=-1)
    return torch.softmax(torch.gather(base.expand(n, -1) + 2 * noise, -1, perm), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    q = zipf_like(args.positions, args.vocab, gen)
    p = zipf_like(args.positions, args.vocab, gen)
    t0 = time.perf_counter()
    for c in range(0, args.positions, args.chunk):
        stats = distribution_stats(q[c : c + args.chunk], p[c : c + args.chunk], 0.9)
    dt = time.perf_counter() - t0
    print(f"distribution_stats: {args.positions} positions x V={args.vocab} in chunks of {args.chunk}: "
          f"{dt:.2f} s ({1e3 * dt / args.positions:.2f} ms/position; mean |H| {stats['count_head'].mean():.0f})")
    try:
        import mauve
    except ImportError:
        print("MAUVE: skipped (pip install 'axolotl-focus[eval]')")
        return
    feats_p = torch.randn(args.texts, args.dim, generator=gen).numpy()
    feats_q = (torch.randn(args.texts, args.dim, generator=gen) + 0.1).numpy()
    t0 = time.perf_counter()
    vals = [mauve.compute_mauve(p_features=feats_p, q_features=feats_q, seed=s, verbose=False).mauve
            for s in range(1, args.seeds + 1)]
    dt = time.perf_counter() - t0
    print(f"MAUVE: {args.texts} + {args.texts} texts x {args.dim} features: {dt / args.seeds:.2f} s per seed "
          f"(values {[round(v, 3) for v in vals]})")


if __name__ == "__main__":
    main()
