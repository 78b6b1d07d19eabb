"""GuardRuntime's tensor math on hand-made activations (no model)."""

import torch

from repguard.config import GuardConfig
from repguard.neuron_map import map_from_scores
from repguard.runtime import GuardRuntime

LAYERS, WIDTH = 3, 8


def make_map():
    scores = torch.zeros(LAYERS, WIDTH)
    scores[0, 1], scores[2, 5], scores[2, 0], scores[1, 7] = 4.0, 3.0, 2.0, 1.0  # rank order
    stats = {"mean_before": torch.full((LAYERS, WIDTH), 0.5), "std_before": torch.full((LAYERS, WIDTH), 0.25),
             "mean_after": torch.ones(LAYERS, WIDTH), "std_after": torch.ones(LAYERS, WIDTH)}
    meta = dict(model_name="m", architecture="llama", num_layers=LAYERS, intermediate_size=WIDTH, hook_point="h",
                quantity="q", fingerprint="f", num_selected=0, num_stored=0)
    return map_from_scores(meta, scores, stats, num_selected=3, num_stored=4)


def step(rt, acts_by_layer, rows):
    rt.begin_step(rows)
    for layer, plan in rt.neurons.plans.items():
        rt.apply_layer(plan, acts_by_layer[layer], rows)


def test_only_switched_off_rows_change_and_only_the_chosen_neurons():
    rt = GuardRuntime(make_map(), GuardConfig(), max_rows=2)
    rt.open(0, GuardConfig.from_preset("paper"))  # row 0: always off (top 3 = L0#1, L2#5, L2#0)
    rt.open(1, GuardConfig.from_preset("monitor"))
    acts = {layer: torch.arange(2 * WIDTH, dtype=torch.float32).view(2, WIDTH) + 1 for layer in range(LAYERS)}
    before = {k: v.clone() for k, v in acts.items()}
    step(rt, acts, torch.tensor([0, 1]))
    assert acts[0][0, 1] == 0 and acts[2][0, 5] == 0 and acts[2][0, 0] == 0
    assert acts[1][0, 7] == before[1][0, 7]  # rank 4: stored but not selected
    changed = sum(int((acts[k] != before[k]).sum()) for k in acts)
    assert changed == 3
    assert torch.equal(acts[0][1], before[0][1]) and torch.equal(acts[2][1], before[2][1])  # row 1 untouched


def test_pre_onset_mean_and_k_and_layers():
    rt = GuardRuntime(make_map(), GuardConfig(), max_rows=1)
    rt.open(0, GuardConfig.from_preset("paper", deactivate_value="pre_onset_mean", k=4, layers=[2]))
    acts = {layer: torch.full((1, WIDTH), 9.0) for layer in range(LAYERS)}
    step(rt, acts, torch.tensor([0]))
    assert acts[2][0, 5] == 0.5 and acts[2][0, 0] == 0.5  # pre-onset mean, layer 2 only
    assert acts[0][0, 1] == 9.0 and acts[1][0, 7] == 9.0


def test_newest_position_only_in_a_multi_token_forward():
    rt = GuardRuntime(make_map(), GuardConfig(), max_rows=2)
    rt.open(0, GuardConfig.from_preset("paper"))
    rt.open(1, GuardConfig.from_preset("paper"))
    tokens = 3  # prefill of 3 tokens for 2 rows, flattened [B*T, D]
    acts = {layer: torch.ones(2 * tokens, WIDTH) for layer in range(LAYERS)}
    rows = torch.arange(2) * tokens + (tokens - 1)
    step(rt, acts, rows)
    zeroed = (acts[0][:, 1] == 0).nonzero().flatten().tolist()
    assert zeroed == [2, 5]


def test_neuron_score_is_the_mean_z_of_the_monitored_neurons():
    rt = GuardRuntime(make_map(), GuardConfig(), max_rows=1, monitor_neurons=2)
    rt.open(0, GuardConfig.from_preset("monitor"))
    acts = {layer: torch.zeros(1, WIDTH) for layer in range(LAYERS)}
    acts[0][0, 1] = 1.0  # z = (1 - 0.5) / 0.25 = 2
    acts[2][0, 5] = 1.5  # z = 4
    step(rt, acts, torch.tensor([0]))
    assert torch.allclose(rt.neuron_scores(), torch.tensor([3.0]))
    # Layer 1 holds no monitored neuron and nothing is off: its hook did no work.
    assert not rt.neurons.plans[1].monitored


def test_policy_drives_the_masks():
    rt = GuardRuntime(make_map(), GuardConfig(), max_rows=1)
    rt.open(0, GuardConfig(escalate=False, stop=False))
    assert not rt.any_off
    for t in list(range(100, 120)) + [1, 2, 3] * 10:
        rt.observe({0: t})
    assert rt.any_off and rt.seqs[0].deactivated
    rt.close(0)
    assert not rt.any_off
