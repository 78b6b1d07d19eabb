"""Rollback in place: every pass of a batch inside one ``generate`` call (looping rows are re-decoded from the
KV cache of their kept text while the other rows go on). It must give what the passes one after another give,
and leave every row that never triggers byte-identical to an unguarded run, greedy and sampled."""

import pytest
import torch

from conftest import padded_batch, random_map, tiny_model
from repguard.detect import find_repetition
from repguard.errors import ConfigError
from repguard.hf.rollback import generate_with_rollback

NEW = 60
LENGTHS = [4, 6, 5, 6, 3, 6, 2, 6]  # prompts of different lengths: a left-padded batch


def _padded_batch(seed: int = 3):
    return padded_batch(LENGTHS, seed)


def _cut(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def _eos(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def _count_generate_calls(model):
    calls = []
    original = model.generate

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.generate = counted
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_in_place_gives_the_passes_result_and_leaves_calm_rows_identical(arch):
    """Greedy, a padded batch: the same tokens as the passes one after another (the re-decode reads its kept
    text from the cache, at the same positions, with the discarded tokens masked), in one ``generate`` call.
    gpt2 has learned absolute positions: a wrong position for the re-fed token would change its text."""
    model = tiny_model(arch)
    ids, mask = _padded_batch()
    width = ids.shape[1]
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    plain = [_cut(r, _eos(model)) for r in plain[:, width:].tolist()]
    nmap = random_map(model, 32, 64)
    kw = dict(neuron_map=nmap, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    calls = _count_generate_calls(model)
    in_place = generate_with_rollback(model, ids, mask, overlap=True, **kw)
    assert len(calls) == 1, "every pass ran inside one generate call"
    passes = generate_with_rollback(model, ids, mask, overlap=False, **kw)
    assert len(calls) > 2, "the passes one after another: one call per pass"
    assert any(in_place.rollbacks), "the seeded batch has a looping row"
    assert in_place.sequences == passes.sequences
    assert in_place.rollbacks == passes.rollbacks
    for i, row in enumerate(plain):
        if in_place.rollbacks[i] == 0:
            assert in_place.sequences[i] == row and not in_place.reports[i].fired
        else:
            rep = find_repetition(row)
            assert rep is not None and in_place.sequences[i][: rep.p2] == row[: rep.p2]
            assert in_place.sequences[i] != row and len(in_place.sequences[i]) <= NEW
            assert "rollback" in [a.level for a in in_place.reports[i].actions]


def test_sampled_calm_rows_stay_identical_while_other_rows_are_rewound():
    """Seeded sampling: a rewound row changes its own inputs only, so the random numbers the other rows draw
    are the unguarded run's, step for step."""
    model = tiny_model("mistral")
    ids, mask = _padded_batch()
    width = ids.shape[1]
    kw = dict(do_sample=True, temperature=0.05, top_p=0.9, pad_token_id=0)
    torch.manual_seed(11)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kw)
    plain = [_cut(r, _eos(model)) for r in plain[:, width:].tolist()]
    torch.manual_seed(11)
    out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                 overlap=True, **kw)
    rolled = [i for i, n in enumerate(out.rollbacks) if n]
    calm = [i for i, n in enumerate(out.rollbacks) if not n]
    assert rolled and calm, "the seeded batch has both looping and calm rows"
    assert all(out.sequences[i] == plain[i] for i in calm)
    assert all(out.sequences[i] != plain[i] for i in rolled)


def test_in_place_streams_final_tokens_only():
    model = tiny_model("qwen2")
    ids, mask = _padded_batch()
    got: dict[int, list[int]] = {}

    def on_tokens(row, tokens):
        got.setdefault(row, []).extend(tokens)

    kw = dict(neuron_map=random_map(model, 32, 64), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    # The default hold-back is longer than any rollback: streaming changes nothing.
    out = generate_with_rollback(model, ids, mask, overlap=True, on_tokens=on_tokens, **kw)
    assert any(out.rollbacks)
    assert [got.get(i, []) for i in range(len(LENGTHS))] == out.sequences
    assert out.sequences == generate_with_rollback(model, ids, mask, overlap=True, **kw).sequences
    # A short one streams while decoding; a row whose rollback would take back streamed text ends instead.
    got.clear()
    out = generate_with_rollback(model, ids, mask, overlap=True, on_tokens=on_tokens, holdback=12, **kw)
    assert [got.get(i, []) for i in range(len(LENGTHS))] == out.sequences
    assert "repetition" in [r.finish_reason for r in out.reports]


def test_without_streaming_nothing_is_final_before_the_end():
    """Only streamed tokens are final. Without ``on_tokens`` the hold-back withholds nothing, so however short
    it is, a rollback is never refused for cutting into text that nobody was handed: in place rolls back
    exactly where the passes one after another do."""
    model = tiny_model("qwen2")
    ids, mask = _padded_batch()
    kw = dict(neuron_map=random_map(model, 32, 64), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
              holdback=12)
    in_place = generate_with_rollback(model, ids, mask, overlap=True, **kw)
    passes = generate_with_rollback(model, ids, mask, overlap=False, **kw)
    assert any(in_place.rollbacks)
    assert in_place.sequences == passes.sequences and in_place.rollbacks == passes.rollbacks
    assert "repetition" not in [r.finish_reason for r in in_place.reports]


def test_where_passes_cannot_overlap_they_run_one_after_another():
    """A batch without padding attends without a mask: masking a rewound row would give every row one (and
    another kernel), so by default such a batch runs pass after pass, and overlap=True says why it cannot."""
    model = tiny_model()
    ids = torch.randint(3, 256, (6, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    kw = dict(neuron_map=random_map(model, 32, 64), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    calls = _count_generate_calls(model)
    out = generate_with_rollback(model, ids, mask, **kw)
    assert any(out.rollbacks) and len(calls) > 1
    with pytest.raises(ConfigError, match="without padding"):
        generate_with_rollback(model, ids, mask, overlap=True, **kw)
    with pytest.raises(ConfigError, match="overlap"):
        generate_with_rollback(model, ids, mask, overlap="yes", **kw)
    # With padding, the same rows run in place.
    calls.clear()
    padded = torch.cat([torch.zeros(6, 1, dtype=torch.long), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(6, 1, dtype=torch.long), mask], dim=1)
    padded_mask[0, 0] = 1  # one row one token longer: the batch is padded
    generate_with_rollback(model, padded, padded_mask, **kw)
    assert len(calls) == 1


def test_a_guard_that_fails_mid_batch_leaves_the_batch_decoding_unguarded(monkeypatch, caplog):
    """The guard's step raises after a few tokens: the failure is logged and counted, no row is rolled back,
    and every row is the unguarded run's text (cut at the budget)."""
    from repguard import metrics
    from repguard.runtime import GuardRuntime

    model = tiny_model("qwen2")
    ids, mask = _padded_batch()
    width = ids.shape[1]
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    plain = [_cut(r, _eos(model)) for r in plain[:, width:].tolist()]
    original, steps = GuardRuntime.observe, []

    def failing(self, tokens, scores=None):
        steps.append(1)
        if len(steps) > 5:
            raise RuntimeError("injected failure")
        return original(self, tokens, scores)

    monkeypatch.setattr(GuardRuntime, "observe", failing)
    before = metrics.ERRORS.labels("tiny-in-place", "observe")._value.get()
    out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0, overlap=True, model_name="tiny-in-place")
    assert out.sequences == plain and not any(out.rollbacks)
    assert metrics.ERRORS.labels("tiny-in-place", "observe")._value.get() == before + 1
    assert "injected failure" in caplog.text or "unguarded" in caplog.text



@pytest.mark.parametrize("overlap", [None, False])
def test_a_guard_that_fails_at_the_prefill_leaves_the_batch_decoding_unguarded(monkeypatch, overlap):
    """The guard fails before its first step (while opening the rows' watch): both executors still return
    every row, as the unguarded run's text, and the failure is counted once."""
    from repguard import metrics
    from repguard.runtime import GuardRuntime

    model = tiny_model("llama")
    ids, mask = _padded_batch()
    width = ids.shape[1]
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    plain = [_cut(r, _eos(model)) for r in plain[:, width:].tolist()]

    def failing(self, *args, **kwargs):
        raise RuntimeError("injected failure at the prefill")

    monkeypatch.setattr(GuardRuntime, "reset", failing)
    name = f"tiny-prefill-{overlap}"
    before = metrics.ERRORS.labels(name, "observe")._value.get()
    out = generate_with_rollback(model, ids, mask, neuron_map=False, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0, overlap=overlap, model_name=name)
    assert out.sequences == plain and not any(out.rollbacks)
    assert metrics.ERRORS.labels(name, "observe")._value.get() == before + 1

def test_sliding_window_rows_that_would_outgrow_it_are_re_decoded_pass_after_pass():
    """A sliding window counts cache columns, not positions: a rewound row's discarded columns would take
    places in it, and the re-decode would see fewer of its own tokens than a fresh prefill gives. A rewound row
    that could outgrow the window is therefore re-decoded pass after pass (after the batch's generate call); the
    other rows stay in place. The result is the passes' own, and calm rows are the unguarded run's."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Gemma3TextConfig(vocab_size=256, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=128,
                                 num_key_value_heads=4, head_dim=16, sliding_window=24)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    assert "sliding_attention" in model.config.layer_types
    ids, mask = _padded_batch()
    width = ids.shape[1]
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    plain = [_cut(r, _eos(model)) for r in plain[:, width:].tolist()]
    kw = dict(neuron_map=random_map(model, 32, 64), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    calls = _count_generate_calls(model)
    in_place = generate_with_rollback(model, ids, mask, overlap=True, **kw)
    assert len(calls) > 1, "rewound rows that outgrow the window were re-decoded after the batch's call"
    passes = generate_with_rollback(model, ids, mask, overlap=False, **kw)
    assert any(in_place.rollbacks)
    assert in_place.sequences == passes.sequences and in_place.rollbacks == passes.rollbacks
    assert all(in_place.sequences[i] == plain[i] for i, n in enumerate(in_place.rollbacks) if not n)
    # Streamed, a deferred row's tokens are handed out by its later passes: together still its whole text.
    got: dict[int, list[int]] = {}
    streamed = generate_with_rollback(model, ids, mask, overlap=True,
                                      on_tokens=lambda row, toks: got.setdefault(row, []).extend(toks), **kw)
    assert streamed.sequences == passes.sequences
    assert [got.get(i, []) for i in range(len(LENGTHS))] == streamed.sequences



def test_a_callers_eos_token_id_ends_rows_as_it_ends_them_in_generate():
    """``eos_token_id`` given to the call, as to ``generate``: rows end at it (they once ran on, padded to the
    budget, because the guard knew only the model's own end token)."""
    model = tiny_model("qwen2")
    ids, mask = _padded_batch()
    width = ids.shape[1]
    first = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    end = first[0, width + 5].item()  # a token row 0 decodes at its sixth step
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                           eos_token_id=end)
    plain = [_cut(r, {end}) for r in plain[:, width:].tolist()]
    for overlap in (None, False):
        out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                     do_sample=False, pad_token_id=0, eos_token_id=end, overlap=overlap)
        assert out.sequences[0] == plain[0] and out.sequences[0][-1] == end and len(out.sequences[0]) <= 6
        assert all(out.sequences[i] == plain[i] for i in range(len(plain)) if not out.rollbacks[i])


@pytest.mark.parametrize("case", ["repetition_penalty", "generation_config", "right_padded"])
def test_settings_in_place_cannot_honour_run_pass_after_pass(case):
    """generate's own processors that read a row's tokens (a repetition penalty, from the call or from a
    generation config) would see a rewound row's discarded tokens, and a right-padded batch has no columns
    to hide them in: these run pass after pass, so the result is the passes' own."""
    from transformers import GenerationConfig

    model = tiny_model("gpt2")
    kw = dict(neuron_map=False, max_new_tokens=100, do_sample=False, pad_token_id=0)
    ids, mask = _padded_batch(seed=1)
    if case == "repetition_penalty":
        kw["repetition_penalty"] = 1.3
    elif case == "generation_config":
        kw["generation_config"] = GenerationConfig(repetition_penalty=1.3, do_sample=False,
                                                   eos_token_id=model.generation_config.eos_token_id)
    else:  # the same prompts, right-padded
        ids, mask = torch.zeros_like(ids), torch.zeros_like(mask)
        src, src_mask = _padded_batch(seed=1)
        for i, n in enumerate(LENGTHS):
            ids[i, :n] = src[i][src_mask[i].bool()]
            mask[i, :n] = 1
    calls = _count_generate_calls(model)
    default = generate_with_rollback(model, ids, mask, **kw)
    assert any(default.rollbacks) and len(calls) > 1, "pass after pass: one call per pass"
    assert default.sequences == generate_with_rollback(model, ids, mask, overlap=False, **kw).sequences
    with pytest.raises(ConfigError, match="cannot overlap"):
        generate_with_rollback(model, ids, mask, overlap=True, **kw)


def test_a_second_rollback_into_re_decoded_text_gives_the_passes_result():
    """A row rolled back twice, whose second cut keeps tokens of its first re-decode: those tokens' cache
    entries were computed with the mapped neurons off, while the passes one after another prefill them afresh
    with the neurons on. The row is deferred to a pass of its own, so both executors give the same text."""
    model = tiny_model("llama")
    ids, mask = _padded_batch(seed=0)
    kw = dict(neuron_map=random_map(model, 32, 64), max_new_tokens=150, do_sample=False, pad_token_id=0,
              repair={"repair_multiplier": 0})
    in_place = generate_with_rollback(model, ids, mask, overlap=True, **kw)
    passes = generate_with_rollback(model, ids, mask, overlap=False, **kw)
    assert 2 in in_place.rollbacks
    assert in_place.sequences == passes.sequences


def test_a_learned_position_table_filled_to_its_last_row_gives_the_roomy_models_text():
    """gpt2's positions index a learned table (``n_positions`` rows). A batch under rollback runs longer than an
    unguarded one: rows that ended (here row 0, at the call's end token) go on being fed while rewound rows
    re-decode, and a re-decode pass decodes to its longest row's budget. Those rows' positions once ran past the
    table: an IndexError where unguarded generate runs fine (on CUDA, a device assert). With the table just
    large enough for prompt + max_new_tokens, rollback gives the same text as the same weights with room to
    spare, in place and pass after pass."""
    import transformers as tf

    roomy = tiny_model("gpt2")
    limit = max(LENGTHS) + NEW
    tight = tf.AutoModelForCausalLM.from_config(tf.GPT2Config(**{**roomy.config.to_dict(), "n_positions": limit})).eval()
    state = roomy.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:limit]
    tight.load_state_dict(state, strict=False)
    tight.generation_config.pad_token_id = 0
    ids, mask = _padded_batch()
    width = ids.shape[1]
    end = roomy.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, width + 5].item()
    kw = dict(neuron_map=random_map(roomy, 32, 64), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
              eos_token_id=end)
    plain = tight.generate(ids, attention_mask=mask, **{k: v for k, v in kw.items() if k != "neuron_map"})
    for overlap in (True, False):
        want = generate_with_rollback(roomy, ids, mask, overlap=overlap, **kw)
        got = generate_with_rollback(tight, ids, mask, overlap=overlap, **kw)
        assert sum(n > 0 for n in want.rollbacks) >= 2 and len(want.sequences[0]) <= 6
        assert got.sequences == want.sequences and got.rollbacks == want.rollbacks
        calm = [i for i, n in enumerate(got.rollbacks) if not n]
        assert all(got.sequences[i] == _cut(plain[i, width:].tolist(), {end}) for i in calm)


def _plain(model, ids, mask):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return [_cut(r, _eos(model)) for r in out[:, ids.shape[1]:].tolist()]


@pytest.mark.parametrize("overlap", [None, False])
@pytest.mark.parametrize("where", ["repair", "cut_back", "streaming"])
def test_a_fault_of_rollback_itself_gives_the_unguarded_batch_logged_and_counted_once(monkeypatch, caplog, overlap,
                                                                                   where):
    """The re-decode's repair, the cut-back search or the streaming release raises: the caller still gets every
    row (the unguarded run's tokens; streamed rows continue from what they handed out), one log line, one count;
    no exception reaches ``generate_with_rollback``'s caller."""
    from repguard import metrics, repair, rollback

    model = tiny_model("llama")
    ids, mask = _padded_batch()
    plain = _plain(model, ids, mask)

    def failing(*args, **kwargs):
        raise RuntimeError("injected rollback failure")

    streamed: dict[int, list[int]] = {}
    kw = {}
    if where == "repair":
        monkeypatch.setattr(repair.RepeatPenalty, "penalties", failing)
    elif where == "cut_back":
        monkeypatch.setattr(rollback.RollbackPolicy, "earliest_loop", failing)
    else:
        monkeypatch.setattr(rollback.RollbackState, "releasable", failing)
        kw["on_tokens"] = lambda row, tokens: streamed.setdefault(row, []).extend(tokens)
    name = f"tiny-rb-fault-{where}-{overlap}"
    before = metrics.ERRORS.labels(name, "rollback")._value.get()
    with caplog.at_level("WARNING", logger="repguard"):
        out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                     do_sample=False, pad_token_id=0, overlap=overlap, model_name=name, **kw)
    assert out.sequences == plain and not any(out.rollbacks)
    assert all(r.errors == 1 and not r.fired for r in out.reports)
    assert metrics.ERRORS.labels(name, "rollback")._value.get() == before + 1
    assert sum("guard failed in rollback" in r.getMessage() for r in caplog.records) == 1
    if where == "streaming":
        assert [streamed.get(i, []) for i in range(len(plain))] == plain, "every row streamed once, in full"


