"""The core request-level rollback (``RequestGuard``) against a fake streaming engine on plain lists.

The fake model prefers to copy the token ``period`` positions back (so it loops), and otherwise emits a fresh
token; a logit bias changes its choice exactly as it would change an argmax. Streams come in chunks, as an
engine's outputs do, and the engine keeps decoding a little after the guard asks to cancel (the lag a real
abort has)."""

from __future__ import annotations

import pytest

from repguard.config import GuardConfig
from repguard.detect import find_repetition
from repguard.errors import ConfigError
from repguard.request_guard import RequestGuard, derive_seed
from repguard.rollback import RollbackPolicy

PROMPT = [1, 2, 3]


def fake_model(period: int | None, eos_at: int | None = None):
    def next_token(seq: list[int], bias: dict[int, float] | None) -> int:
        n = len(seq) - len(PROMPT)
        if eos_at is not None and n == eos_at:
            return 0
        fresh = 1000 + len(seq)
        scores = {fresh: 5.0}
        if period and len(seq) >= period + len(PROMPT):
            scores[seq[-period]] = scores.get(seq[-period], 0.0) + 10.0
        for token, amount in (bias or {}).items():
            scores[token] = scores.get(token, 0.0) + amount
        return max(scores, key=lambda t: (scores[t], -t))

    return next_token


def step_bias(sub, seq: list[int], first: bool) -> dict[int, float] | None:
    """What an engine adds to its logits for the next token: the submission's bias on its first token, and,
    where the engine runs the repair itself, the submission's ``EngineRepair`` penalties at every step."""
    bias = dict(sub.bias or {}) if first else {}
    spec = sub.engine_repair(len(PROMPT))
    if spec is not None:
        prompt = len(PROMPT) + len(sub.generated)
        for token, amount in spec.penalties(seq[:prompt], seq[prompt:]).items():
            bias[token] = bias.get(token, 0.0) - amount
    return bias or None


def run(guard: RequestGuard, model, chunk: int = 3, lag: int = 2, log=None):
    """Drive ``guard`` like an engine adapter: submit, stream in chunks, cancel when told (after ``lag``)."""
    released = []
    while (sub := guard.next_submission()) is not None:
        if log is not None:
            log.append(sub)
        seq = PROMPT + list(sub.generated)
        made = 0
        cancelled = False
        while made < sub.max_tokens:
            piece = []
            for _ in range(min(chunk, sub.max_tokens - made)):
                token = model(seq, step_bias(sub, seq, made == 0))
                seq.append(token)
                piece.append(token)
                made += 1
                if token == 0:
                    break
            finished = made >= sub.max_tokens or piece[-1] == 0
            if finished and piece[-1] == 0:
                cancel = guard.feed(sub, piece[:-1])
                if not cancel:
                    guard.end(sub, "stop", tail=piece[-1:])
                cancel = True
            else:
                cancel = guard.feed(sub, piece)
            released += guard.take_released() if not guard.done else []
            if cancel:
                for _ in range(lag):  # tokens in flight when the abort lands: the guard ignores them
                    assert guard.feed(sub, [77]) is True
                cancelled = True
                break
            if finished:
                guard.end(sub, "length")
                break
        assert cancelled or finished
    released += guard.state.releasable()
    return released


def test_a_calm_stream_is_one_untouched_submission():
    g = RequestGuard(RollbackPolicy(), max_new_tokens=60)
    subs = []
    out = run(g, fake_model(None), log=subs)
    assert len(subs) == 1 and subs[0].index == 0 and subs[0].bias is None and subs[0].max_tokens == 60
    plain = [1000 + len(PROMPT) + i for i in range(60)]
    assert g.tokens == plain and out == plain
    assert g.finish_reason == "length" and g.rollbacks == 0 and not g.report.detections


def test_an_eos_ends_the_request_and_is_kept():
    g = RequestGuard(RollbackPolicy(), max_new_tokens=60)
    run(g, fake_model(None, eos_at=7))
    assert g.finish_reason == "stop" and g.tokens[-1] == 0 and len(g.tokens) == 8


def test_a_confirmed_loop_is_cut_at_its_onset_and_its_next_token_banned():
    g = RequestGuard(RollbackPolicy(max_rollbacks=1), max_new_tokens=80)
    subs = []
    run(g, fake_model(12), log=subs)
    assert g.rollbacks == 1
    first, ban = subs[0], subs[1]
    det = g.report.detections[0]
    assert ban.index == 1 and ban.max_tokens == 1 and len(ban.generated) == det.onset
    plain = []
    seq = list(PROMPT)
    model = fake_model(12)
    for _ in range(80):
        seq.append(model(seq, None))
    plain = seq[len(PROMPT):]
    assert ban.bias == {plain[det.onset]: float("-inf")}, "the token that started the second copy is banned"
    assert list(ban.generated) == plain[: det.onset]
    assert subs[2].bias is None and subs[2].max_tokens == 80 - det.onset - 1, "then decoding continues"
    assert g.tokens[: det.onset] == plain[: det.onset] and g.tokens != plain
    assert first.neurons_off is False and all(not s.neurons_off for s in subs), "no neuron step unless offered"
    assert "rollback" in [a.level for a in g.report.actions]


def test_the_last_pass_escalates_with_one_token_penalty_steps_and_can_give_up():
    cfg = GuardConfig(stop_after=4)
    g = RequestGuard(RollbackPolicy(cfg, max_rollbacks=0), max_new_tokens=120)
    subs = []
    run(g, fake_model(12), log=subs)
    steps = [s for s in subs if s.bias]
    assert steps and all(s.max_tokens == 1 and all(v < 0 for v in s.bias.values()) for s in steps)
    assert g.report.detections and g.report.max_level in ("escalate", "stop")


