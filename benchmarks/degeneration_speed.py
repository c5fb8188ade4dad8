"""Timing of the degeneration metrics on synthetic token ids (a benchmark, not a test).

Half of the texts are natural-ish (i.i.d. Zipf samples over the vocabulary), half are loops:
a Zipf prefix of 10-80 tokens, then a segment of 2-30 tokens repeated to the full length, each
loop token replaced by a random one with probability 2%. Seeded; pure Python generation.

    python benchmarks/degeneration_speed.py [--texts 1000] [--length 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

from axolotl_focus.degeneration import (
    LoopDetector,
    crep,
    ead,
    rep_ns,
    repetition_metrics,
    serving_degeneration,
)


def synthetic_texts(n_texts: int, length: int, vocab: int = 32000, seed: int = 0) -> list[list[int]]:
    """Seeded mix of Zipf texts (first half) and noisy loops (second half)."""
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / (k + 1) ** 1.1 for k in range(vocab)))
    ids = range(vocab)

    def zipf(k: int) -> list[int]:
        return rng.choices(ids, cum_weights=cum, k=k)

    texts = [zipf(length) for _ in range(n_texts // 2)]
    for _ in range(n_texts - n_texts // 2):
        prefix = zipf(rng.randint(10, 80))
        seg = zipf(rng.randint(2, 30))
        body = [seg[i % len(seg)] for i in range(length - len(prefix))]
        body = [rng.randrange(vocab) if rng.random() < 0.02 else x for x in body]
        texts.append(prefix + body)
    return texts


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--length", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    texts = synthetic_texts(args.texts, args.length)
    n, r = len(texts), args.repeats
    print(f"{n} texts x {args.length} tokens (half Zipf, half noisy loops); best of {r} runs")

    t, v = best_of(lambda: crep(texts), r)
    print(f"CREP                      {t:7.3f} s   (CREP = {v:.1f})")
    t, v = best_of(lambda: rep_ns(texts), r)
    print(f"rep-3..6                  {t:7.3f} s   ({', '.join(f'{x:.1f}' for x in v.values())})")
    t, v = best_of(lambda: ead(texts, 32000), r)
    print(f"EAD                       {t:7.3f} s   (EAD = {v:.3f})")
    t, v = best_of(lambda: repetition_metrics(texts, 32000), r)
    print(f"CREP + rep-3..6 + EAD     {t:7.3f} s")

    def stream() -> int:
        fired = 0
        for text in texts:
            det = LoopDetector()
            for tok in text:
                if det.update(tok):
                    fired += 1
                    break
        return fired

    t, v = best_of(stream, r)
    total = sum(len(x) for x in texts)
    print(f"LoopDetector token-by-token {t:5.3f} s   ({v} fired; <= {1e6 * t / total:.2f} us/token)")
    t, v = best_of(lambda: serving_degeneration(texts, args.length), r)
    share = f"rate {v.rate_pct:.1f}%, tokens {v.token_share_pct:.1f}%"
    print(f"serving_degeneration      {t:7.3f} s   ({share})")


if __name__ == "__main__":
    main()
