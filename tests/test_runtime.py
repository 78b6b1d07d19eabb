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
        rt.apply_layer(plan, acts_by_layer[layer])


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


def test_hooks_are_needed_only_where_settings_read_or_write():
    rt = GuardRuntime(make_map(), GuardConfig(), max_rows=1, monitor_neurons=1)  # monitor: rank 0 (layer 0)
    assert rt.layers_needed([GuardConfig.from_preset("monitor")]) == {0}
    assert rt.layers_needed([GuardConfig()]) == {0, 2}  # the map selects 3: L0#1, L2#5, L2#0
    assert rt.layers_needed([GuardConfig(k=4)]) == {0, 1, 2}
    assert rt.layers_needed([GuardConfig(layers=(1,))]) == {0}  # layer 1 holds no selected neuron
    assert rt.layers_needed([GuardConfig.from_preset("off")]) == set()
    assert rt.layers_needed([GuardConfig.from_preset("monitor"), GuardConfig(k=4)]) == {0, 1, 2}


def test_a_decoding_step_reuses_its_indexes():
    rt = GuardRuntime(make_map(), GuardConfig(), max_rows=2)
    rt.begin_step(torch.tensor([0, 1]), key=(2, 1))
    index = rt._step[0][0]
    rt.begin_step(torch.tensor([0, 1]), key=(2, 1))
    assert rt._step[0][0] is index  # same rows: nothing recomputed, nothing allocated
    rt.begin_step(torch.tensor([2, 5]), key=(2, 3))
    assert rt._step[0][0] is not index


def test_switch_off_writes_only_where_asked():
    act = torch.arange(12.0).view(3, 4)
    from repguard.runtime import flat_index, switch_off

    index = flat_index(torch.tensor([0, 2]), torch.tensor([1, 3]), 4)
    switch_off(act, index, torch.full((2, 2), -1.0), torch.tensor([[True, False], [False, True]]))
    assert act.tolist() == [[0, -1, 2, 3], [4, 5, 6, 7], [8, 9, 10, -1]]


def test_penalties_and_stops_reach_the_logits_of_their_rows_only():
    rt = GuardRuntime(None, GuardConfig(), max_rows=3)
    rt.open(0, GuardConfig(deactivate=False, stop=False))  # penalises the loop's next token
    rt.open(1, GuardConfig(deactivate=False, escalate=False, stop_after=1))  # stops
    rt.open(2, GuardConfig.from_preset("monitor"))  # detects, never acts
    for t in list(range(100, 120)) + [1, 2, 3] * 6:
        rt.observe({0: t, 1: t, 2: t})
    assert rt.steering == {0, 1} and rt.seqs[0].penalty is not None and rt.seqs[1].stopped
    token, amount = rt.seqs[0].penalty
    logits = torch.zeros(3, 8)
    assert rt.steer_logits(logits, [0, 2], lambda row: 7) == []  # row 1 is not the adapter's to write now
    assert logits[0, token] == -amount and int((logits != 0).sum()) == 1
    logits = torch.zeros(3, 8)
    assert rt.steer_logits(logits, [1, 2], lambda row: 7) == [1]
    assert logits[1].argmax() == 7 and torch.isinf(logits[1, :7]).all() and not logits[2].any()


def test_penalties_reach_an_accelerator_in_one_copy_that_does_not_block_the_host(monkeypatch):
    """On a GPU a plain ``torch.tensor(..., device=...)`` waits for the queued forward (the H200 check counted
    about one such wait per step with rows penalised); the penalties travel in one pinned, non-blocking copy.
    ``meta`` stands in for the accelerator: the copies made are recorded, the math is checked on the CPU."""
    rt = GuardRuntime(None, GuardConfig(), max_rows=2)
    rt.open(0, GuardConfig(deactivate=False, stop=False))
    rt.open(1, GuardConfig(deactivate=False, stop=False))
    for t in list(range(100, 120)) + [1, 2, 3] * 6:
        rt.observe({0: t, 1: t + 1 if t >= 100 else t})
    assert rt.seqs[0].penalty is not None and rt.seqs[1].penalty is not None
    copies, pinned = [], []
    real_to = torch.Tensor.to

    def to(self, *a, **k):
        if self.device.type == "cpu" and any(str(x) == "meta" for x in (*a, k.get("device"))):
            copies.append(k.get("non_blocking", False) and self in pinned)
        return real_to(self, *a, **k)

    def pin(self, *a, **k):
        pinned.append(self)
        return self

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    assert rt.steer_logits(torch.zeros(2, 8, device="meta"), [0, 1], lambda row: 7) == []
    assert copies == [True]  # one copy for both rows' penalties, from pinned memory, non-blocking
    monkeypatch.undo()
    logits = torch.zeros(2, 8)
    rt.steer_logits(logits, [0, 1], lambda row: 7)
    for row in (0, 1):
        token, amount = rt.seqs[row].penalty
        assert logits[row, token] == -amount and int((logits[row] != 0).sum()) == 1


def test_fail_open_switches_every_row_back_on_and_marks_reports():
    rt = GuardRuntime(make_map(), GuardConfig(), max_rows=2)
    rt.open(0, GuardConfig.from_preset("paper"))
    assert rt.any_off
    try:
        raise ValueError("injected")
    except ValueError:
        rt.fail_open("tiny-runtime", "deactivate", rt.reports(), first=False, consequence="continues")
    assert not rt.any_off and not rt.off.any() and rt.seqs[0].report.errors == 1


def test_a_decoding_step_gathers_and_writes_like_a_flat_forward():
    # [batch, 1, d_ff] (a decoding step) takes the one-op gather; [batch * tokens, d_ff] the flat one
    rt = GuardRuntime(make_map(), GuardConfig(), max_rows=2)
    rt.open(0, GuardConfig.from_preset("paper"))
    rt.open(1, GuardConfig.from_preset("monitor"))
    step3d = {layer: torch.arange(2 * WIDTH, dtype=torch.float32).view(2, 1, WIDTH) + 1 for layer in range(LAYERS)}
    flat = {layer: v.clone().view(2, WIDTH) for layer, v in step3d.items()}
    rt.begin_step(torch.tensor([0, 1]), key=(2, 1))
    for layer, plan in rt.neurons.plans.items():
        rt.apply_layer(plan, step3d[layer])
    scores3d = rt.neuron_scores().clone()
    step(rt, flat, torch.tensor([0, 1]))
    assert all(torch.equal(step3d[k].view(2, WIDTH), flat[k]) for k in flat)
    assert torch.equal(rt.neuron_scores(), scores3d)
    assert step3d[0][0, 0, 1] == 0 and step3d[0][1, 0, 1] == WIDTH + 2  # row 0 off, row 1 untouched


def test_activations_in_another_dtype_than_the_weights_are_still_read_and_written():
    rt = GuardRuntime(make_map(), GuardConfig(), max_rows=1, dtype=torch.float32)
    rt.open(0, GuardConfig.from_preset("paper"))
    acts = {layer: torch.full((1, 1, WIDTH), 2.0, dtype=torch.bfloat16) for layer in range(LAYERS)}
    rt.begin_step(torch.tensor([0]), key=(1, 1))
    for layer, plan in rt.neurons.plans.items():
        rt.apply_layer(plan, acts[layer])
    assert acts[0][0, 0, 1] == 0 and acts[0][0, 0, 0] == 2 and acts[0].dtype == torch.bfloat16
    assert torch.isfinite(rt.neuron_scores()).all()
