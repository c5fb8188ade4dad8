"""Degeneration metrics on token ids: Coverage / CREP, a streaming loop detector, rep-n, EAD and
the serving degeneration rate. Shared by RePAIR pair mining and the evaluation.

Every function takes model token ids: a list/tuple of ints or a 1-D array/tensor (anything with
``.tolist()``). Pure Python (``dict``/``Counter`` over tuples); no numpy or torch needed.

Coverage (paper section 3, Algorithm 1 of appendix F), for a text ``t`` of ``T`` tokens
-------------------------------------------------------------------------------------
For each ``r`` in ``[r_min, r_max]`` with ``T >= r + 1`` (shorter r are skipped, as in line 6):

1. ``g*`` = the most frequent r-gram; occurrences may overlap, positions are all start indices.
   Ties: the r-gram whose first occurrence is earliest. If ``g*`` occurs once the text has no
   repeated r-gram, so none of length ``> r`` either: the sweep stops (coverage 0 for all
   remaining r).
2. ``d*`` = mode of the gaps between consecutive positions of ``g*``; ties: the smallest gap.
3. ``s1`` = the first position whose gap to the next position equals ``d*``; ``s2 = s1 + d*``;
   the candidate segment is ``p = t[s1:s2]`` (``len(p) = d*``, which may be ``< r`` for
   self-overlapping loops such as ``a a a a``, or ``> r_max`` for long sentence loops).
4. GLOBALCOVERAGE(p, u = t[s2:], t) = ``d* * K / T`` where ``K`` is the maximum number of
   non-overlapping exact occurrences of ``p`` inside ``t[s2:]``. ``K`` is computed greedily left
   to right (optimal for equal-length intervals): scan ``j`` from ``s2``; when ``t[j:j+d*] == p``
   count it and jump to ``j + d*``; otherwise advance to ``j + 1``. So a copy broken by a changed
   token is skipped (it contributes nothing) and the scan re-aligns on the next exact copy
   wherever it starts; a truncated final copy (fewer than ``d*`` tokens left) is not counted.
   The first copy ``t[s1:s2]`` itself is not counted (only the tail ``u``) and the denominator
   is the full length ``T`` (prefix included). The paper's ``s_{j:j+N-1} ~ r`` is read as exact
   equality; tolerance to sampled variations comes from skipping broken copies.

``coverage`` = the maximum over r (ties: smallest r), 0 when no r yields a repeat. The text is
degenerate when ``coverage >= threshold`` (paper: 0.3). Example: 10 distinct tokens followed by
a 6-token segment repeated 10 times (T = 70): ``s1 = 10``, ``s2 = 16``, ``K = 9``, coverage
``54 / 70``.

Loop onset: ``onset = s2`` of the best r, the index where the second copy of the segment starts
(the first repeat), even when that particular copy was altered and not counted. The prefix
``tokens[:onset]`` contains the text before the loop plus one full copy of the segment; RePAIR
regenerates from it (paper 4.2.1: prefix ``s_{0:(r_i - 1)}`` with ``r_i`` the first repetition).
``onset`` is ``None`` when the coverage is 0.

Streaming / tail rule
---------------------
The d-periodic suffix of ``t`` is the longest suffix ``s`` with ``s[j] == s[j - d]`` for every
``j >= d``; let ``L_d`` be its length. The tail rule holds at length ``n`` when some period
``1 <= d <= max_period`` has ``L_d >= min_repeats * d`` (at least ``min_repeats`` consecutive
copies) and ``L_d >= threshold * n`` (the loop covers enough of the text), *and* the full
``coverage(t) >= threshold``. :class:`LoopDetector` maintains ``L_d - d`` incrementally
(per token: work proportional to the occurrences of the new token among the last
``max_period`` tokens) and runs the full coverage only when the cheap periodic test passes, at
most once per ``check_every`` tokens after a failed confirmation - so when it fires, the coverage
of the sequence seen so far is ``>= threshold`` by construction. :func:`loop_at_tail` is the same
predicate on a finished sequence. The periodic test is exact: a changed token inside the last
``min_repeats`` copies resets it; the detector then needs ``min_repeats`` clean copies after the
change (once fired it stays fired until :meth:`LoopDetector.reset`).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = [
    "CoverageResult",
    "coverage",
    "crep",
    "loop_unit",
    "LoopDetector",
    "tail_loop",
    "loop_at_tail",
    "rep_n",
    "rep_ns",
    "ead",
    "ServingDegeneration",
    "serving_degeneration",
    "repetition_metrics",
]

DEFAULT_THRESHOLD = 0.3


def _as_tokens(tokens: Any) -> list[int]:
    """Token ids as a Python list; accepts lists, tuples, numpy arrays and torch tensors (1-D)."""
    if isinstance(tokens, (str, bytes)):
        raise TypeError("expected token ids, got a string")
    seq = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
    if not isinstance(seq, list):  # 0-d array
        raise ValueError("expected a 1-D sequence of token ids")
    if seq and isinstance(seq[0], (list, tuple)):
        raise ValueError("expected a 1-D sequence of token ids, got a nested sequence")
    return seq


def _check_range(r_min: int, r_max: int) -> None:
    if r_min < 1 or r_max < r_min:
        raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")


# --------------------------------------------------------------------------------------------
# Coverage and CREP
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoverageResult:
    """Best coverage over r of one text (see the module docstring for the exact definition).

    ``coverage``: in ``[0, 1]``; ``r``: the n-gram length that achieved it (``None`` if 0);
    ``segment``: the repeated segment ``p`` (``()`` if none); ``start``: ``s1``, where the first
    copy of ``p`` starts; ``onset``: ``s2 = s1 + len(p)``, where the first repeat starts
    (RePAIR prefix = ``tokens[:onset]``); ``is_degenerate``: ``coverage >= threshold``.
    """

    coverage: float
    r: int | None
    segment: tuple[int, ...]
    start: int | None
    onset: int | None
    is_degenerate: bool

    @property
    def period(self) -> int:
        """Length of the repeated segment (0 when there is none)."""
        return len(self.segment)


def _count_copies(t: list[int], p: list[int], start: int, cands: list[int] | None) -> int:
    """Max number of non-overlapping exact occurrences of ``p`` in ``t[start:]`` (greedy).

    ``cands`` are all candidate start indices in increasing order (every occurrence of ``p``
    must start at one of them); ``None`` means every index where ``t[j] == p[0]``.
    """
    d, last = len(p), len(t) - len(p)
    if cands is None:
        first = p[0]
        cands = [j for j in range(start, last + 1) if t[j] == first]
    count, nxt = 0, start
    for j in cands:
        if j < nxt:
            continue
        if j > last:
            break
        if t[j : j + d] == p:
            count += 1
            nxt = j + d
    return count


def coverage(
    tokens: Sequence[int] | Any,
    r_min: int = 4,
    r_max: int = 16,
    threshold: float = DEFAULT_THRESHOLD,
) -> CoverageResult:
    """Coverage of the most repeated segment (paper section 3 / Algorithm 1), best over r."""
    _check_range(r_min, r_max)
    t = _as_tokens(tokens)
    n = len(t)
    best_cov, best = 0.0, (None, (), None, None)
    for r in range(r_min, min(r_max, n - 1) + 1):  # Algorithm 1 line 6: skip if |t| < r + 1
        grams = list(zip(*[t[i:] for i in range(r)]))
        counts = Counter(grams)
        top_count = max(counts.values())
        if top_count < 2:  # no repeated r-gram => no repeated longer n-gram either
            break
        top = next(g for g, c in counts.items() if c == top_count)  # earliest first occurrence
        pos = [i for i, g in enumerate(grams) if g == top]
        gaps = [b - a for a, b in zip(pos, pos[1:])]
        gap_counts = Counter(gaps)
        mode_count = max(gap_counts.values())
        d = min(g for g, c in gap_counts.items() if c == mode_count)
        s1 = pos[gaps.index(d)]
        s2 = s1 + d
        p = t[s1:s2]
        # if d >= r, p starts with the r-gram g*, so its copies start at positions of g*
        copies = _count_copies(t, p, s2, [j for j in pos if j >= s2] if d >= r else None)
        cov = copies * d / n
        if cov > best_cov:
            best_cov, best = cov, (r, tuple(p), s1, s2)
    r_best, seg, s1, s2 = best
    return CoverageResult(best_cov, r_best, seg, s1, s2, best_cov >= threshold)


def loop_unit(tokens: Sequence[int] | Any, threshold: float = DEFAULT_THRESHOLD) -> tuple[int, ...] | None:
    """The loop of a degenerate text: its repeated segment (:func:`coverage`) as the smallest of its
    cyclic rotations, so that the same loop entered at another phase (``a b c a b c`` / ``b c a b c a``)
    gives the same unit; None when the text is not degenerate."""
    result = coverage(tokens, threshold=threshold)
    if not result.is_degenerate:
        return None
    seg = result.segment
    return min(seg[i:] + seg[:i] for i in range(len(seg)))


def crep(
    texts: Iterable[Sequence[int] | Any],
    threshold: float = DEFAULT_THRESHOLD,
    r_min: int = 4,
    r_max: int = 16,
) -> float:
    """CREP = 100 x the fraction of texts with ``coverage >= threshold`` (0.0 for no texts)."""
    flags = [coverage(t, r_min, r_max, threshold).is_degenerate for t in texts]
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


# --------------------------------------------------------------------------------------------
# Tail rule and streaming detector
# --------------------------------------------------------------------------------------------


def _tail_ok(periodic_runs: dict[int, int], n: int, threshold: float, min_repeats: int) -> int | None:
    """Smallest period d whose periodic suffix ``L_d = run + d`` passes the tail rule."""
    need = threshold * n
    ok = [d for d, run in periodic_runs.items() if run + d >= min_repeats * d and run + d >= need]
    return min(ok) if ok else None


def _suffix_runs(t: list[int], max_period: int) -> dict[int, int]:
    """For each d in [1, max_period]: number of trailing j >= d with ``t[j] == t[j - d]`` (> 0)."""
    n, runs = len(t), {}
    for d in range(1, min(max_period, n - 1) + 1):
        j = n - 1
        while j >= d and t[j] == t[j - d]:
            j -= 1
        if j < n - 1:
            runs[d] = n - 1 - j
    return runs


def tail_loop(
    tokens: Sequence[int] | Any,
    threshold: float = DEFAULT_THRESHOLD,
    min_repeats: int = 3,
    max_period: int = 64,
) -> tuple[int, int] | None:
    """Cheap periodic part of the tail rule: ``(d, L_d)`` for the smallest qualifying period.

    ``L_d`` is the length of the d-periodic suffix; qualifies when ``L_d >= min_repeats * d`` and
    ``L_d >= threshold * len(tokens)``. ``None`` when no period up to ``max_period`` qualifies.
    """
    t = _as_tokens(tokens)
    runs = _suffix_runs(t, max_period)
    d = _tail_ok(runs, len(t), threshold, min_repeats)
    return None if d is None else (d, runs[d] + d)


def loop_at_tail(
    tokens: Sequence[int] | Any,
    threshold: float = DEFAULT_THRESHOLD,
    r_min: int = 4,
    r_max: int = 16,
    min_repeats: int = 3,
    max_period: int = 64,
) -> bool:
    """The full tail rule on a finished sequence: :func:`tail_loop` and ``coverage >= threshold``.

    This is exactly the predicate :class:`LoopDetector` confirms before it fires.
    """
    t = _as_tokens(tokens)
    if tail_loop(t, threshold, min_repeats, max_period) is None:
        return False
    return coverage(t, r_min, r_max, threshold).is_degenerate


class LoopDetector:
    """Streaming detector: tells during generation that a repetition loop is established.

    Feed generated tokens with :meth:`update`; it returns ``True`` (and stays ``True``) once the
    tail rule of the module docstring holds at some length ``n >= min_tokens``. Per token the
    cost is O(occurrences of that token among the last ``max_period`` tokens); the full
    :func:`coverage` runs only when the periodic test passes, and after a failed confirmation
    not again for ``check_every`` tokens. Loops with a period above ``max_period`` are not seen.
    """

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        r_min: int = 4,
        r_max: int = 16,
        min_tokens: int = 16,
        min_repeats: int = 3,
        max_period: int = 64,
        check_every: int = 8,
    ) -> None:
        _check_range(r_min, r_max)
        if min_repeats < 2 or max_period < 1 or check_every < 1:
            raise ValueError("need min_repeats >= 2, max_period >= 1, check_every >= 1")
        self.threshold, self.r_min, self.r_max = threshold, r_min, r_max
        self.min_tokens, self.min_repeats = min_tokens, min_repeats
        self.max_period, self.check_every = max_period, check_every
        self.reset()

    def reset(self) -> None:
        """Forget all tokens (start a new generation)."""
        self.tokens: list[int] = []
        self._occ: dict[int, deque[int]] = {}  # token -> its positions among the last max_period
        self._runs: dict[int, int] = {}  # d -> trailing j with t[j] == t[j-d] (only > 0 kept)
        self._next_check = 0
        self.fired_at: int | None = None  # sequence length at which the loop was confirmed
        self.result: CoverageResult | None = None  # coverage of tokens[:fired_at]
        self.n_confirmations = 0  # how many full coverage computations were run

    @property
    def established(self) -> bool:
        """Whether a loop has been confirmed (sticky until :meth:`reset`)."""
        return self.fired_at is not None

    def update(self, new_tokens: int | Sequence[int] | Any) -> bool:
        """Append one token id or a sequence of them; return :attr:`established`."""
        if isinstance(new_tokens, int) or (hasattr(new_tokens, "ndim") and new_tokens.ndim == 0):
            new_tokens = [int(new_tokens)]
        for x in _as_tokens(new_tokens):
            n = len(self.tokens)  # index of x
            occ = self._occ.get(x)
            runs: dict[int, int] = {}
            if occ is None:
                occ = self._occ[x] = deque()
            else:
                lo = n - self.max_period
                while occ and occ[0] < lo:
                    occ.popleft()
                old = self._runs
                for p in occ:
                    runs[n - p] = old.get(n - p, 0) + 1
            occ.append(n)
            self.tokens.append(x)
            self._runs = runs
            n += 1
            if (
                self.fired_at is None
                and n >= self.min_tokens
                and n >= self._next_check
                and _tail_ok(runs, n, self.threshold, self.min_repeats) is not None
            ):
                self.n_confirmations += 1
                res = coverage(self.tokens, self.r_min, self.r_max, self.threshold)
                if res.is_degenerate:
                    self.fired_at, self.result = n, res
                else:
                    self._next_check = n + self.check_every
        return self.established


# --------------------------------------------------------------------------------------------
# rep-n and EAD
# --------------------------------------------------------------------------------------------


def sequence_rep(t: list[int], n: int) -> float | None:
    """``1 - |unique n-grams| / |n-grams|`` of one token sequence (not x100); None when it has
    fewer than ``n`` tokens."""
    m = len(t) - n + 1
    if m <= 0:
        return None
    return 1.0 - len(set(zip(*[t[i:] for i in range(n)]))) / m


def rep_n(texts: Iterable[Sequence[int] | Any], n: int) -> float:
    """rep-n (DITTO / the paper): mean over continuations of ``1 - |unique n-grams| / |n-grams|``,
    x100, on model tokens. Continuations with fewer than ``n`` tokens have no n-gram and are left
    out of the average; 0.0 when no continuation has ``n`` tokens."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    vals = [v for v in (sequence_rep(_as_tokens(t), n) for t in texts) if v is not None]
    return 100.0 * sum(vals) / len(vals) if vals else 0.0


