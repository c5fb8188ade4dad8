"""Hand-computed checks of the degeneration metrics (axolotl_focus.degeneration)."""

from __future__ import annotations

import random

import pytest

from axolotl_focus.degeneration import (
    LoopDetector,
    _suffix_runs,
    coverage,
    crep,
    ead,
    loop_at_tail,
    rep_n,
    rep_ns,
    repetition_metrics,
    serving_degeneration,
    tail_loop,
)

PREFIX = list(range(100, 110))  # 10 distinct tokens
SEG = [1, 2, 3, 4, 5, 6]
LOOP = PREFIX + SEG * 10  # T = 70, copies start at 10, 16, ..., 64


def broken_loop(pos: int) -> list[int]:
    t = list(LOOP)
    t[pos] = 99
    return t


# one 5-token phrase repeated once inside 55 distinct tokens (T = 60)
PHRASE = [1, 2, 3, 4, 5]
NATURAL = list(range(100, 120)) + PHRASE + list(range(120, 140)) + PHRASE + list(range(140, 150))


def assert_result(res, cov, r, seg, start, onset, degenerate):
    assert res.coverage == pytest.approx(cov, abs=1e-12)
    got = (res.r, res.segment, res.start, res.onset, res.is_degenerate)
    assert got == (r, tuple(seg), start, onset, degenerate)


# ------------------------------------------------------------------------------------ coverage


def test_exact_loop():
    # g* = (1,2,3,4) at 10,16,...,64; d* = 6; s1 = 10, s2 = 16; copies of SEG in t[16:]: 9
    res = coverage(LOOP)
    assert_result(res, 54 / 70, 4, SEG, 10, 16, True)
    assert res.period == 6
    assert LOOP[: res.onset] == PREFIX + SEG  # RePAIR prefix: text before the loop + first copy


def test_loop_with_one_changed_token():
    # token 37 (copy 4, offset 3) changed: (1,2,3,4) still occurs 9 times (at 34 it is broken),
    # gaps 6,6,6,12,6,6,6,6 -> d* = 6, s1 = 10; the broken copy at 34 is skipped, the scan
    # re-aligns at 40: copies at 16,22,28,40,46,52,58,64 -> 8 x 6 / 70
    assert_result(coverage(broken_loop(37)), 48 / 70, 4, SEG, 10, 16, True)
    # change inside the second copy (pos 20, offset 4): g* positions unchanged, s2 = 16 is still
    # the onset although the copy there is broken; copies 22..64 -> 8
    assert_result(coverage(broken_loop(20)), 48 / 70, 4, SEG, 10, 16, True)


def test_natural_text_with_one_repeated_phrase():
    # (1,2,3,4) at 20 and 45: d* = 25, p = t[20:45]; only 15 tokens after 45 -> no copy -> 0
    assert_result(coverage(NATURAL), 0.0, None, (), None, None, False)


def test_period_longer_than_r_max():
    # 5 distinct + a 25-token segment x 4 (T = 105): d* = 25 > 16, s1 = 5, s2 = 30, 3 copies
    t = list(range(100, 105)) + list(range(1, 26)) * 4
    assert_result(coverage(t), 75 / 105, 4, range(1, 26), 5, 30, True)


def test_period_shorter_than_r():
    # period 2 under 4-grams: (1,2,1,2) is top (9x) with gap 2 -> p = [1,2], s1 = 4, 9 copies in t[6:]
    t = [100, 101, 102, 103] + [1, 2] * 10
    assert_result(coverage(t), 18 / 24, 4, [1, 2], 4, 6, True)
    # 5 equal tokens: r = 4 only (|t| >= r + 1), (7,7,7,7) at 0,1 -> p = [7], 4 copies in t[1:]
    assert_result(coverage([7] * 5), 4 / 5, 4, [7], 0, 1, True)


def test_short_and_empty_texts():
    for t in ([], [3], [1, 1, 1, 1], [1, 2, 1, 2]):  # |t| < r_min + 1 = 5: every r skipped
        assert_result(coverage(t), 0.0, None, (), None, None, False)


