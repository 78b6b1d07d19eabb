"""The evidence labels that no repguard trigger uses, on hand-made token lists and texts."""

from benchmarks.evidence import measures


def test_holtzman_fires_only_on_a_phrase_repeated_three_times_at_the_end():
    assert measures.holtzman_loop([9, 8, 1, 2, 1, 2, 1, 2])
    assert not measures.holtzman_loop([1, 2, 1, 2, 9])  # the repeat is not at the end
    assert not measures.holtzman_loop([1, 2, 1, 2])  # two copies only
    assert not measures.holtzman_loop([7, 7, 7, 7, 7][:2])


def test_repeated_sentence_normalises_case_spacing_and_punctuation():
    text = "The player must be in the middle.\nthe  player must be in the middle! The player must be in the middle?"
    assert measures.repeated_sentence(text)
    assert not measures.repeated_sentence("Short. Short. Short.")  # below 20 characters
    assert not measures.repeated_sentence("One long sentence here, twice. One long sentence here, twice.")


def test_rep_n_and_gzip_ratio():
    assert measures.rep_n([[1, 2, 3, 4]], 2) == 0.0
    assert measures.rep_n([[1, 2, 1, 2, 1, 2]], 2) == 60.0
    assert measures.gzip_ratio("abc " * 200) < measures.gzip_ratio("the quick brown fox jumps over the lazy dog")


def test_strict_label_fires_when_any_label_does():
    calm = list(range(100, 160))
    assert not measures.strict_loop(calm, "A calm text that never says the same thing twice.")
    assert measures.strict_loop(calm + [1, 2, 1, 2, 1, 2])  # Holtzman
    assert measures.strict_loop(calm, "Again and again we went. " * 3)  # a repeated sentence
    assert measures.strict_loop(calm, stopped=True)  # a stopped output is an unrepaired loop
