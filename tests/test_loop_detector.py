"""The streaming loop detector on hand-made token streams."""

import random

import pytest

from repguard.detect import LoopDetector, find_repetition


def feed(detector, ids):
    """Index and event of the first firing, or (None, None)."""
    for i, token in enumerate(ids):
        event = detector.update(token)
        if event is not None:
            return i, event
    return None, None


def test_paper_trigger_fires_on_the_third_equally_spaced_copy_and_not_before():
    prefix = list(range(100, 130))
    copy = list(range(1, 13))  # period 12 > n=10
    ids = prefix + copy * 3
    d = LoopDetector(use_suffix=False)
    pos, event = feed(d, ids)
    # The third copy's first 10-gram completes at index 30 + 24 + 9.
    assert pos == 30 + 24 + 9
    assert event.onset == 30 + 12 and event.period == 12 and event.trigger == "paper"
    # One token earlier nothing fires.
    d2 = LoopDetector(use_suffix=False)
    assert feed(d2, ids[:pos])[0] is None


def test_paper_trigger_rejects_unequal_spacing():
    g = list(range(1, 11))
    ids = g + [50] + g + [60, 61, 62] + g  # three copies, gaps 11 and 13
    assert feed(LoopDetector(use_suffix=False), ids)[0] is None
    assert find_repetition(ids) is None


def test_paper_trigger_ignores_copies_outside_the_window():
    g = list(range(1, 11))
    filler = list(range(200, 260))
    ids = g + filler + g + filler + g  # equally spaced, but 70 apart: not 3 within r=100
    assert feed(LoopDetector(use_suffix=False), ids)[0] is None


@pytest.mark.parametrize("seed", range(40))
def test_streaming_matches_the_reference_detector(seed):
    rng = random.Random(seed)
    ids = [rng.randrange(4) for _ in range(rng.randint(20, 200))]
    if seed % 2:
        period, start = rng.randint(1, 20), rng.randint(0, len(ids) - 1)
        for j in range(start + period, len(ids)):
            ids[j] = ids[j - period]
    ref = find_repetition(ids)
    _, event = feed(LoopDetector(use_suffix=False), ids)
    assert (ref is None) == (event is None)
    if ref is not None:
        assert (event.onset, event.period) == (ref.p2, ref.period)


def test_suffix_trigger_needs_back_to_back_copies():
    phrase = list(range(1, 16))
    # The same 15-token phrase reused after a gap is not a loop.
    reused = list(range(100, 120)) + phrase + list(range(300, 340)) + phrase
    assert feed(LoopDetector(use_paper=False), reused)[0] is None
    # Two back-to-back copies are.
    looping = list(range(100, 120)) + phrase + phrase
    pos, event = feed(LoopDetector(use_paper=False), looping)
    assert event.trigger == "suffix" and event.period == 15
    assert event.onset == 20 + 15  # the second copy starts right after the first
    assert pos == 20 + 15 + 14  # fires when the second copy is complete (min_copies=2)


def test_suffix_trigger_respects_min_repeat_for_short_periods():
    ids = list(range(100, 110)) + [7, 8] * 20
    pos, event = feed(LoopDetector(use_paper=False, min_repeat=12), ids)
    assert event.period == 2
    assert pos == 10 + 2 + 11  # 12 repeated tokens after the first copy


def test_repeat_length_and_period_track_the_longest_repeated_suffix():
    d = LoopDetector()
    for t in [1, 2, 3, 4, 1, 2, 3]:
        d.update(t)
    assert d.repeat_length == 3 and d.repeat_period == 4


def test_cost_does_not_depend_on_history_length():
    # Work per token is bounded: the n-gram table only holds the window, whatever the history.
    rng = random.Random(0)
    d = LoopDetector(use_suffix=False)
    for _ in range(5000):
        d.update(rng.randrange(50000))
    assert len(d._grams) <= d.window


def test_suffix_trigger_still_fires_after_a_long_history():
    # The suffix automaton is rebuilt over a sliding span; loops late in a long text are still found.
    rng = random.Random(0)
    ids = [rng.randrange(1000) for _ in range(5000)] + [1, 2, 3, 4, 5] * 10
    pos, event = feed(LoopDetector(use_paper=False), ids)
    assert (pos, event.onset, event.period) == (5000 + 5 + 11, 5005, 5)


def _rebuilt_reference(ids, span=512):
    """What the automaton must report at each token: one built from scratch over the tokens since the
    last hand-over (every ``span`` tokens once 2 * ``span`` are in), as the detector did before it spread the work."""
    from repguard.detect import _SuffixAutomaton

    sam, offset, out = _SuffixAutomaton(), 0, []
    for pos, token in enumerate(ids):
        if sam.size >= 2 * span:
            sam, offset = _SuffixAutomaton(), pos + 1 - span
            for t in ids[offset : pos + 1]:
                sam.extend(t)
        else:
            sam.extend(token)
        period = pos - (sam.repeat_end + offset) if sam.repeat_length else 0
        out.append((sam.repeat_length, period))
    return out


def test_the_spread_rebuild_reports_what_a_full_rebuild_would():
    rng = random.Random(3)
    ids = []
    while len(ids) < 4000:  # random text with loops of varied periods, some across the hand-over points
        ids += [rng.randrange(50) for _ in range(rng.randrange(5, 200))]
        ids += [rng.randrange(50) for _ in range(rng.randrange(2, 40))] * rng.randrange(2, 6)
    d = LoopDetector(use_paper=False)
    seen = []
    for token in ids:
        d.update(token)
        seen.append((d.repeat_length, d.repeat_period))
    assert seen == _rebuilt_reference(ids)


def test_no_token_pays_for_a_rebuild(monkeypatch):
    # Every row used to rebuild its automaton (512 extensions) in the same step every 512 tokens: a latency
    # spike. Now each token costs at most two extensions (the automaton and its shadow).
    from repguard import detect

    calls = [0]
    extend = detect._SuffixAutomaton.extend

    def counted(self, c):
        calls[0] += 1
        return extend(self, c)

    monkeypatch.setattr(detect._SuffixAutomaton, "extend", counted)
    d = LoopDetector()
    rng = random.Random(0)
    worst = 0
    for _ in range(3000):
        calls[0] = 0
        d.update(rng.randrange(1000))
        worst = max(worst, calls[0])
    assert worst <= 2


@pytest.mark.parametrize("kwargs, name", [({"ngram": 0}, "ngram"), ({"window": 5}, "window"),
                                          ({"min_count": 2}, "min_count"), ({"max_period": 0}, "max_period")])
def test_bad_settings_name_the_argument(kwargs, name):
    from repguard.errors import ConfigError

    with pytest.raises(ConfigError, match=name):
        LoopDetector(**kwargs)
