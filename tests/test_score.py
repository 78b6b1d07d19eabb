"""The paper's score (pooled mean after onset - pooled mean before) on synthetic activations: core arithmetic,
tested without transformers."""

import pytest
import torch

from repguard.calibration import CalibrationSettings, OnsetWindowStats, parse_select, top_set
from repguard.errors import ConfigError


def _stats(acts, onsets, lengths, context=3, halves=None):
    layers, width = acts[0].shape[1], acts[0].shape[2]
    st = OnsetWindowStats(layers, width, context)
    halves = halves or [i % 2 for i in range(len(acts))]
    batch = torch.nn.utils.rnn.pad_sequence(acts, batch_first=True)  # [B, T, L, D], zero-padded on the right
    for layer in range(layers):
        st.add(layer, batch[:, :, layer], onsets, lengths, halves)
    return st


def test_step_neuron_scores_the_size_of_its_step_and_constant_neurons_zero():
    T, s = 20, 10
    acts = torch.zeros(T, 2, 4)
    acts[:, 0, 0] = 1.0  # constant: score 0
    acts[s:, 1, 2] = 2.5  # jumps at the onset: score 2.5
    acts[: s, 1, 3] = 1.0  # drops at the onset: score -1
    st = _stats([acts, acts.clone()], [s, s], [T, T])
    score = st.pooled()["score"]
    assert score[1, 2].item() == pytest.approx(2.5)
    assert score[1, 3].item() == pytest.approx(-1.0)
    assert score[0, 0].item() == pytest.approx(0.0)
    assert top_set(score, 3) == {(1, 2)}  # negative and zero scores are never selected


def test_windows_are_context_tokens_before_and_after_the_onset_only():
    T, s, c = 30, 12, 3
    acts = torch.zeros(T, 1, 1)
    acts[: s - c, 0, 0] = 100.0  # outside the before window: ignored
    acts[s + c :, 0, 0] = -100.0  # outside the after window: ignored
    acts[s - c : s, 0, 0] = 1.0
    acts[s : s + c, 0, 0] = 4.0
    pooled = _stats([acts], [s], [T], context=c).pooled()
    assert pooled["mean_before"].item() == pytest.approx(1.0)
    assert pooled["mean_after"].item() == pytest.approx(4.0)
    assert pooled["score"].item() == pytest.approx(3.0)
    assert pooled["std_before"].item() == pytest.approx(0.0, abs=1e-6)


def test_pooling_weights_positions_not_texts_and_clips_windows_to_the_text():
    c = 3
    a = torch.zeros(10, 1, 1)
    a[5:8, 0, 0] = 6.0  # onset 5: before [2,5) = 0, after [5,8) = 6 -> 3 after positions
    b = torch.zeros(3, 1, 1)
    b[1:, 0, 0] = 3.0  # onset 1, text of 3 tokens: before [0,1) (clipped), after [1,3) (clipped) -> 2 positions
    pooled = _stats([a, b], [5, 1], [10, 3], context=c).pooled()
    assert pooled["mean_after"].item() == pytest.approx((3 * 6.0 + 2 * 3.0) / 5)
    assert pooled["mean_before"].item() == pytest.approx(0.0)


def test_std_is_the_pooled_standard_deviation():
    c = 4
    acts = torch.zeros(8, 1, 1)
    acts[4:8, 0, 0] = torch.tensor([1.0, 3.0, 1.0, 3.0])
    pooled = _stats([acts], [4], [8], context=c).pooled()
    assert pooled["mean_after"].item() == pytest.approx(2.0)
    assert pooled["std_after"].item() == pytest.approx(1.0)


def test_split_halves_score_their_own_texts():
    T, s = 12, 6
    up, flat = torch.zeros(T, 1, 2), torch.zeros(T, 1, 2)
    up[s:, 0, 0] = 1.0
    flat[s:, 0, 1] = 1.0
    st = _stats([up, flat], [s, s], [T, T], halves=[0, 1])
    assert st.pooled((0,))["score"][0].tolist() == pytest.approx([1.0, 0.0])
    assert st.pooled((1,))["score"][0].tolist() == pytest.approx([0.0, 1.0])
    assert st.pooled()["score"][0].tolist() == pytest.approx([0.5, 0.5])


def test_profile_is_the_mean_activation_at_each_relative_position():
    c = 2
    acts = torch.arange(10.0).reshape(10, 1, 1)
    st = _stats([acts], [5], [10], context=c)
    prof = st.profile(torch.tensor([0]), torch.tensor([0]))
    assert prof[0].tolist() == pytest.approx([3.0, 4.0, 5.0, 6.0, 7.0])


def test_select_parsing_and_validation():
    assert parse_select("0.5%") == pytest.approx(0.005)
    assert parse_select("0.005") == pytest.approx(0.005)
    assert parse_select("230") == 230
    with pytest.raises(ConfigError, match="--select"):
        parse_select("lots")
    assert CalibrationSettings(select=0.005).count(46080) == 230
    assert CalibrationSettings(select=100).count(46080) == 100
    with pytest.raises(ConfigError, match="select"):
        CalibrationSettings(select=1.5)
    with pytest.raises(ConfigError, match="num_texts"):
        CalibrationSettings(num_texts=1)


def test_selection_counts_cover_the_selection_the_store_and_every_deactivation_fraction():
    from repguard.calibration import selection_counts

    total = 30 * 1536  # smollm2-135m
    assert selection_counts(CalibrationSettings(), total) == (230, 922)  # 0.5% selected, 2% stored
    wide = CalibrationSettings(store=0.001, deactivation_fractions=(0.05,))
    assert selection_counts(wide, total) == (230, 2304)  # the 5% deactivation test needs 5% stored
    assert selection_counts(CalibrationSettings(select=50, store=1.0), 40) == (40, 40)  # capped at the total


def test_split_half_stability_is_the_jaccard_index_of_the_halves_top_sets():
    from repguard.calibration import split_half_jaccard

    T, s = 12, 6
    a, b = torch.zeros(T, 1, 4), torch.zeros(T, 1, 4)
    a[s:, 0, 0] = a[s:, 0, 1] = 1.0  # half 0 ranks neurons 0 and 1 first
    b[s:, 0, 1] = b[s:, 0, 2] = 1.0  # half 1 ranks neurons 1 and 2 first
    assert split_half_jaccard(_stats([a, b], [s, s], [T, T], halves=[0, 1]), 2) == 0.3333  # 1 of 3, to 4 places
    assert split_half_jaccard(_stats([a, a.clone()], [s, s], [T, T], halves=[0, 1]), 2) == 1.0


def test_the_random_control_is_fixed_by_the_seed_and_lies_inside_the_model():
    from repguard.calibration import random_control

    layer, neuron = random_control(3, 4 * 16, 20, 16)
    again = random_control(3, 4 * 16, 20, 16)
    other = random_control(4, 4 * 16, 20, 16)
    assert torch.equal(layer, again[0]) and torch.equal(neuron, again[1])
    assert not (torch.equal(layer, other[0]) and torch.equal(neuron, other[1]))
    pairs = set(zip(layer.tolist(), neuron.tolist()))
    assert len(pairs) == 20 and all(0 <= li < 4 and 0 <= n < 16 for li, n in pairs)
