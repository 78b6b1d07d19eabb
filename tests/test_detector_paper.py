"""The paper's offline detector on hand-made id sequences, and its streaming twin on random ones."""

import random

import pytest

from repguard.detect import LoopDetector, find_repetition

G = list(range(100, 110))  # a 10-gram of distinct ids


def filler(n, start=1000):
    return list(range(start, start + n))  # never repeats


def test_three_equally_spaced_copies_are_found_with_their_positions():
    ids = filler(5) + G + filler(3, 2000) + G + filler(3, 3000) + G + filler(4, 4000)
    hit = find_repetition(ids)
    assert hit is not None
    assert hit.ngram == tuple(G)
    assert (hit.p1, hit.p2, hit.p3) == (5, 18, 31)
    assert hit.onset == 17 and hit.period == 13


def test_two_copies_are_not_a_loop():
    assert find_repetition(filler(7) + G + filler(5, 2000) + G + filler(9, 3000)) is None


def test_unequal_spacing_is_rejected():
    ids = filler(5) + G + filler(3, 2000) + G + filler(7, 3000) + G + filler(4, 4000)
    assert find_repetition(ids) is None


def test_copies_outside_the_window_do_not_count():
    gap = filler(40, 2000)
    ids = G + gap + G + filler(40, 3000) + G  # copies 50 apart: the three do not fit in r=100
    assert find_repetition(ids) is None
    assert find_repetition(ids, r=200) is not None


def test_overlapping_repeats_of_a_short_period_loop():
    ids = [7, 8, 9] * 10  # period 3: the 10-grams overlap their own copies
    hit = find_repetition(ids)
    assert hit is not None
    assert (hit.p1, hit.p2, hit.p3) == (0, 3, 6)
    assert hit.period == 3


def test_single_token_run_is_a_loop():
    hit = find_repetition([5] * 12)
    assert hit is not None and (hit.p1, hit.p2, hit.p3) == (0, 1, 2)


def test_repeats_at_the_very_start_and_very_end():
    start = G * 3 + filler(30)
    assert find_repetition(start).p1 == 0
    end = filler(30) + G * 3
    hit = find_repetition(end)
    assert hit is not None and hit.p3 + 10 == len(end)


def test_too_short_or_empty_sequences():
    assert find_repetition([]) is None
    assert find_repetition([1] * 9) is None  # no 10-gram at all


def test_first_hit_in_scan_order_is_returned():
    early = [1, 2] * 8  # period 2 loop
    late = G * 3
    ids = filler(3) + early + filler(5, 5000) + late
    assert find_repetition(ids).period == 2


def _stream_first_fire(ids, **kw):
    det = LoopDetector(use_suffix=False, **kw)
    for pos, t in enumerate(ids):
        event = det.update(t)
        if event is not None:
            return pos, event
    return None, None


@pytest.mark.parametrize("seed", range(60))
def test_streaming_detector_fires_exactly_where_the_reference_finds_its_first_hit(seed):
    rng = random.Random(seed)
    ids = [rng.randrange(4) for _ in range(rng.randrange(5, 40))]  # small alphabet: many partial repeats
    # splice in a loop sometimes, with a random period, so both outcomes occur
    if seed % 2:
        period = rng.randrange(1, 15)
        unit = [rng.randrange(50) for _ in range(period)]
        ids += unit * (30 // period + 3) + [rng.randrange(50) for _ in range(rng.randrange(0, 20))]
    ref = find_repetition(ids)
    pos, event = _stream_first_fire(ids)
    if ref is None:
        assert event is None
    else:
        assert pos == ref.p3 + 9  # the token completing the third copy's 10-gram
        assert event.onset == ref.p2
        assert event.period == ref.p2 - ref.p1


@pytest.mark.parametrize("seed", range(20))
def test_streaming_detector_matches_reference_with_other_parameters(seed):
    rng = random.Random(1000 + seed)
    ids = [rng.randrange(3) for _ in range(120)]
    ref = find_repetition(ids, n=4, r=30, k=3)
    pos, event = _stream_first_fire(ids, ngram=4, window=30, min_count=3)
    assert (ref is None) == (event is None)
    if ref is not None:
        assert pos == ref.p3 + 3 and event.onset == ref.p2


def _hidden_loop():
    """An early copy of G, then a loop of G with period 15 that ends after three copies: at r=200 the early copy
    is the first of four occurrences in the window, unequally spaced from the rest."""
    return filler(10) + G + filler(90, 2000) + (G + filler(5, 3000)) + (G + filler(5, 3100)) + G + filler(60, 4000)


def test_an_earlier_unequal_copy_in_the_window_hides_a_loop_from_the_papers_rule_but_not_from_consecutive():
    ids = _hidden_loop()
    assert find_repetition(ids, r=100) is not None, "the paper's detector at r=100 sees the loop"
    assert find_repetition(ids, r=200) is None, "at r=200 the early copy comes first and hides it"
    pos, _ = _stream_first_fire(ids, window=200)
    assert pos is None
    pos, event = _stream_first_fire(ids, window=200, spacing="consecutive")
    assert pos == 140 + 9 and event.onset == 125 and event.period == 15


@pytest.mark.parametrize("seed", range(40))
def test_consecutive_spacing_fires_wherever_the_papers_rule_does_and_never_later_at_any_wider_window(seed):
    rng = random.Random(5000 + seed)
    ids = [rng.randrange(3) for _ in range(rng.randrange(20, 160))]  # small alphabet: chance repeats before it
    period = rng.randrange(1, 9)
    unit = [rng.randrange(3, 60) for _ in range(period)]
    ids += unit * (12 // period + 3) + [rng.randrange(3) for _ in range(rng.randrange(0, 20))]  # a loop spliced in
    first_pos, _ = _stream_first_fire(ids, ngram=4, window=30)
    assert first_pos is not None, "the paper's rule fires on the spliced loop"
    previous = first_pos
    for window in (30, 60, 120):
        pos, _ = _stream_first_fire(ids, ngram=4, window=window, spacing="consecutive")
        assert pos is not None and pos <= first_pos, "consecutive fires wherever the paper's rule does, never later"
        assert pos <= previous, "a wider window never loses or delays a loop"
        previous = pos


def test_an_unknown_spacing_is_refused_by_name():
    from repguard.errors import ConfigError

    with pytest.raises(ConfigError, match="spacing"):
        LoopDetector(spacing="last")
