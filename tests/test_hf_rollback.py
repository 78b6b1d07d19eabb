"""Rollback on a tiny random model: looping rows are cut back to the onset and re-decoded; others untouched."""

import pytest
import torch

from conftest import padded_batch, random_map, tiny_model
from repguard.detect import find_repetition
from repguard.hf.rollback import generate_with_rollback

NEW = 60


def test_rollback_recuts_looping_rows_and_leaves_the_rest_identical():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (6, 6), generator=g)
    mask = torch.ones_like(ids)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[:, 6:]
    loops = [find_repetition(row.tolist()) for row in plain]
    assert any(loops) and not all(loops), "need both looping and calm rows"
    out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0)
    for i, (row, rep) in enumerate(zip(plain.tolist(), loops)):
        got = out.sequences[i]
        if rep is None:
            assert got == row and out.rollbacks[i] == 0 and not out.reports[i].fired
        else:
            # The text up to the loop's second copy is kept as it was; the copy itself is re-decoded.
            assert out.rollbacks[i] >= 1
            assert got[: rep.p2] == row[: rep.p2]
            assert got != row
            assert "rollback" in [a.level for a in out.reports[i].actions]
            assert len(got) <= NEW


def test_rollback_removes_the_repeated_copy_more_often_than_not():
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 256, (8, 6), generator=g)
    mask = torch.ones_like(ids)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[:, 6:]
    before = sum(find_repetition(r.tolist()) is not None for r in plain)
    out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                 max_rollbacks=3, do_sample=False, pad_token_id=0)
    after = sum(find_repetition(s) is not None for s in out.sequences)
    assert before >= 2 and after < before


def _streamed(model, ids, mask, **kw):
    got: dict[int, list[int]] = {}
    calls = []

    def on_tokens(row, tokens):
        calls.append((row, len(tokens)))
        got.setdefault(row, []).extend(tokens)

    out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0, on_tokens=on_tokens, **kw)
    return out, got, calls


def test_streaming_hands_out_final_tokens_only():
    """Streamed tokens are never taken back: per row they add up to exactly the returned sequence, and with the
    default hold-back (longer than any paper-criterion rollback) the result is the same as without streaming."""
    model = tiny_model()
    ids = torch.randint(3, 256, (6, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    plain = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                   do_sample=False, pad_token_id=0)
    out, got, _calls = _streamed(model, ids, mask)
    assert out.sequences == plain.sequences and any(out.rollbacks)
    assert [got.get(i, []) for i in range(6)] == out.sequences
    # A short hold-back streams while decoding (many small pieces), and still never takes text back.
    out, got, calls = _streamed(model, ids, mask, holdback=12)
    assert [got.get(i, []) for i in range(6)] == out.sequences
    assert len(calls) > 3 * len(out.sequences) and max(n for _r, n in calls) < NEW


def test_streaming_options_are_validated():
    import pytest

    from repguard.errors import ConfigError

    model = tiny_model()
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    for kw, match in (({"holdback": -1}, "holdback"), ({"on_tokens": 3}, "on_tokens"),
                      ({"on_tokens": print, "streamer": object()}, "not both")):
        with pytest.raises(ConfigError, match=match):
            generate_with_rollback(model, ids, neuron_map=random_map(model, 32, 64), max_new_tokens=4, **kw)


def test_rollback_without_a_neuron_map_is_token_level_and_ends_loops():
    """No map (an uncalibrated model): detection, the ban and rollback still run; calm rows stay identical."""
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (6, 6), generator=g)
    mask = torch.ones_like(ids)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[:, 6:]
    out = generate_with_rollback(model, ids, mask, neuron_map=False, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)
    assert out.form == "tokens"
    loops = [find_repetition(row.tolist()) for row in plain]
    assert any(loops)
    for i, (row, rep) in enumerate(zip(plain.tolist(), loops)):
        if rep is None:
            assert out.sequences[i] == row and out.rollbacks[i] == 0
        else:
            assert out.rollbacks[i] >= 1 and out.sequences[i][: rep.p2] == row[: rep.p2]
    assert all(r.max_neuron_score is None for r in out.reports), "no neuron score without a map"