def test_max_rollbacks_bounds_the_resubmissions_and_reports_repetition():
    # Without the repeat penalty the fake model falls back into its loop on every re-decode.
    g = RequestGuard(RollbackPolicy(GuardConfig(escalate=False), max_rollbacks=2, repair_multiplier=0),
                     max_new_tokens=100)
    run(g, fake_model(12))
    assert g.rollbacks == 2
    assert g.finish_reason == "repetition" and g.report.finish_reason == "repetition"


@pytest.mark.parametrize("holdback", [0, 12, 110])
def test_released_tokens_are_final_and_add_up_to_the_result(holdback):
    g = RequestGuard(RollbackPolicy(settings={"holdback": holdback}), max_new_tokens=90)
    out = run(g, fake_model(12))
    assert out == g.tokens, "every released token is final; together they are the result"
    if holdback == 110:
        assert g.rollbacks >= 1
    if holdback == 0:
        assert g.rollbacks == 0 and g.finish_reason == "repetition", "a rollback never retracts released text"


def test_neuron_step_is_asked_for_on_re_decodes_only():
    g = RequestGuard(RollbackPolicy(max_rollbacks=1), max_new_tokens=80, neuron_step=True)
    subs = []
    run(g, fake_model(12), log=subs)
    assert subs[0].neurons_off is False
    assert all(s.neurons_off for s in subs[1:])
    assert g.form == "tokens+neurons"


def test_seeds_of_resubmissions_are_derived_and_reproducible():
    assert derive_seed(None, 3) is None and derive_seed(7, 0) == 7
    # Fixed values: a seeded request resubmits with the same seeds in every process and release.
    assert (derive_seed(7, 1), derive_seed(7, 2)) == (7007940, 7015859)


def test_settings_a_token_stream_cannot_run_are_refused_by_name():
    with pytest.raises(ConfigError, match="monitor_gate"):
        RequestGuard(RollbackPolicy(GuardConfig(monitor_gate=1.0)), 10)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        RequestGuard(RollbackPolicy(), 0)
    with pytest.raises(ConfigError, match="max_rollbacks"):
        RollbackPolicy(settings={"max_rollbacks": -1})
    with pytest.raises(ConfigError, match="holdback"):
        RollbackPolicy(settings={"holdback": "12"})
    with pytest.raises(ConfigError, match="repair_multiplier"):
        RollbackPolicy(settings={"repair_multiplier": -1.0})


def test_the_result_ends_the_paper_loop_more_often_than_not():
    looped = fixed = 0
    for period in (11, 12, 13, 15, 20):
        seq = list(PROMPT)
        model = fake_model(period)
        for _ in range(100):
            seq.append(model(seq, None))
        looped += find_repetition(seq[len(PROMPT):]) is not None
        g = RequestGuard(RollbackPolicy(), max_new_tokens=100)
        run(g, model)
        fixed += g.rollbacks > 0
    assert looped == 5 and fixed == 5


def test_greedy_streams_resubmit_only_when_the_engine_picks_the_penalised_token():
    """Under greedy decoding a penalty on a token the engine did not pick changes nothing: the guard waits,
    and steps back only when the engine picked it. Same tokens as applying every penalty, fewer submissions."""
    cfg = GuardConfig(stop_after=4)
    eager, lazy = [], []
    a = RequestGuard(RollbackPolicy(cfg, max_rollbacks=0), max_new_tokens=120)
    run(a, fake_model(12), log=eager)
    b = RequestGuard(RollbackPolicy(cfg, max_rollbacks=0), max_new_tokens=120, greedy=True)
    run(b, fake_model(12), log=lazy)
    assert b.tokens == a.tokens and b.finish_reason == a.finish_reason
    assert len(lazy) <= len(eager)
    assert any(s.bias for s in lazy), "the penalised token was picked at least once"


def test_without_the_neuron_step_no_report_claims_switched_off_neurons():
    g = RequestGuard(RollbackPolicy(max_rollbacks=2), max_new_tokens=100)
    run(g, fake_model(12))
    assert g.rollbacks >= 1
    assert "deactivate" not in [a.level for a in g.report.actions]
    assert g.form == "tokens"
    h = RequestGuard(RollbackPolicy(max_rollbacks=2), max_new_tokens=100, neuron_step=True)
    run(h, fake_model(12))
    assert "deactivate" in [a.level for a in h.report.actions], "with the neuron step, re-decodes report it"


def test_engine_outputs_that_end_on_a_stop_token_keep_it_unwatched():
    g = RequestGuard(RollbackPolicy(), max_new_tokens=50)
    sub = g.next_submission()
    assert g.feed_output(sub, [5, 6, 7]) is False
    assert g.feed_output(sub, [8, 0], "stop", 0) is True
    assert g.tokens == [5, 6, 7, 8, 0] and g.finish_reason == "stop" and g.stop_reason == 0
    assert g.report.tokens_observed == 4


def reference_redecode(model, plain: list[int], onset: int, max_new: int, repair) -> list[int]:
    """The re-decode as a per-token sampler would run it: the loop's next token banned at the first step,
    the repeat penalty subtracted at every step (``model`` takes a bias the way an argmax would)."""
    seq = PROMPT + plain[:onset]
    gen = list(plain[:onset])
    first = True
    while len(gen) < max_new:
        bias = {t: -a for t, a in repair.penalties(gen[-repair.last_n:]).items()} if gen else {}
        if first:
            bias[plain[onset]] = float("-inf")
            first = False
        token = model(seq, bias)
        seq.append(token)
        gen.append(token)
    return gen


