"""One model, several threads: a web app's thread pool calling a guarded ``generate`` concurrently.

Each call must give what it gives alone: its rows, its reports, no other call's tokens or penalties, no guard
failure. Guarded generations on one model run one at a time (``repguard.hf.guard.model_lock``); a plain
forward of another thread during one is left alone."""

from __future__ import annotations

import logging
import sys
import threading
import time

import pytest
import torch
from transformers import GenerationConfig

from conftest import left_padded, random_map, tiny_model
from repguard.config import GuardConfig
from repguard.hf import custom_generate, guard
from repguard.hf.rollback import generate_with_rollback

NEW = 48
REPS = 4


def _prompt(seed: int, length: int = 6) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (1, 6), generator=g)[0, 6 - length:].tolist()


# Batch A: a row that loops on the tiny model, a calm one; batch B: three rows, the second loops.
A = left_padded([_prompt(5), _prompt(0)])
B = left_padded([_prompt(4), _prompt(9), _prompt(11)])
R_A = left_padded([_prompt(5), _prompt(0, 5), _prompt(1)])
R_B = left_padded([_prompt(4, 5), _prompt(9), _prompt(10)])


@pytest.fixture(scope="module")
def model_and_map():
    model = tiny_model()
    return model, random_map(model)


@pytest.fixture(autouse=True)
def _switch_often():
    """Threads switch every 0.5 ms (5 ms by default): the calls interleave step by step."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(old)


def _together(calls, reps: int = REPS) -> list[list]:
    """Each rep runs the calls in threads released together; the results (or exceptions) per rep."""
    out = []
    for _ in range(reps):
        barrier = threading.Barrier(len(calls))
        results: list = [None] * len(calls)

        def work(i, call):
            barrier.wait()
            try:
                results[i] = call()
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                results[i] = exc

        threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        out.append(results)
    return out


def _reports(reports) -> list[dict]:
    return [r.to_dict() for r in reports]


def _as_alone(reps: list[list], alone: dict) -> None:
    """Every rep's (tokens, reports) of calls A and B are those of the call run alone."""
    for a, b in reps:
        for name, got in (("A", a), ("B", b)):
            assert not isinstance(got, BaseException), got
            assert torch.equal(got[0], alone[name][0]) and got[1] == alone[name][1], name


class _Streamer:
    """A streamer that runs ``call`` on the generating thread when the 10th piece of tokens arrives."""

    def __init__(self, call):
        self.call, self.n = call, 0

    def put(self, value):
        self.n += 1
        if self.n == 10:
            self.call()

    def end(self):
        pass


def _no_guard_failure(caplog):
    failures = [r.getMessage() for r in caplog.records if r.name == "repguard" and r.levelno >= logging.ERROR]
    assert not failures, failures


def test_one_installed_guard_called_from_two_threads_answers_each_call_as_alone(model_and_map, caplog):
    model, nmap = model_and_map

    def gen(batch):
        out = model.generate(batch[0], attention_mask=batch[1], max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        return out, _reports(out.repguard_reports)

    with guard(model, nmap, GuardConfig(escalate_after=0)) as g:
        alone = {"A": gen(A), "B": gen(B)}
        assert any(r["fired"] for r in alone["A"][1]) and any(r["fired"] for r in alone["B"][1]), \
            "precondition: the guard acts on a row of each batch"
        with caplog.at_level(logging.WARNING, logger="repguard"):
            _as_alone(_together([lambda: gen(A), lambda: gen(B)]), alone)
        assert g.errors == 0
    _no_guard_failure(caplog)


def test_custom_generate_from_two_threads_answers_each_call_as_alone(model_and_map, caplog):
    model, nmap = model_and_map

    def gen(batch):
        cfg = GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                               repguard={"escalate_after": 0}, repguard_map=nmap)
        out = model.generate(batch[0], attention_mask=batch[1], generation_config=cfg, custom_generate=custom_generate)
        return out, _reports(out.repguard_reports)

    alone = {"A": gen(A), "B": gen(B)}
    assert any(r["fired"] for r in alone["A"][1]), "precondition: the guard acts on a row"
    with caplog.at_level(logging.WARNING, logger="repguard"):
        _as_alone(_together([lambda: gen(A), lambda: gen(B)]), alone)
    _no_guard_failure(caplog)
    assert "generate" not in vars(model), "no guard's wrapper is left on the model"