def _engine_run(model, prompt: list[int], rg) -> list[int]:
    """Drive the request-level guard with ``model.generate`` as its engine (greedy, one row, no padding)."""
    from transformers import LogitsProcessorList

    class FirstBias:
        def __init__(self, bias, start):
            self.bias, self.start = bias, start

        def __call__(self, input_ids, scores):
            if self.bias and input_ids.shape[1] == self.start:
                scores = scores.clone()
                for t, b in self.bias.items():
                    scores[0, t] += b
            return scores

    while (sub := rg.next_submission()) is not None:
        ids = torch.tensor([prompt + list(sub.generated)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sub.max_tokens,
                             do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([FirstBias(sub.bias, ids.shape[1])]))
        rg.feed_output(sub, out[0, ids.shape[1]:].tolist(), "length")
    return rg.tokens


def test_the_re_decode_repair_gives_the_same_tokens_in_transformers_and_at_the_request_level():
    """One policy, two adapters: transformers subtracts the repeat penalty from the logits at every step; the
    request-level guard resubmits only where the engine picked a penalised token. Under greedy decoding both
    give the same tokens, and both differ from banning only the loop's next token."""
    from repguard.request_guard import RequestGuard
    from repguard.rollback import RollbackPolicy

    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (6, 6), generator=g)
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=0)[:, 6:]
    looping = [i for i, r in enumerate(plain) if find_repetition(r.tolist()) is not None]
    assert looping, "the seeded prompts include a looping one"
    compared = 0
    for i in looping[:2]:
        row = ids[i : i + 1]
        hf = generate_with_rollback(model, row, torch.ones_like(row), neuron_map=False, max_new_tokens=NEW,
                                    do_sample=False, pad_token_id=0)
        ban_only = generate_with_rollback(model, row, torch.ones_like(row), neuron_map=False, max_new_tokens=NEW,
                                          do_sample=False, pad_token_id=0, repair={"repair_multiplier": 0.0})
        rg = RequestGuard(RollbackPolicy(), max_new_tokens=NEW, greedy=True)
        assert hf.rollbacks[0] >= 1
        assert _engine_run(model, row[0].tolist(), rg) == hf.sequences[0]
        assert rg.rollbacks == hf.rollbacks[0]
        compared += hf.sequences[0] != ban_only.sequences[0]
    assert compared >= 1, "the repair changed at least one re-decode"


@pytest.mark.parametrize("sampled", [False, True])
def test_min_new_tokens_counts_the_whole_text_and_yields_to_the_guards_stop(sampled):
    """``min_new_tokens`` holds for each row's whole text (kept + re-decoded), and never masks the end the guard
    forces: a re-decode once ran with ``min_new_tokens`` = its full budget, which masked that end (greedy: the
    row went on with the pad token; sampled: a row with no token left to draw, and the call crashed)."""
    model = tiny_model("llama")
    ids, mask = padded_batch([4, 6, 5, 6, 3, 6, 2, 6], seed=3 if sampled else 0)
    kw = dict(neuron_map=False, max_new_tokens=150, pad_token_id=0, repair={"repair_multiplier": 0})
    kw.update(dict(do_sample=True, temperature=0.05) if sampled else dict(do_sample=False))
    torch.manual_seed(3)
    free = generate_with_rollback(model, ids, mask, overlap=False, **kw)
    torch.manual_seed(3)
    held = generate_with_rollback(model, ids, mask, min_new_tokens=5, **kw)
    assert any(free.rollbacks)
    assert held.sequences == free.sequences  # every row is longer than 5 tokens anyway
    assert [r.finish_reason for r in held.reports] == [r.finish_reason for r in free.reports]


def test_the_paper_preset_under_rollback_is_the_papers_single_pass():
    """The paper's method switches the neurons off from the first token, so no pass is left untouched to roll back
    to: rollback runs it as its one pass (the same tokens and report as the guard without rollback), not a first
    pass with the neurons on."""
    from repguard.config import GuardConfig
    from repguard.hf.guard import guard

    model = tiny_model()
    ids, mask = padded_batch([5, 9])
    nmap = random_map(model, num_selected=64, num_stored=64)
    cfg = GuardConfig.from_preset("paper")
    out = generate_with_rollback(model, ids, mask, neuron_map=nmap, config=cfg, max_new_tokens=24, do_sample=False)
    with guard(model, nmap, cfg) as g:
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    for row, rep in enumerate(out.reports):
        assert out.sequences[row] == plain[row, ids.shape[1]:].tolist()
        assert rep.tokens_under_intervention == rep.tokens_observed == 24
        assert [(a.position, a.reason) for a in rep.actions][:1] == [(0, "always_on")] and out.rollbacks[row] == 0
    assert [r.tokens_under_intervention for r in g.reports] == [24, 24]