def test_an_error_of_the_callers_on_tokens_reaches_the_caller_unchanged():
    model = tiny_model("llama")
    ids, mask = _padded_batch()

    class Full(Exception):
        pass

    def on_tokens(row, tokens):
        raise Full("the caller's queue is full")

    with pytest.raises(Full, match="queue is full"):
        generate_with_rollback(model, ids, mask, neuron_map=False, max_new_tokens=NEW, do_sample=False,
                               pad_token_id=0, on_tokens=on_tokens, holdback=0)


@pytest.mark.parametrize("overlap", [None, False])
def test_metrics_count_each_row_once_with_its_rollbacks(overlap):
    """A row decoded in several passes is one guarded sequence: counted once, with its loops, its rollbacks and
    the tokens they discarded (pass after pass ran one ``generate`` per pass, each counted before)."""
    from repguard import metrics

    model = tiny_model("llama")
    ids, mask = _padded_batch()
    name = f"tiny-rb-metrics-{overlap}"
    read = {m: (lambda m=m: m.labels(name)._value.get()) for m in
            (metrics.REQUESTS_GUARDED, metrics.LOOPS_DETECTED, metrics.ROLLBACKS, metrics.ROLLBACK_TOKENS)}
    before = {m: f() for m, f in read.items()}
    out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0, overlap=overlap, model_name=name)
    got = {m: f() - before[m] for m, f in read.items()}
    assert sum(out.rollbacks) > 0
    assert got[metrics.REQUESTS_GUARDED] == len(out.sequences)
    assert got[metrics.LOOPS_DETECTED] == sum(1 for r in out.reports if r.detections)
    assert got[metrics.ROLLBACKS] == sum(out.rollbacks)
    # Discarded: the tokens each row decoded and dropped, i.e. those it decoded (the guard observes every token
    # but an end token) beyond its final text (whose end token, if any, it never observed).
    eos = _eos(model)
    assert got[metrics.ROLLBACK_TOKENS] == sum(r.tokens_observed - (len(s) - bool(s and s[-1] in eos))
                                               for r, s in zip(out.reports, out.sequences)) > 0