@pytest.mark.parametrize("greedy", [False, True])
def test_the_re_decode_repair_equals_penalising_every_step_and_ends_the_loop(greedy):
    """The repeat penalty is applied by resubmission only when the engine picks a penalised token, which gives
    exactly the tokens of penalising every step; with it, one rollback ends the fake model's loop, which
    falls back into the same loop on every re-decode without it."""
    model = fake_model(12)
    seq = list(PROMPT)
    for _ in range(100):
        seq.append(model(seq, None))
    plain = seq[len(PROMPT):]
    cfg = GuardConfig(escalate=False, stop=False)
    g = RequestGuard(RollbackPolicy(cfg, max_rollbacks=1), max_new_tokens=100, greedy=greedy)
    subs = []
    run(g, model, log=subs)
    assert g.rollbacks == 1 and g.finish_reason == "length"
    onset = g.report.detections[0].onset
    assert g.tokens == reference_redecode(model, plain, onset, 100, g.policy.repair)
    assert find_repetition(g.tokens) is None, "the loop is gone"
    assert any(s.bias and s.max_tokens == 1 for s in subs[2:]), "penalised picks were decoded again"

    without = RequestGuard(RollbackPolicy(cfg, max_rollbacks=1, repair_multiplier=0), max_new_tokens=100,
                           greedy=greedy)
    run(without, model)
    assert find_repetition(without.tokens) is not None, "banning only the loop's next token: the loop returns"


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("rollbacks", [1, 2, 0])
def test_an_engine_that_runs_the_repair_itself_gives_the_same_tokens_with_one_submission_per_pass(rollbacks, greedy):
    """The engine applies each re-decode's repair (penalties at every step, the ban on the first token); the
    tokens are those of the resubmission path, and a rollback costs one submission, not one per penalised
    pick. With no rollback left (0), the last pass's escalation still steps in beyond the repair (when the
    engine picked the token under greedy decoding, at once otherwise)."""
    cfg = GuardConfig(stop_after=4) if rollbacks == 0 else GuardConfig(escalate=False, stop=False)
    model = fake_model(12)
    by_resubmission, in_engine = [], []
    a = RequestGuard(RollbackPolicy(cfg, max_rollbacks=rollbacks), max_new_tokens=120, greedy=greedy)
    run(a, model, log=by_resubmission)
    b = RequestGuard(RollbackPolicy(cfg, max_rollbacks=rollbacks), max_new_tokens=120, greedy=greedy,
                     engine_repair=True)
    run(b, model, log=in_engine)
    assert b.tokens == a.tokens and b.finish_reason == a.finish_reason and b.rollbacks == a.rollbacks
    if rollbacks:
        assert b.rollbacks >= 1 and find_repetition(b.tokens) is None
        assert len(in_engine) == 1 + b.rollbacks, "one submission per pass"
        assert len(by_resubmission) > len(in_engine) + 2
        assert in_engine[0].repair is None, "the first pass is never written to"
        assert all(s.repair is not None and s.repair.penalty is not None and s.bias is None for s in in_engine[1:])
        bans = [t for s in by_resubmission for t, v in (s.bias or {}).items() if v == float("-inf")]
        assert [s.repair.ban for s in in_engine[1:]] == bans, "the loop's next token, banned on the first step"
    else:
        assert any(s.bias for s in in_engine), "the escalation penalty is applied by a one-token step"


def run_applying_pending(guard: RequestGuard, model, log: list) -> None:
    """Drive ``guard`` like ``repguard serve``'s engine under greedy decoding: one token per step, the guard's
    ``pending_penalties`` added to every step's logits (the submission's own bias on its first), and each
    token fed as picked with them."""
    while (sub := guard.next_submission()) is not None:
        log.append(sub)
        seq = PROMPT + list(sub.generated)
        for made in range(sub.max_tokens):
            bias = dict(sub.bias or {}) if made == 0 else {}
            for token, amount in guard.pending_penalties.items():
                bias[token] = bias.get(token, 0.0) - amount
            token = model(seq, bias or None)
            seq.append(token)
            if guard.feed(sub, [token], penalised=True):
                break
        else:
            guard.end(sub, "length")


@pytest.mark.parametrize("rollbacks", [1, 2])
def test_a_greedy_engine_that_adds_the_pending_penalties_gives_the_same_tokens_without_re_steps(rollbacks):
    """An engine that adds the guard's pending penalties to a greedy request's every step picks what a
    one-token step with them would; fed as such (``penalised=True``), its pick is taken, not decoded again:
    the same tokens, and a rollback costs its ban step and one continuation, not one step per penalised
    pick (``repguard serve`` restarted the row 49 times for one rollback of a 150-token request)."""
    cfg = GuardConfig(escalate=False, stop=False)
    model = fake_model(12)
    by_resubmission, applying = [], []
    a = RequestGuard(RollbackPolicy(cfg, max_rollbacks=rollbacks), max_new_tokens=120, greedy=True)
    run(a, model, chunk=1, log=by_resubmission)
    b = RequestGuard(RollbackPolicy(cfg, max_rollbacks=rollbacks), max_new_tokens=120, greedy=True)
    run_applying_pending(b, model, applying)
    assert b.tokens == a.tokens and b.finish_reason == a.finish_reason and b.rollbacks == a.rollbacks >= 1
    assert find_repetition(b.tokens) is None
    assert len(applying) <= 1 + 2 * b.rollbacks < len(by_resubmission)