def test_tie_rules():
    # r-gram ties -> earliest first occurrence: (5,6,7,8), (6,7,8,9), (1,2,3,4) all occur twice;
    # (5,6,7,8) wins: d* = 5, p = [5..9], 1 copy -> 5/19 (choosing (1,2,3,4) would give 0)
    t = [5, 6, 7, 8, 9] * 2 + [1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert_result(coverage(t), 5 / 19, 4, [5, 6, 7, 8, 9], 0, 5, False)
    # gap-mode ties -> smallest gap: (1,2,3,4) at 0, 4, 10; gaps 4 and 6 once each -> d* = 4,
    # p = [1,2,3,4], copies at 4 and 10 -> 8/14 (d* = 6 would give 0)
    t = [1, 2, 3, 4, 1, 2, 3, 4, 9, 9, 1, 2, 3, 4]
    assert_result(coverage(t), 8 / 14, 4, [1, 2, 3, 4], 0, 4, True)


def test_threshold_and_r_range_and_inputs():
    assert coverage(LOOP, threshold=0.8).is_degenerate is False
    assert coverage(LOOP, threshold=54 / 70).is_degenerate is True  # >= threshold
    # r in [17, 20]: the 17-gram starting at 10 occurs at 10,...,52 -> same segment and coverage
    assert_result(coverage(LOOP, r_min=17, r_max=20), 54 / 70, 17, SEG, 10, 16, True)
    np = pytest.importorskip("numpy")
    assert coverage(np.array(LOOP)) == coverage(LOOP)
    with pytest.raises(ValueError):
        coverage(LOOP, r_min=5, r_max=4)
    with pytest.raises(TypeError):
        coverage("abc abc abc")


def test_crep():
    texts = [LOOP, NATURAL, broken_loop(37), [], [7] * 5]  # coverages .771, 0, .686, 0, .8
    assert crep(texts) == pytest.approx(60.0)
    assert crep(texts, threshold=0.7) == pytest.approx(40.0)
    assert crep([]) == 0.0


# ------------------------------------------------------------------------- streaming detector


def feed(det: LoopDetector, tokens: list[int]) -> int | None:
    for i, x in enumerate(tokens):
        if det.update(x):
            return i + 1
    return None


def test_detector_exact_loop_fires_at_hand_computed_point():
    # tail period 6: L_6 = n - 10 >= 3 * 6 first at n = 28, where coverage = 12/28 >= 0.3
    for kw in ({"min_tokens": 0, "check_every": 1}, {}):
        det = LoopDetector(**kw)
        assert feed(det, LOOP) == 28
        assert det.fired_at == 28 and det.established and det.n_confirmations == 1
        assert det.result.coverage == pytest.approx(12 / 28) and det.result.onset == 16
    assert loop_at_tail(LOOP[:28]) and not loop_at_tail(LOOP[:27])
    assert tail_loop(LOOP[:28]) == (6, 18)


def test_detector_loop_with_changed_token_refires_after_three_clean_copies():
    # change at 20 breaks the period-6 runs at 20 and 26; L_6 = n - 21 >= 18 at n = 39, where
    # coverage(t[:39]) = 2 copies (22, 28) x 6 / 39 >= 0.3
    t = broken_loop(20)
    det = LoopDetector()
    assert feed(det, t) == 39
    assert det.result.coverage == pytest.approx(12 / 39)
    assert det.n_confirmations == 1


def test_detector_rate_limits_failed_confirmations():
    # 40-token natural prefix: tail rule first holds at n = 58 but coverage 12/58 < 0.3.
    # check_every=1: first success at n = 70 (24/70), 13 confirmations (58..70);
    # check_every=8: checks at 58 (12/58), 66 (18/66), 74 (24/74) -> fires at 74.
    t = list(range(100, 140)) + SEG * 15
    det = LoopDetector(check_every=1)
    assert feed(det, t) == 70 and det.n_confirmations == 13
    assert det.result.coverage == pytest.approx(24 / 70)
    det = LoopDetector(check_every=8)
    assert feed(det, t) == 74 and det.n_confirmations == 3
    det.update([1, 2, 3])  # sticky
    assert det.established and det.fired_at == 74 and len(det.tokens) == 77
    det.reset()
    assert not det.established and det.tokens == []


def test_detector_never_fires_on_natural_text():
    rng = random.Random(0)
    texts = [NATURAL, [rng.randrange(1000) for _ in range(2000)], list(range(500))]
    for t in texts:
        det = LoopDetector(min_tokens=0, check_every=1)
        assert feed(det, t) is None and det.n_confirmations == 0
        assert not loop_at_tail(t)


def test_detector_agrees_with_coverage_and_static_tail_rule():
    rng = random.Random(1)
    for period in (1, 2, 3, 7, 16, 25, 40):
        prefix = [rng.randrange(1000, 2000) for _ in range(rng.randint(0, 60))]
        seg = [rng.randrange(10) for _ in range(period)]
        body = [seg[i % period] for i in range(6 * period + 30)]
        if period > 3:
            body[period + 1] = 999  # a changed token early in the loop
        t = prefix + body
        det = LoopDetector()
        for m, x in enumerate(t, start=1):
            det.update(x)
            assert det._runs == _suffix_runs(t[:m], det.max_period)
            if det.established:
                break
        assert det.established, period
        n = det.fired_at
        assert coverage(t[:n]).coverage >= 0.3
        assert loop_at_tail(t[:n])


# ------------------------------------------------------------------------------- rep-n / EAD


def test_rep_n_hand_examples():
    a, b, short = [1, 2, 3, 1, 2, 3], [1, 2, 3, 4], [1, 2]
    assert rep_n([a], 3) == pytest.approx(25.0)  # 4 trigrams, 3 unique
    assert rep_n([a, b], 3) == pytest.approx(12.5)  # (25 + 0) / 2
    assert rep_n([a, b, short], 3) == pytest.approx(12.5)  # < n tokens: left out
    assert rep_n([a], 4) == 0.0  # 3 distinct 4-grams
    assert rep_n([[5] * 5], 3) == pytest.approx(100 * 2 / 3)  # 3 trigrams, 1 unique
    assert rep_n([short], 3) == 0.0 and rep_n([], 3) == 0.0
    expected = {3: (25 + 75) / 2, 4: (0 + 200 / 3) / 2, 5: 25.0, 6: 0.0}
    assert rep_ns([a, [5] * 6]) == pytest.approx(expected)


def test_ead_closed_form_and_direct():
    # N = 3 distinct, C = 5 tokens, V = 4: 3 / (4 (1 - (3/4)^5)) = 768 / 781 (corpus level)
    assert ead([[1, 2], [2, 3, 3]], 4) == pytest.approx(768 / 781, rel=1e-12)
    rng = random.Random(2)
    texts = [[rng.randrange(50_000) for _ in range(rng.randint(0, 300))] for _ in range(50)]
    n = len({x for t in texts for x in t})
    c = sum(map(len, texts))
    for v in (50_257, 128_256):
        direct = n / (v * (1 - ((v - 1) / v) ** c))
        assert ead(texts, v) == pytest.approx(direct, rel=1e-9)
    assert ead([[0, 0, 0]], 1) == 1.0
    assert ead([[], []], 10) == 0.0
    with pytest.raises(ValueError):
        ead([[1]], 0)


# ------------------------------------------------------------------------------------ serving


def test_serving_degeneration_hand_set():
    a = PREFIX + SEG * 5  # 40 tokens, capped, period-6 loop at the tail (fires at 28)
    b = list(range(200, 240))  # 40 tokens, capped, natural
    c = [7] * 12  # looping but stopped before the cap: not counted
    d = list(range(100, 105)) + [1, 2, 3] * 8 + list(range(200, 211))  # loop in the middle
    assert len(a) == len(b) == len(d) == 40
    assert coverage(d).coverage == pytest.approx(21 / 40)  # CREP flags d, serving does not
    res = serving_degeneration([a, b, c, d], max_new_tokens=40)
    assert res.flags == (True, False, False, False)
    assert (res.n_degenerate, res.n_texts, res.degenerate_tokens, res.total_tokens) == (1, 4, 40, 132)
    assert res.rate_pct == pytest.approx(25.0)
    assert res.token_share_pct == pytest.approx(100 * 40 / 132)
    assert res.stoppable_tokens == 12
    # a generation ending with EOS did not hit the cap
    e = [0] * 40
    assert serving_degeneration([e], 40).flags == (True,)
    assert serving_degeneration([e], 40, eos_id=0).flags == (False,)
    assert serving_degeneration([], 40).rate_pct == 0.0


def test_repetition_metrics_bundle():
    texts = [LOOP, NATURAL, [1, 2, 3, 1, 2, 3]]
    out = repetition_metrics(texts, vocab_size=1000)
    assert out["crep"] == pytest.approx(100 / 3)
    assert out["ead"] == pytest.approx(ead(texts, 1000))
    for n in (3, 4, 5, 6):
        assert out[f"rep-{n}"] == pytest.approx(rep_n(texts, n))
    assert list(out) == ["crep", "rep-3", "rep-4", "rep-5", "rep-6", "ead"]