@pytest.mark.parametrize("overlap", [None, False], ids=["in-place", "pass-after-pass"])
def test_rollback_from_two_threads_keeps_each_callers_tokens(model_and_map, caplog, overlap):
    model, nmap = model_and_map

    def gen(batch):
        out = generate_with_rollback(model, batch[0], batch[1], neuron_map=nmap, max_new_tokens=NEW,
                                     do_sample=False, pad_token_id=0, overlap=overlap)
        return out.sequences, out.rollbacks, _reports(out.reports)

    alone = {"A": gen(R_A), "B": gen(R_B)}
    assert sum(alone["A"][1]) and sum(alone["B"][1]), "precondition: rows of both batches are rolled back"
    with caplog.at_level(logging.WARNING, logger="repguard"):
        for a, b in _together([lambda: gen(R_A), lambda: gen(R_B)]):
            for name, got in (("A", a), ("B", b)):
                assert not isinstance(got, BaseException), got
                assert got == alone[name], name
    _no_guard_failure(caplog)
    assert not {"generate", "prepare_inputs_for_generation"} & set(vars(model)), "nothing is left on the model"


def test_another_threads_plain_forward_during_a_guarded_generation_is_left_alone(model_and_map, caplog):
    """Scoring a text in one thread while another generates with rollback: the score is the model's own, and
    the generation is what it is alone."""
    model, nmap = model_and_map
    text = torch.tensor([_prompt(5) * 4])
    with torch.no_grad():
        want = model(text).logits

    def score():
        with torch.no_grad():
            return [model(text).logits for _ in range(6)]

    def gen():
        out = generate_with_rollback(model, R_A[0], R_A[1], neuron_map=nmap, max_new_tokens=NEW, do_sample=False,
                                     pad_token_id=0)
        return out.sequences, out.rollbacks

    alone = gen()
    assert sum(alone[1]), "precondition: a row is rolled back"
    with caplog.at_level(logging.WARNING, logger="repguard"):
        for scored, generated in _together([score, gen]):
            assert not isinstance(scored, BaseException), scored
            assert all(torch.equal(s, want) for s in scored), "the plain forward is the model's own"
            assert generated == alone
    _no_guard_failure(caplog)


def test_each_threads_own_guard_runs_its_calls_only(model_and_map, caplog):
    """Two request threads, each with its own guard block on the one model (other settings each): every call
    runs under its own thread's guard alone, as if no other guard were installed."""
    model, nmap = model_and_map
    settings = {"A": GuardConfig(escalate_after=0), "B": GuardConfig.from_preset("monitor")}

    def gen(name, batch):
        with guard(model, nmap, settings[name]):
            out = model.generate(batch[0], attention_mask=batch[1], max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)
        return out, _reports(out.repguard_reports)

    alone = {"A": gen("A", A), "B": gen("B", B)}
    assert alone["B"][1] != gen("A", B)[1], "precondition: the two settings answer B differently"
    with caplog.at_level(logging.WARNING, logger="repguard"):
        _as_alone(_together([lambda: gen("A", A), lambda: gen("B", B)]), alone)
    _no_guard_failure(caplog)
    assert "generate" not in vars(model)