def test_an_engine_repair_is_sent_as_json_and_bad_specs_are_refused_by_name():
    from repguard.repair import EngineRepair

    g = RequestGuard(RollbackPolicy(max_rollbacks=1), max_new_tokens=60, engine_repair=True)
    first = g.next_submission()
    loop = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    assert first.repair is None and g.feed(first, [1, 2] + loop * 3) is True
    sub = g.next_submission()
    assert sub.bias is None and sub.max_tokens == 60 - len(sub.generated)
    spec = sub.engine_repair(prompt_len=3)
    assert spec.skip == 3 and spec.ban == 5 and spec.penalty == g.policy.repair
    assert EngineRepair.from_json(spec.to_json()) == spec
    for bad, name in (('{"skip": -1}', "skip"), ('{"skip": 1, "ban": "x"}', "ban"), ("[1]", "object"),
                      ('{"skip": 0, "penalty": {"base": 0.5}}', "base"), ('{"skip": 0, "penalty": {"x": 1}}', "penalty"),
                      ('{"skip": 0, "penalty": {"multiplier": NaN}}', "multiplier"), ("{", "JSON"),
                      # one request's repair runs inside the engine step the whole batch waits for: bounded
                      ('{"skip": 0, "penalty": {"max_match": 1000000000, "last_n": 0}}', "max_match must be <= 64"),
                      ('{"skip": 0, "penalty": {"last_n": 10000000}}', "last_n must be <= 100000")):
        with pytest.raises(ConfigError, match=name):
            EngineRepair.from_json(bad)


