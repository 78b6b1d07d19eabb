"""The per-sequence policy on hand-made token streams."""


from repguard.config import GuardConfig
from repguard.policy import Level, SequenceGuard

PREFIX = list(range(100, 140))  # 40 distinct tokens: no loop
LOOP = [1, 2, 3, 4, 5, 6, 7]  # period 7


def run(cfg, ids, scores=None):
    g = SequenceGuard(cfg)
    levels = []
    for i, t in enumerate(ids):
        levels.append(g.observe(t, None if scores is None else scores[i]))
        if g.stopped:
            break
    return g, levels


def first(levels, level):
    return next((i for i, lv in enumerate(levels) if lv == level), None)


def test_never_acts_on_text_without_a_loop():
    g, levels = run(GuardConfig(), PREFIX + list(range(200, 300)))
    assert set(levels) == {Level.MONITOR}
    assert not g.report.fired and g.penalty is None and not g.deactivated


def test_default_walks_deactivate_escalate_stop_at_the_configured_steps():
    cfg = GuardConfig(escalate_after=4, stop_after=10)
    g, levels = run(cfg, PREFIX + LOOP * 20)
    fire = first(levels, Level.DEACTIVATE)
    assert fire == 40 + 7 + 11  # 12 tokens repeat back to back (min_repeat=12)
    assert levels[fire - 1] == Level.MONITOR
    assert first(levels, Level.ESCALATE) == fire + 4  # exactly escalate_after loop tokens later
    assert first(levels, Level.STOP) == fire + 4 + 10
    assert g.report.finish_reason == "repetition"
    assert [a.level for a in g.report.actions] == ["deactivate", "escalate", "stop"]


def test_escalation_penalises_exactly_the_token_that_continues_the_loop():
    g = SequenceGuard(GuardConfig(escalate_after=0, stop=False))
    ids = PREFIX + LOOP * 3
    for t in ids:
        g.observe(t)
    assert g.level == Level.ESCALATE
    token, amount = g.penalty
    assert token == ids[len(ids) - 7]  # what followed the same context one period ago
    assert amount > 0


def test_no_escalation_before_n_loop_tokens():
    cfg = GuardConfig(escalate_after=9, stop=False)
    g, levels = run(cfg, PREFIX + LOOP * 2 + LOOP[:6])
    assert Level.ESCALATE not in levels
    g, levels = run(cfg, PREFIX + LOOP * 4)
    assert Level.ESCALATE in levels


def test_a_broken_loop_returns_to_monitor_after_the_window():
    cfg = GuardConfig(escalate=False, stop=False, deactivate_window=3)
    ids = PREFIX + LOOP * 3 + list(range(300, 320))
    g, levels = run(cfg, ids)
    assert levels[-1] == Level.MONITOR and not g.deactivated
    assert [a.reason for a in g.report.actions] == ["suffix", "loop_broken"]
    fire = first(levels, Level.DEACTIVATE)
    broke = first(levels[fire:], Level.MONITOR) + fire
    assert broke == 40 + 21 + 3  # neurons stay off for deactivate_window=3 non-loop tokens, then back on


def test_monitor_preset_detects_but_never_acts():
    g, levels = run(GuardConfig.from_preset("monitor"), PREFIX + LOOP * 20)
    assert set(levels) == {Level.MONITOR}
    assert g.report.fired and len(g.report.detections) == 1
    assert g.penalty is None and not g.deactivated and not g.stopped


def test_paper_preset_deactivates_from_the_first_token():
    g = SequenceGuard(GuardConfig.from_preset("paper"))
    assert g.deactivated
    for t in PREFIX:
        g.observe(t)
    assert g.deactivated and g.report.tokens_under_intervention == len(PREFIX)


def test_every_level_can_be_switched_off():
    g, levels = run(GuardConfig(deactivate=False, escalate=False, stop=True, stop_after=5), PREFIX + LOOP * 10)
    assert Level.DEACTIVATE not in levels and levels[-1] == Level.STOP
    g, levels = run(GuardConfig(deactivate=True, escalate=False, stop=False), PREFIX + LOOP * 30)
    assert set(levels) <= {Level.MONITOR, Level.DEACTIVATE}


def test_neuron_gate_vetoes_token_triggers_with_low_scores():
    ids = PREFIX + LOOP * 10
    low = [0.0] * len(ids)
    g, levels = run(GuardConfig(monitor_gate=1.0), ids, low)
    assert not g.report.fired
    high = [0.0] * 50 + [3.0] * (len(ids) - 50)
    g, levels = run(GuardConfig(monitor_gate=1.0), ids, high)
    assert g.report.fired and g.report.detections[0].neuron_score == 3.0


def test_disabled_guard_does_nothing():
    g, levels = run(GuardConfig(enabled=False), PREFIX + LOOP * 20)
    assert not g.report.fired and set(levels) == {Level.MONITOR}


def test_report_serialises():
    g, _ = run(GuardConfig(), PREFIX + LOOP * 20)
    d = g.report.to_dict()
    assert d["fired"] and d["first_detection"] == 58 and d["finish_reason"] == "repetition"
    assert d["tokens_under_intervention"] > 0


def test_the_paper_preset_is_one_pass_that_never_rolls_back_on_any_engine():
    """No pass of the paper's method is untouched (the neurons are off from the first token), so a rollback policy
    of it runs one pass with the preset as configured, holds nothing back, and its token-level form (an engine
    without the neuron step) does not start rolling back either."""
    from repguard.rollback import RollbackPolicy

    policy = RollbackPolicy(GuardConfig.from_preset("paper"))
    assert policy.max_rollbacks == 0 and policy.holdback == 0
    first, paper = policy.pass_config(0), GuardConfig.from_preset("paper")
    assert (first.always_on, first.deactivate, first.escalate, first.stop) == (True, True, False, False)
    assert first == paper.replace(window=policy.settings.watch_window), "as configured, watched over rollback's window"
    token = policy.token_level()
    assert token.max_rollbacks == 0 and not token.pass_config(0).always_on
    assert RollbackPolicy(GuardConfig()).max_rollbacks == 2, "the default still rolls back"