@pytest.mark.parametrize("overlap", [None, False])
def test_the_monitor_never_rolls_back_and_changes_no_output(overlap):
    """The monitor only watches and reports: under rollback it still returns ``generate``'s own tokens, its
    report sees the loops, and nothing is held back from a stream (no token is ever taken back)."""
    from repguard.config import GuardConfig
    from repguard.rollback import RollbackPolicy

    policy = RollbackPolicy(GuardConfig.from_preset("monitor"))
    assert policy.max_rollbacks == 0 and policy.holdback == 0
    model = tiny_model("llama")
    ids, mask = _padded_batch()
    plain = _plain(model, ids, mask)
    streamed: dict[int, list[int]] = {}
    out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), config=GuardConfig.from_preset("monitor"),
                                 max_new_tokens=NEW, do_sample=False, pad_token_id=0, overlap=overlap,
                                 on_tokens=lambda row, tokens: streamed.setdefault(row, []).extend(tokens))
    assert out.sequences == plain and not any(out.rollbacks)
    assert any(r.fired for r in out.reports), "the batch loops, and the monitor says so"
    assert [streamed.get(i, []) for i in range(len(plain))] == plain


def test_after_a_fault_a_row_a_stop_criterion_ended_and_handed_out_stays_as_it_was(monkeypatch):
    """A fault after one row has ended at a stopping criterion, all of it streamed: the unguarded fallback
    continues the other rows only; that row is not given more tokens."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from repguard import repair

    model = tiny_model("llama")
    ids, mask = _padded_batch()
    plain = _plain(model, ids, mask)
    row, at = next((i, 4) for i, r in enumerate(plain) if len(r) > 5 and r[4] not in r[:4])
    stop = plain[row][at]

    class StopOn(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop

    def failing(*args, **kwargs):
        raise RuntimeError("injected rollback failure")

    kw = dict(neuron_map=random_map(model, 32, 64), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
              stopping_criteria=StoppingCriteriaList([StopOn()]))
    clean = generate_with_rollback(model, ids, mask, **kw)
    monkeypatch.setattr(repair.RepeatPenalty, "penalties", failing)
    streamed: dict[int, list[int]] = {}
    out = generate_with_rollback(model, ids, mask, on_tokens=lambda r, t: streamed.setdefault(r, []).extend(t), **kw)
    assert clean.sequences[row] == plain[row][: at + 1] == out.sequences[row] == streamed[row]
    assert all(r.errors == 1 for r in out.reports)


def test_after_a_fault_min_new_tokens_counts_the_tokens_a_row_handed_out(monkeypatch):
    """``min_new_tokens`` with streaming: after a fault the fallback continues each row from what it streamed,
    and the minimum still counts over the row's whole text (it was counted again from the continuation, so a
    row that ends at 48 tokens unguarded ran on past its end)."""
    from repguard import repair

    model = tiny_model("llama")
    ids, mask = _padded_batch()
    width, end, least = ids.shape[1], 79, 40  # an end token the tiny model reaches at 48 tokens in row 1
    kw = dict(max_new_tokens=NEW, min_new_tokens=least, do_sample=False, pad_token_id=0, eos_token_id=end)
    plain = [_cut(r, {end}) for r in model.generate(ids, attention_mask=mask, **kw)[:, width:].tolist()]
    assert len(plain[1]) == 48 and plain[1][-1] == end

    def failing(*args, **kwargs):
        raise RuntimeError("injected rollback failure")

    monkeypatch.setattr(repair.RepeatPenalty, "penalties", failing)
    streamed: dict[int, list[int]] = {}
    out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), holdback=20,
                                 on_tokens=lambda r, t: streamed.setdefault(r, []).extend(t), **kw)
    assert all(r.errors == 1 for r in out.reports), "the fault happened: the batch ran unguarded"
    assert out.sequences == plain
    assert [streamed.get(i, []) for i in range(len(plain))] == plain