def test_a_stream_that_never_rolls_back_is_never_penalised():
    """The repair is a re-decode's: text with repeats that never makes the paper's loop gets no bias at all."""
    def echo(seq, bias):  # repeats 4-token phrases twice, never three copies in a row
        n = len(seq) - len(PROMPT)
        token = 2000 + (n // 8) * 4 + n % 4
        assert not bias
        return token

    g = RequestGuard(RollbackPolicy(), max_new_tokens=80, greedy=True)
    subs = []
    run(g, echo, log=subs)
    assert len(subs) == 1 and g.rollbacks == 0


def test_a_loop_with_copies_further_apart_than_a_third_of_the_window_is_caught_by_a_wider_watch_window():
    """Copies 50 tokens apart: three of them span 110 tokens, so the paper's criterion at r=100 never sees the
    loop and the text goes out untouched; watched at r=200 it is rolled back and the loop ends."""
    model = fake_model(50)
    seq = list(PROMPT)
    for _ in range(200):
        seq.append(model(seq, None))
    plain = seq[len(PROMPT):]
    narrow = RequestGuard(RollbackPolicy(GuardConfig(escalate=False, stop=False), watch_window=100),
                          max_new_tokens=200, greedy=True)
    run(narrow, model)
    assert narrow.rollbacks == 0 and narrow.tokens == plain and find_repetition(plain, r=200) is not None
    wide = RequestGuard(RollbackPolicy(GuardConfig(escalate=False, stop=False), watch_window=200),
                        max_new_tokens=200, greedy=True)
    run(wide, model)
    assert wide.rollbacks >= 1 and wide.report.detections[0].period == 50
    assert find_repetition(wide.tokens, r=200) is None, "the long-period loop is gone"


def test_a_loop_behind_an_earlier_copy_of_its_phrase_is_still_rolled_back():
    """A 10-gram said once early, then three equally spaced copies of it that end by themselves: the paper's
    rule at the watch window (200) takes the early copy as the first of the three and never fires, so the
    loop would go out untouched; the default spacing (any three in a row) rolls it back."""
    g10 = list(range(100, 110))
    plan = (list(range(500, 510)) + g10 + list(range(2000, 2090)) + g10 + list(range(3000, 3005)) + g10
            + list(range(3100, 3105)) + g10 + list(range(4000, 4060)))

    def scripted(seq, bias):  # follows the plan until a bias turns it off it, then says fresh tokens
        n = len(seq) - len(PROMPT)
        on_plan = seq[len(PROMPT):] == plan[:n]
        token = plan[n] if on_plan and n < len(plan) else 9000 + n
        return 9000 + n if bias and bias.get(token, 0) < 0 else token

    paper = RequestGuard(RollbackPolicy(GuardConfig(paper_spacing="first")), max_new_tokens=len(plan), greedy=True)
    run(paper, scripted)
    assert paper.rollbacks == 0 and paper.tokens == plan
    assert find_repetition(plan) is not None, "the loop is there: the paper's own detector at r=100 sees it"
    guarded = RequestGuard(RollbackPolicy(), max_new_tokens=len(plan), greedy=True)
    run(guarded, scripted)
    assert guarded.rollbacks == 1 and guarded.report.detections[0].period == 15
    assert guarded.tokens[:125] == plan[:125], "kept up to the loop's second copy"
    assert find_repetition(guarded.tokens) is None and find_repetition(guarded.tokens, r=200) is None


def test_watch_settings_reach_the_passes_they_name():
    policy = RollbackPolicy(GuardConfig(), watch_window=300, redecode_max_period=256, max_rollbacks=2)
    first, redecode, last = policy.pass_config(0), policy.pass_config(1), policy.pass_config(2)
    assert first.window == redecode.window == last.window == 300 and not first.suffix_trigger
    assert first.max_period == GuardConfig().max_period and redecode.max_period == last.max_period == 256
    assert policy.holdback == 160, "held back: half the watch window plus the n-gram, so no rollback takes back text"
    assert RollbackPolicy().holdback == 210 and RollbackPolicy().pass_config(0).window == 400, "the defaults"
    with pytest.raises(ConfigError, match="window"):
        RollbackPolicy(GuardConfig(), watch_window=5)  # shorter than the n-gram
    with pytest.raises(ConfigError, match="redecode_max_period"):
        RollbackPolicy(GuardConfig(), redecode_max_period=0)


def test_cut_back_goes_to_an_earlier_repeat_in_the_kept_text():
    """A confirmed loop whose kept text already holds two back-to-back copies of a 14-token span: with
    ``cut_back`` the re-decode starts at that earlier repeat (and bans its first token), so the repeat does not
    stay in the output; without it only the confirmed loop's copy is cut."""
    from repguard.policy import Detection, SequenceReport

    span = list(range(100, 114))
    text = list(range(10, 20)) + span + span + list(range(200, 240))
    loop_onset = 60
    def report():  # a pass's report (end_pass takes it over)
        return SequenceReport(detections=[Detection(position=70, onset=loop_onset, period=10, trigger="paper")],
                              finish_reason="repetition")

    plain = RollbackPolicy(GuardConfig(), max_rollbacks=2, cut_back=False).start(100)
    assert plain.end_pass(text, report()) and plain.kept == text[:loop_onset]
    back = RollbackPolicy(GuardConfig(), max_rollbacks=2).start(100)  # the default
    assert back.end_pass(text, report())
    assert back.kept == text[:24] and back.ban == span[0], "cut to the start of the span's second copy"
    calm = RollbackPolicy(GuardConfig(), max_rollbacks=2).start(100)
    calm_text = list(range(10, 90))
    assert calm.end_pass(calm_text, report()) and calm.kept == calm_text[:loop_onset], "nothing earlier: the onset"


def test_the_device_form_of_the_repair_penalty_is_the_same_rule():
    """``RepeatPenalty.penalty_row`` (what an engine computes on its device, model runner V2) gives exactly the
    amounts of ``penalties`` on random and repeating texts, with windows, caps and sequence breakers."""
    import random

    import torch

    from repguard.repair import RepeatPenalty

    rng = random.Random(0)
    for _ in range(600):
        vocab = rng.choice([3, 5, 12, 40])
        n = rng.randint(0, 120)
        ids = [rng.randrange(vocab) for _ in range(n)]
        if rng.random() < 0.5 and n > 10:
            ids = (ids[: rng.randint(2, 10)] * 20)[:n]  # a loop
        rule = RepeatPenalty(rng.choice([0.8, 1.6, 1.0]), rng.choice([1.0, 1.75, 2.0]), rng.randint(1, 4),
                             rng.choice([0, 16, 64]), rng.choice([3, 50]), rng.choice([1e4, 5.0]),
                             frozenset(rng.sample(range(vocab), rng.randint(0, 1))))
        expected = torch.zeros(vocab)
        for token, amount in rule.penalties(ids).items():
            expected[token] = amount
        assert torch.equal(rule.penalty_row(torch.tensor(ids, dtype=torch.long), vocab), expected), (ids, rule)
    assert RepeatPenalty(1.0, 2.0, 2).penalty_row(torch.tensor([5, 6, 7, 8, 5, 6, 7]), 10)[8] == 2.0
    # A base so large that base ** excess overflows a float: the cap, on the host as on the device (the host
    # raised OverflowError, and an engine then dropped that request's repair, its ban included)
    big = RepeatPenalty(1.0, 1e20, 1, max_match=50)
    ids = list(range(5, 30)) + [4] + list(range(5, 29))  # a 24-token repeat: 1e20 ** 23 is past a float
    assert big.penalties(ids) == {29: big.max_penalty}
    assert big.penalty_row(torch.tensor(ids), 40)[29] == big.max_penalty


# -- stop strings and one-token steps at a resubmission's edges ---------------------------------------------

LOOP = list(range(5, 17))


def _rolled_back(**policy) -> RequestGuard:
    """A greedy request whose loop was confirmed and rolled back to 14 kept tokens (1 2 5..16); its one-token
    ban step is the submission to send."""
    g = RequestGuard(RollbackPolicy(max_rollbacks=1, **policy), max_new_tokens=100, greedy=True)
    assert g.feed(g.next_submission(), [1, 2] + LOOP * 3)
    return g


def _chars(ids) -> str:  # one character per id: 500 is 'a', 501 'b', the rest other letters
    return "".join({500: "a", 501: "b"}.get(t, chr(0x100 + t % 200)) for t in ids)


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_stop_string_across_a_resubmissions_start_is_looked_for_whatever_the_chunk_size(chunk):
    """An engine may send several tokens in one output (vLLM merges the outputs a slow reader has not taken):
    a stop string begun before the resubmission and ended in its first chunk is still looked for."""
    g = _rolled_back()
    step = g.next_submission()
    assert step.max_tokens == 1
    g.feed(step, [500])  # 'a'
    g.feed(g.next_submission(), [501, 900, 901][:chunk])  # 'b' first
    assert "ab" in _chars(g.tokens)
    assert g.stop_may_straddle(["ab"])


def test_a_stop_string_whose_end_is_byte_tokens_is_looked_for_over_all_of_them():
    """A stop string "5😀" whose emoji a byte-fallback tokenizer writes as four one-byte tokens: its end takes
    four tokens of the resubmission, and a bound in characters (two) would stop looking after two."""
    g = _rolled_back()
    step = g.next_submission()
    g.feed(step, [500])  # '5', the ban step
    rest = g.next_submission()
    assert rest.max_tokens > 1
    for byte in (900, 901, 902):  # three of the emoji's four bytes: still looked for
        assert not g.feed(rest, [byte])
        assert g.stop_may_straddle(["5😀"])
    assert not g.feed(rest, [903])
    assert g.stop_may_straddle(["5😀"])  # its fourth byte: the token that completes it
    assert not g.feed(rest, [904])
    assert not g.feed(rest, [905])
    assert not g.stop_may_straddle(["5😀"])  # a chunk from the sixth token on: past what the stop string can take


def test_a_stop_string_completed_by_the_token_that_reaches_the_length_is_still_looked_for():
    """The request reached its budget on the token that completes a stop string begun in the kept text: vLLM
    ends such a request with "stop" (it checks stop strings before the length); the check was skipped once the
    request was done."""
    g = RequestGuard(RollbackPolicy(max_rollbacks=1), max_new_tokens=40, greedy=True)
    assert g.feed(g.next_submission(), [1, 2] + LOOP * 3)
    g.feed(g.next_submission(), [500])  # the ban step
    rest = g.next_submission()
    new = [600 + i for i in range(rest.max_tokens)]
    stop = _chars(g.tokens[-1:] + new)  # begins in the kept text, ends on the budget's last token
    for i, t in enumerate(new):
        g.feed_output(rest, [t], "length" if i == len(new) - 1 else None)
    assert g.done and g.finish_reason == "length" and len(g.tokens) == 40
    assert g.stop_may_straddle([stop])
    g.finish("stop", stop)
    assert g.finish_reason == "stop" and g.stop_reason == stop


def test_a_penalised_pick_that_completes_a_stop_string_is_decoded_again():
    g = _rolled_back()
    g.feed(g.next_submission(), [300])  # the ban step
    full = g.next_submission()
    g.feed(full, [5, 6])  # repeats "5 6" of the kept text: a next 7 is penalised
    assert 7 in g.pending_penalties
    assert g.feed_output(full, [7], "stop", "</end>")  # the engine stopped on a stop string 7 completed
    assert not g.done
    step = g.next_submission()  # the same position again, with 7 penalised
    assert step.max_tokens == 1 and list(step.generated[-2:]) == [5, 6] and step.bias.get(7, 0) < 0


def test_a_one_token_step_the_engine_ends_with_no_token_ends_the_request():
    """A step that returns no token (its context is full) is not sent again, unchanged, forever."""
    g = _rolled_back()
    step = g.next_submission()
    assert step.max_tokens == 1
    g.feed_output(step, [], "length")
    assert g.done and g.finish_reason == "length" and g.next_submission() is None


def test_rollback_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match="max_rollback: Extra inputs"):
        RollbackPolicy(max_rollback=0)  # misspelled: refused, not dropped
    with pytest.raises(ConfigError, match=r"watch_window \(11\)"):
        RollbackPolicy(watch_window=11)
    with pytest.raises(ConfigError, match=r"redecode_max_period \(256\)"):
        RollbackPolicy(GuardConfig(max_period=300, min_repeat=1100))
    assert RollbackPolicy(max_rollbacks=0).max_rollbacks == 0