def test_reading_or_flushing_reports_from_another_thread_waits_for_the_running_generation(model_and_map):
    model, nmap = model_and_map

    def gen(g):
        out = model.generate(A[0], attention_mask=A[1], max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        return out, _reports(out.repguard_reports)

    with guard(model, nmap, GuardConfig(escalate_after=0)) as g:
        alone = gen(g)
        def poll():
            for _ in range(40):
                g.flush()
                _ = g.reports
                time.sleep(0.0005)

        for got, _ in _together([lambda: gen(g), poll]):
            assert not isinstance(got, BaseException), got
            assert torch.equal(got[0], alone[0]) and got[1] == alone[1]
            assert _reports(g.reports) == alone[1]


def test_a_generate_called_inside_a_guarded_one_runs_unguarded_and_leaves_it_alone(model_and_map):
    """A streamer (or logits processor) that generates on the same model, on the guarded call's thread."""
    model, nmap = model_and_map
    side = []
    streamer = _Streamer(lambda: side.append(model.generate(B[0], attention_mask=B[1], max_new_tokens=NEW,
                                                            do_sample=False, pad_token_id=0)))

    plain_b = model.generate(B[0], attention_mask=B[1], max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with guard(model, nmap, GuardConfig(escalate_after=0)) as g:
        alone = model.generate(A[0], attention_mask=A[1], max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        got = model.generate(A[0], attention_mask=A[1], max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             streamer=streamer)
        assert torch.equal(got, alone) and _reports(got.repguard_reports) == _reports(alone.repguard_reports)
        assert g.errors == 0
    assert len(side) == 1 and torch.equal(side[0], plain_b), "the nested call is the model's own, unguarded"


def _gen_a(model, **kw):
    return model.generate(A[0], attention_mask=A[1], max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


def test_a_guard_installed_under_another_librarys_generate_wrapper_still_guards(model_and_map):
    """A guard removed after other code wrapped ``generate`` on top of repguard's leaves repguard's wrapper in
    place (it cannot take it out from under the other); the next guard uses it, and guards its calls."""
    model, nmap = model_and_map
    with guard(model, nmap, GuardConfig(escalate_after=0)):
        guarded = _gen_a(model)
    first = guard(model, nmap, GuardConfig(escalate_after=0)).install()
    below = model.generate
    model.generate = lambda *args, **kwargs: below(*args, **kwargs)  # another library's wrapper
    try:
        first.remove()
        with guard(model, nmap, GuardConfig(escalate_after=0)) as g:
            out = _gen_a(model)
            assert torch.equal(out, guarded) and g.steps > 0
            assert _reports(out.repguard_reports) == _reports(guarded.repguard_reports)
    finally:
        del model.generate  # the other library's wrapper goes: the model's own generate again


def test_a_guard_never_removed_does_not_keep_a_dropped_model_alive(model_and_map):
    import gc
    import weakref

    _, nmap = model_and_map
    model = tiny_model()
    g = guard(model, nmap, GuardConfig(escalate_after=0)).install()
    _gen_a(model)
    dropped = weakref.ref(model)
    del model, g
    gc.collect()
    assert dropped() is None


def test_a_rollback_run_inside_a_guarded_generation_leaves_the_outer_guard_alone(model_and_map):
    """A streamer that runs ``generate_with_rollback`` (its own guard) on the same model mid-generation: the
    outer call's guard sits it out, and both calls give what they give alone."""
    model, nmap = model_and_map
    side = []

    def rollback_b():
        out = generate_with_rollback(model, R_B[0], R_B[1], neuron_map=nmap, max_new_tokens=NEW, do_sample=False,
                                     pad_token_id=0)
        side.append((out.sequences, out.rollbacks))

    streamer = _Streamer(rollback_b)

    inner_alone = generate_with_rollback(model, R_B[0], R_B[1], neuron_map=nmap, max_new_tokens=NEW,
                                         do_sample=False, pad_token_id=0)
    with guard(model, nmap, GuardConfig(escalate_after=0)) as g:
        alone = _gen_a(model)
        got = _gen_a(model, streamer=streamer)
        assert torch.equal(got, alone) and _reports(got.repguard_reports) == _reports(alone.repguard_reports)
        assert g.errors == 0
    assert side == [(inner_alone.sequences, inner_alone.rollbacks)] and sum(inner_alone.rollbacks)