def rep_ns(texts: Iterable[Sequence[int] | Any], ns: Sequence[int] = (3, 4, 5, 6)) -> dict[int, float]:
    """:func:`rep_n` for each n in ``ns`` (the paper's table reports n = 3..6)."""
    toks = [_as_tokens(t) for t in texts]
    return {n: rep_n(toks, n) for n in ns}


def ead(texts: Iterable[Sequence[int] | Any], vocab_size: int) -> float:
    """Expectation-Adjusted Distinct-1 (Liu et al., 2022), corpus level.

    ``N / (V * (1 - ((V - 1) / V) ** C))`` with ``N`` distinct token ids and ``C`` tokens over all
    texts together (not a per-text average), ``V = vocab_size`` (the tokenizer's vocabulary size).
    The expectation term is computed as ``-expm1(C * log1p(-1 / V))``. 0.0 for no tokens.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    distinct: set[int] = set()
    total = 0
    for t in texts:
        seq = _as_tokens(t)
        distinct.update(seq)
        total += len(seq)
    if total == 0:
        return 0.0
    expected = 1.0 if vocab_size == 1 else -math.expm1(total * math.log1p(-1.0 / vocab_size))
    return len(distinct) / (vocab_size * expected)


# --------------------------------------------------------------------------------------------
# Serving degeneration rate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingDegeneration:
    """Serving degeneration (percentages are x100).

    ``rate_pct``: share of generations that hit the cap with a loop at the tail;
    ``token_share_pct``: share of all generated tokens spent in those generations;
    ``stoppable_tokens``: tokens of those generations after the point where a
    :class:`LoopDetector` with the same settings (``min_tokens``, ``check_every`` as given) fires,
    i.e. what early stopping would have saved; ``flags``: per-generation verdicts.
    """

    rate_pct: float
    token_share_pct: float
    n_degenerate: int
    n_texts: int
    degenerate_tokens: int
    total_tokens: int
    stoppable_tokens: int
    flags: tuple[bool, ...]


def serving_degeneration(
    texts: Iterable[Sequence[int] | Any],
    max_new_tokens: int,
    threshold: float = DEFAULT_THRESHOLD,
    r_min: int = 4,
    r_max: int = 16,
    min_repeats: int = 3,
    max_period: int = 64,
    eos_id: int | None = None,
    min_tokens: int = 16,
    check_every: int = 8,
) -> ServingDegeneration:
    """Degeneration rate in serving: generations that hit ``max_new_tokens`` with a loop at the
    tail (:func:`loop_at_tail`), and the share of generated tokens they consume.

    ``texts`` are the generated continuations (prompt excluded). A generation hit the cap iff it
    has ``>= max_new_tokens`` tokens and (when ``eos_id`` is given) does not end with ``eos_id``.
    """
    flags: list[bool] = []
    deg_tokens = total = stoppable = 0
    for t in texts:
        seq = _as_tokens(t)
        total += len(seq)
        capped = len(seq) >= max_new_tokens and not (eos_id is not None and seq and seq[-1] == eos_id)
        bad = capped and loop_at_tail(seq, threshold, r_min, r_max, min_repeats, max_period)
        flags.append(bad)
        if bad:
            deg_tokens += len(seq)
            det = LoopDetector(threshold, r_min, r_max, min_tokens, min_repeats, max_period, check_every)
            det.update(seq)
            stoppable += len(seq) - det.fired_at if det.fired_at is not None else 0
    n_deg = sum(flags)
    return ServingDegeneration(
        rate_pct=100.0 * n_deg / len(flags) if flags else 0.0,
        token_share_pct=100.0 * deg_tokens / total if total else 0.0,
        n_degenerate=n_deg,
        n_texts=len(flags),
        degenerate_tokens=deg_tokens,
        total_tokens=total,
        stoppable_tokens=stoppable,
        flags=tuple(flags),
    )


def repetition_metrics(
    texts: Iterable[Sequence[int] | Any],
    vocab_size: int,
    threshold: float = DEFAULT_THRESHOLD,
    ns: Sequence[int] = (3, 4, 5, 6),
) -> dict[str, float]:
    """CREP, rep-n for ``ns`` and EAD-1 in one pass: keys ``crep``, ``rep-3`` ..., ``ead``."""
    toks = [_as_tokens(t) for t in texts]
    out = {"crep": crep(toks, threshold)}
    out.update({f"rep-{n}": v for n, v in rep_ns(toks, ns).items()})
    out["ead"] = ead(toks, vocab_size)
    return out