@pytest.mark.parametrize("field, value", [("stop_after", True), ("k", True), ("deactivate_window", False),
                                          ("penalty_multiplier", True), ("layers", (True, False))])
def test_true_and_false_are_not_numbers_in_guard_settings(field, value):
    with pytest.raises(ConfigError, match=field):
        GuardConfig(**{field: value})
    with pytest.raises(ConfigError, match=field):
        GuardConfig.from_dict({field: value})


@pytest.mark.parametrize("budget", [True, 2.5, float("nan"), None, "5", 0])
def test_a_budget_that_is_not_a_positive_integer_is_refused_by_name(budget):
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer >= 1"):
        RequestGuard(RollbackPolicy(), max_new_tokens=budget)


def test_a_numpy_integer_budget_is_an_integer():
    np = pytest.importorskip("numpy")
    g = RequestGuard(RollbackPolicy(), max_new_tokens=np.int64(5))
    assert g.next_submission().max_tokens == 5 and type(g.next_submission().max_tokens) is int


def test_the_monitor_is_one_submission_that_reports_the_loop_and_holds_nothing_back():
    """vLLM's front and the upstream proxy run the monitor as they run a guard off: one submission, the engine's
    own tokens, released as they come; the report says where the loop is."""
    subs = []
    g = RequestGuard(RollbackPolicy(GuardConfig.from_preset("monitor")), max_new_tokens=90)
    out = run(g, fake_model(12), log=subs)
    assert len(subs) == 1 and g.rollbacks == 0 and out == g.tokens and len(g.tokens) == 90
    assert g.report.detections and g.finish_reason != "repetition"


def test_a_rolled_back_output_that_ends_inside_a_character_ends_before_it_as_vllm_does():
    """A resubmitted output whose last token is the first half of a character (an emoji cut by max_tokens):
    its text ends before that character, as vLLM's own output does, not in a U+FFFD that vLLM never sends."""
    from repguard.request_guard import end_text

    cut = b"list: \xf0\x9f\x91\xa9\xf0\x9f".decode("utf-8", "replace")  # a whole emoji, then half of one
    assert cut.endswith("\ufffd")
    assert end_text(cut, "length", None) == "list: \U0001f469"
    assert end_text(cut, "repetition", None) == "list: \U0001f469"
    assert end_text("a\ufffdb", "length", None) == "a\ufffdb", "only at the end"


def test_a_neurons_off_submission_keeps_a_salt_vllm_accepts_for_any_caller_salt():
    """vLLM's server refuses a cache_salt over 128 characters: the neurons-off salt of a long caller salt stays
    within it, differs from the caller's, and is the same for the same caller (its resubmissions share a cache)."""
    from repguard.request_guard import NEURONS_OFF_SALT, Submission, submission_salt

    off = Submission(1, 1, (), 10, None, True)
    on = Submission(1, 1, (), 10, None, False)
    long_salt = "t" * 128
    assert submission_salt(long_salt, on) == long_salt and submission_salt(None, on) is None
    got = submission_salt(long_salt, off)
    assert len(got) <= 128 and got != long_salt and got == submission_salt(long_salt, off)
    assert got.endswith(NEURONS_OFF_SALT) and submission_salt("t" * 127, off) != got
    assert submission_salt("tenant", off) == f"tenant|{NEURONS_OFF_SALT}" and submission_salt(None, off) == NEURONS_OFF_SALT


def test_the_default_holdback_covers_any_loop_the_first_three_rule_confirms():
    """With the paper's first-three rule, a loop's onset can lie almost a whole window back (an early chance copy
    of the n-gram is the first of the three): the default hold-back is then the window plus the n-gram, so a
    streamed request still rolls the loop back instead of ending at it."""
    g = list(range(100, 110))

    tokens: list[int] = []  # the n-gram at 0, 30, then every 50 tokens: the first three in a 400-token window
    for start in [0, 30] + list(range(80, 600, 50)):  # are unequal until 0 and 30 leave it
        tokens += [1000 + len(tokens) + i for i in range(start - len(tokens))] + g

    policy = RollbackPolicy(GuardConfig(paper_spacing="first", escalate=False), max_rollbacks=1)
    assert policy.holdback == 410
    # a 100-token window: 110 for the paper criterion, but the re-decodes' suffix trigger (periods up to 256, 1.5
    # copies) can put an onset 128 tokens back, and the hold-back covers it
    assert RollbackPolicy(GuardConfig(paper_spacing="first"), watch_window=100).holdback == 129
    assert RollbackPolicy(GuardConfig(paper_spacing="first"), watch_window=100, redecode_max_period=64).holdback == 110
    guard = RequestGuard(policy, max_new_tokens=len(tokens) + 20)
    sub = guard.next_submission()
    for token in tokens:  # streamed: what is older than the hold-back is handed out as it comes
        over = guard.feed(sub, [token])
        guard.take_released()
        if over:
            break
    assert guard.rollbacks == 1, "the loop was taken back, not ended with the copies already streamed"


def test_a_resubmission_bias_never_exceeds_what_vllms_v2_runner_accepts():
    """vLLM's model runner V2 refuses a request with more than 1024 logit_bias entries inside its worker, which
    fails the engine. A long kept text with frequency/presence penalties has more distinct tokens than that:
    the bias keeps the caller's entries and the guard's ban, then the most penalised kept tokens."""
    from repguard.request_guard import MAX_BIAS_TOKENS, Submission, submission_bias

    v2 = pytest.importorskip("vllm.v1.worker.gpu.sample.logit_bias", reason="needs the vllm extra")
    assert MAX_BIAS_TOKENS <= v2.MAX_NUM_LOGIT_BIAS_TOKENS
    kept = tuple(range(1000, 3000)) + (7,) * 5 + (8,) * 3  # 2002 distinct tokens; 7 and 8 repeated
    own = {i: 1.0 for i in range(100, 140)}
    sub = Submission(index=2, attempt=1, generated=kept, max_tokens=1, bias={9: float("-inf")}, neurons_off=False)
    bias = submission_bias(own, sub, presence=0.5, frequency=0.25)
    assert len(bias) == MAX_BIAS_TOKENS
    assert all(bias[t] == 1.0 for t in own) and bias[9] == float("-inf"), "the caller's bias and the ban stay"
    assert bias[7] == pytest.approx(-(0.25 * 5 + 0.5)) and bias[8] == pytest.approx(-(0.25 * 3 + 0.5))
    short = Submission(index=2, attempt=1, generated=(5, 6, 5), max_tokens=9, bias=None, neurons_off=False)
    assert submission_bias({6: 2.0}, short, presence=0.5, frequency=0.25) == {6: 1.25, 5: -1.0}
    assert submission_bias(None, short, presence=0.0, frequency=None) is None


def test_a_refused_resubmission_fails_open_and_the_rest_carries_nothing_of_the_guard(caplog):
    """The engine refuses a resubmission (``RequestGuard.refused``): the request goes on unguarded from the tokens
    kept, with a plain submission (no bias of the guard's, the caller's own kept); the caller's own request, or
    that plain rest, is not the guard's to absorb. The refusal, which a client's own settings can cause on every
    request, is logged in one line with the engine's reason, not as a guard failure with a traceback."""
    from repguard.request_guard import add_bias, carried_bias, submission_bias

    g = RequestGuard(RollbackPolicy(), max_new_tokens=80)
    first = g.next_submission()
    assert g.refused(first) is False, "the caller's own request: its error is the caller's"
    loop = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    assert g.feed(first, [1, 2] + loop * 3)
    ban = g.next_submission()
    assert ban.bias and not ban.plain
    with caplog.at_level("WARNING", logger="repguard"):
        try:
            raise ValueError("logit_bias is not supported")
        except ValueError:
            assert g.refused(ban) is True and g.broken and g.report.errors == 1
    (rec,) = [r for r in caplog.records if r.name.startswith("repguard")]
    assert rec.levelname == "WARNING" and rec.exc_info is None and "logit_bias is not supported" in rec.getMessage()
    rest = g.next_submission()
    assert rest.plain and rest.bias is None and rest.generated == ban.generated
    assert rest.max_tokens == 80 - len(ban.generated)
    # the caller's own bias and the kept tokens' penalties (the caller's settings), no ban of the guard's
    kept_penalty = carried_bias(rest.generated, 0.5, 0.5)
    assert submission_bias({3: 1.0}, rest, presence=0.5, frequency=0.5) == add_bias({3: 1.0}, kept_penalty)
    assert submission_bias(None, rest, presence=0.0, frequency=0.0) is None, "no ban, no penalty of the guard's"
    assert g.refused(rest) is False, "the plain rest refused too: the adapter raises the engine's error"
    g.feed(rest, [40])
    assert g.stop_may_straddle(["<a stop>"]), "a stop string across the rest's start is still looked for"
    g.feed(rest, [41])
    g.end(rest, "stop")
    assert g.done and g.tokens == list(ban.generated) + [40, 41]


def test_a_caller_bias_at_the_limit_leaves_no_room_for_the_guards_step_and_says_so():
    """A caller whose own logit_bias has 1024 entries (what V2 accepts): the guard's ban on another token would
    push a resubmission past the limit (V2's engine would fail). It is not dropped silently (the guard would think
    the loop's token banned): ``BiasLimitError``, which the adapters treat as a refused submission. With room for
    the ban, the carried penalties fill only what is left."""
    from repguard.request_guard import MAX_BIAS_TOKENS, BiasLimitError, Submission, submission_bias

    own = {t: 0.5 for t in range(MAX_BIAS_TOKENS)}
    sub = Submission(index=1, attempt=1, generated=(3, 3, 5000), max_tokens=1, bias={6000: float("-inf")},
                     neurons_off=False)
    with pytest.raises(BiasLimitError, match="no room"):
        submission_bias(own, sub, presence=0.0, frequency=1.0)
    room = dict(list(own.items())[:-1])  # room for one more: the ban, before any carried penalty
    bias = submission_bias(room, sub, presence=0.0, frequency=1.0)
    assert set(bias) == set(room) | {6000} and bias[3] == -1.5 and bias[4] == 0.5


def test_a_one_token_step_running_when_the_guard_fails_does_not_end_the_request_early():
    """The guard fails while its one-token ban step runs: that step's token is passed through, and the request
    goes on unguarded for the rest of its budget (it ended at "length" after that one token)."""
    g = RequestGuard(RollbackPolicy(), max_new_tokens=80)
    first = g.next_submission()
    g.feed(first, [1, 2] + [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16] * 3)
    step = g.next_submission()
    assert step.max_tokens == 1
    try:
        raise RuntimeError("a fault inside the guard")
    except RuntimeError:
        g._fail(step)
    g.feed(step, [99])
    g.end(step, "length")
    assert not g.done and g.tokens == list(step.generated) + [99]
    rest = g.next_submission()
    assert rest.plain and rest.max_tokens == 80 - len(step.generated) - 1



def test_a_finished_sequence_releases_no_more_than_its_budget():
    """``releasable(finished=True)`` released every pass token, past ``max_new_tokens``, which ``end_pass`` then cut
    off the final output: released text that the output does not hold."""
    state = RollbackPolicy(max_rollbacks=1).start(max_new_tokens=5)
    assert state.releasable(list(range(10, 17)), finished=True) == [10, 11, 12, 13, 14]


def test_the_default_hold_back_covers_every_trigger_a_pass_watches_with():
    """With the suffix trigger in the first pass (``precise_trigger=False``) and long periods, a streamed request
    takes a loop back however the engine chunks its tokens: the hold-back covers the suffix trigger's reach too (it
    covered the paper criterion's only: a loop of period 500, seen 250 tokens after its onset, was released at one
    token per step and ended the request with "repetition", and rolled back in chunks of 300)."""
    import random

    rnd = random.Random(0)
    head = [rnd.randrange(1000, 2000) for _ in range(50)]
    block = [rnd.randrange(2000, 3000) for _ in range(500)]
    stream = head + block * 2
    policy = RollbackPolicy(GuardConfig(max_period=600), precise_trigger=False)
    assert policy.holdback >= 250
    assert RollbackPolicy(GuardConfig()).holdback == 210, "the defaults' hold-back is unchanged"
    outcomes = []
    for streamed, chunk in ((False, 1), (True, 1), (True, 300)):
        g = RequestGuard(policy, max_new_tokens=2000)
        sub = g.next_submission()
        for i in range(0, len(stream), chunk):
            cancel = g.feed(sub, stream[i:i + chunk])
            if streamed and not g.done:
                g.take_released()
            if cancel:
                break
        outcomes.append((g.rollbacks, g.finish_reason, g.report.detections[0].onset))
    assert outcomes == [(1, None, 550)] * 3


def test_the_papers_method_without_a_trigger_runs_on_any_engine():
    """The paper preset with both triggers off is a valid config (the neurons are simply off throughout): a
    request-level guard of it runs one pass with the neuron step where the engine has it, and passes the tokens
    through unguarded where it has not (its rollback policy could not be made, on every path)."""
    cfg = GuardConfig.from_preset("paper", paper_trigger=False, suffix_trigger=False)
    tokens = [5, 6, 7] * 20
    for neuron_step in (True, False):
        g = RequestGuard(RollbackPolicy(cfg), max_new_tokens=len(tokens), neuron_step=neuron_step)
        sub = g.next_submission()
        assert sub.neurons_off is neuron_step and g.policy.max_rollbacks == 0
        g.feed_output(sub, tokens, finish_reason="length")
        assert g.next_submission() is None and g.tokens == tokens and not g.broken and g.finish_reason == "length"
