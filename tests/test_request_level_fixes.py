"""Request-level rollback (``RequestGuard`` and its adapters: the ``--upstream`` proxy, the embedded engine's
rollback rows, the vLLM front) on fakes: a vLLM-like OpenAI upstream on ``httpx.MockTransport``, a scripted
token stream for the engine's tracker, a stepping fake for ``GuardedLLM``.

* an exception inside the guard never takes a request down: it goes on unguarded and is counted;
* a response that is not streamed is not held to the streaming hold-back;
* stop strings end the request where the engine would, also after a rollback or across submissions;
* text streamed after a rollback is the final text's, also for SentencePiece-style decoders.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace as NS

import httpx
import pytest

from repguard import metrics
from repguard.config import GuardConfig
from repguard.policy import SequenceGuard
from repguard.request_guard import RequestGuard
from repguard.rollback import RollbackPolicy

PROMPT_IDS = [1, 2, 3]


# -- a vLLM-like upstream and the proxy, in-process ----------------------------------------------------------
class FakeUpstream:
    """``script(prompt, body)`` -> [(token id, text)]: streamed one token per chunk, cut at ``max_tokens``;
    ``detok(ids)`` is its ``/detokenize``; ``extra(piece)`` adds fields to a chat delta."""

    def __init__(self, script, detok=None, extra=None, finish=None):
        self.script, self.extra, self.finish = script, extra, finish
        self.detok = detok or (lambda ids: "".join(f" t{t}" for t in ids))
        self.requests: list[tuple[str, dict]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        path = request.url.path
        if path == "/detokenize":
            return httpx.Response(200, json={"prompt": self.detok(body["tokens"])})
        self.requests.append((path, body))
        chat = path.endswith("chat/completions")
        toks = self.script(None if chat else body.get("prompt"), body)
        n = body.get("max_tokens") or len(toks)
        toks = toks[:n]
        fin, stop_reason = self.finish(body, toks) if self.finish else ("length" if len(toks) == n else "stop", None)
        events = []
        for i, (t, text) in enumerate(toks):
            last = i == len(toks) - 1
            if chat:
                delta = {"content": text, **(self.extra([(t, text)]) if self.extra else {})}
                choice = {"index": 0, "delta": delta, "token_ids": [t], "finish_reason": fin if last else None}
                event = {"id": "x", "created": 1, "choices": [choice]}
                if i == 0:
                    event["prompt_token_ids"] = PROMPT_IDS
            else:
                choice = {"index": 0, "text": text, "token_ids": [t], "finish_reason": fin if last else None}
                if last:
                    choice["stop_reason"] = stop_reason
                if i == 0:
                    choice["prompt_token_ids"] = PROMPT_IDS
                event = {"id": "x", "created": 1, "choices": [choice]}
            events.append("data: " + json.dumps(event) + "\n\n")
        events.append("data: [DONE]\n\n")
        return httpx.Response(200, content="".join(events).encode(), headers={"content-type": "text/event-stream"})


def proxy_app(fake: FakeUpstream, **settings):
    from repguard.serve.app import create_upstream_app
    from repguard.serve.settings import load_settings
    from repguard.serve.upstream import Upstream, UpstreamProxy

    s = load_settings({"upstream": "http://fake", **settings}, env={})
    up = Upstream("http://fake")
    up.client = up.aux = httpx.AsyncClient(base_url="http://fake", transport=httpx.MockTransport(fake.handler))
    proxy = UpstreamProxy(s, upstream=up)
    proxy.models, proxy.max_model_len = ["fake"], {"fake": 4096}
    return create_upstream_app(proxy, s)


def post(app, path: str, body: dict) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy", timeout=60) as c:
            return await c.post(path, json=body)

    return asyncio.run(go())


def events_of(resp: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in resp.text.splitlines()
            if line.startswith("data: ") and line[6:] != "[DONE]"]


def choice_of(resp: httpx.Response, stream: bool) -> tuple[str, list[int], dict]:
    """(text, token ids, last choice) of a completion, streamed (joined over its chunks) or not."""
    if stream:
        chunks = [e["choices"][0] for e in events_of(resp) if e.get("choices")]
        return "".join(c["text"] for c in chunks), [t for c in chunks for t in c["token_ids"]], chunks[-1]
    last = resp.json()["choices"][0]
    return last["text"], last["token_ids"], last

def guard_errors(model: str) -> float:
    return metrics.ERRORS.labels(model, "observe")._value.get()


# -- 1. the guard fails open ------------------------------------------------------------------------------
@pytest.fixture
def broken_detector(monkeypatch):
    """The detector raises on token 1009."""
    observe = SequenceGuard.observe

    def boom(self, token, *args, **kwargs):
        if token == 1009:
            raise RuntimeError("injected detector bug")
        return observe(self, token, *args, **kwargs)

    monkeypatch.setattr(SequenceGuard, "observe", boom)


@pytest.mark.parametrize("stream", [False, True])
def test_a_guard_error_lets_the_request_go_on_unguarded_and_is_counted(broken_detector, stream):
    words = [(1000 + i, f" w{i}") for i in range(20)]
    fake = FakeUpstream(lambda prompt, body: words)
    app = proxy_app(fake)
    before = guard_errors("fake")
    resp = post(app, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 20, "stream": stream,
                                         "return_token_ids": True})
    assert resp.status_code == 200
    text, ids, last = choice_of(resp, stream)
    assert text == "".join(w for _, w in words) and ids == [t for t, _ in words]
    assert last["finish_reason"] == "length" and last["repguard"]["errors"] == 1
    assert len(fake.requests) == 1  # never cancelled nor resubmitted
    assert guard_errors("fake") == before + 1


def test_a_guard_that_fails_in_a_one_token_step_continues_that_request_unguarded(monkeypatch):
    rg = RequestGuard(RollbackPolicy(), max_new_tokens=60, greedy=False)
    sub = rg.next_submission()
    loop = [5, 6, 7, 8, 9, 10]
    assert rg.feed(sub, [1, 2] + loop * 6) and rg.rollbacks == 1
    step = rg.next_submission()
    assert step.max_tokens == 1 and step.bias
    monkeypatch.setattr(SequenceGuard, "observe", lambda self, token: 1 / 0)
    assert not rg.feed(step, [99])  # the step's one token: the guard fails, nothing is cancelled
    rg.end(step, "length")
    rest = rg.next_submission()  # the rest of the budget, unguarded: no bias, no repair
    assert rest.generated == step.generated + (99,) and rest.bias is None and rest.repair is None
    assert rest.max_tokens == 60 - len(rest.generated)
    assert not rg.feed(rest, loop * 2)  # a loop is no longer cut
    rg.end(rest, "stop", tail=[0])
    assert rg.finish_reason == "stop" and rg.tokens == list(rest.generated) + loop * 2 + [0]
    assert rg.report.errors == 1 and rg.pending_penalties == {}


# -- 2. a response that is not streamed is not held back ----------------------------------------------------
def looping(prompt, body):
    if isinstance(prompt, list):  # a resubmission: fresh tokens
        return [(2000 + i, f" f{i}") for i in range(400)]
    return [(100 + i, f" a{i}") for i in range(5)] + [(10 + i % 6, f" l{i % 6}") for i in range(300)]


def test_a_non_streamed_loop_is_rolled_back_whatever_the_streaming_holdback():
    app = proxy_app(FakeUpstream(looping), rollback={"holdback": 4})
    resp = post(app, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 80, "temperature": 0,
                                         "return_token_ids": True})
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["repguard"]["rollbacks"] == 1
    assert len(choice["token_ids"]) == 80 and 2000 in choice["token_ids"]


def test_a_non_streamed_request_cuts_back_to_an_earlier_repeat_older_than_the_holdback():
    span = list(range(300, 314))
    plan = list(range(100, 110)) + span + span + list(range(500, 760)) + [10 + i % 6 for i in range(200)]

    def script(prompt, body):
        if isinstance(prompt, list):
            return [(2000 + i, f" f{i}") for i in range(600)]
        return [(t, f" x{t}") for t in plan]

    app = proxy_app(FakeUpstream(script))
    resp = post(app, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 400, "temperature": 0,
                                         "return_token_ids": True})
    ids = resp.json()["choices"][0]["token_ids"]
    assert ids[:24] == plan[:24] and ids[24:38] != span  # cut back to the span's second copy, 280 tokens back


# -- the embedded engine's rollback rows, driven token by token ------------------------------------------
TEXT = {777: "<stop>", 0: ""}


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(TEXT.get(t, f" t{t}") for t in ids)


def engine_choice(holdback=None, stream=True, stop=None):
    from repguard.serve.engine import Engine, GenerationRequest, _BatchTracker, _Choice

    events: list = []
    req = GenerationRequest(prompts=[[1, 2, 3]], max_tokens=100, temperature=0.0, stop=stop)
    req.stream = stream
    req.emit = events.append
    policy = RollbackPolicy(GuardConfig(), {} if holdback is None else {"holdback": holdback})
    rg = RequestGuard(policy, 100, eos_ids=[0], greedy=True)
    ch = _Choice(req, 0, [1, 2, 3], "rollback", GuardConfig(), guard=rg, sub=rg.next_submission())
    eng = NS(eos={0}, tokenizer=Tok(), _requeue=lambda c: None, rebatch_steps=0, guard=None, model_name="m",
             _record=lambda r: None, _observe_ttft=lambda req: None,
             _announce=lambda c, rep, n: events.append(("finish", c.finish_reason, n)))
    eng._emit_text = lambda c, text, final: Engine._emit_text(eng, c, text, final)
    tracker = _BatchTracker.__new__(_BatchTracker)
    tracker.tok, tracker.engine = Tok(), eng

    def step(token: int) -> None:  # one decoding step of the choice's row, and the streamer's flush
        from repguard.serve.engine import _Slot

        tracker._feed_rollback(_Slot(ch), token)
        Engine._emit_rollback(eng, ch)

    return ch, rg, step, events


def emitted(events) -> str:
    return "".join(e["text"] for e in events if isinstance(e, dict) and e.get("type") == "delta")


def test_an_engine_request_that_is_not_streamed_is_rolled_back_whatever_the_holdback():
    ch, rg, step, events = engine_choice(holdback=4, stream=False)
    for t in [100 + i for i in range(5)] + [10 + i % 6 for i in range(60)]:
        step(t)
        if rg.rollbacks:
            break
    assert rg.rollbacks == 1 and not rg.done
    assert emitted(events) == ""  # nothing handed out before the end


def test_an_engine_stop_string_completed_by_a_one_token_step_ends_the_request_there():
    ch, rg, step, events = engine_choice(stop=["<stop>"])
    for t in [100 + i for i in range(5)] + [10 + i % 6 for i in range(60)]:
        step(t)
        if rg.rollbacks:
            break
    assert ch.sub.max_tokens == 1 and ch.sub.bias  # the ban step after the rollback
    step(777)  # its token completes "<stop>"
    assert rg.done and rg.finish_reason == "stop" and rg.tokens[-1] == 777
    assert "<stop>" not in emitted(events) and ("finish", "stop", len(rg.tokens)) in events


# -- the vLLM front: text after a rollback --------------------------------------------------------------------
def test_the_vllm_front_cuts_a_stop_string_after_a_rollback_as_vllm_does():
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from repguard.vllm.front import GuardedLLM

    def dec(ids, skip_special_tokens=True):
        return "".join(" END" if t == 999 else f" t{t}" for t in ids if not (skip_special_tokens and t == 0))

    class Engine:
        """Planned tokens; a negative bias on the first planned token picks 2000 + n; stop strings are searched
        in the request's own output text (the token kept, the text cut), as vLLM does."""

        def __init__(self):
            self.reqs, self.model_config = {}, NS(served_model_name="fake", model="fake")

        def add_request(self, rid, prompt, params):
            gen = [] if isinstance(prompt, str) else list(prompt["prompt_token_ids"][3:])
            self.reqs[rid] = NS(params=params, gen=gen, out=[], first=True)

        def abort_request(self, rids):
            for r in rids:
                self.reqs.pop(r, None)

        def step(self):
            outs = []
            for rid, r in list(self.reqs.items()):
                n = len(r.gen)
                tok = 999 if n >= 30 and any(t >= 2000 for t in r.gen) else 100 + n if n < 5 else 10 + (n - 5) % 6
                if r.first and (r.params.logit_bias or {}).get(tok, 0) < 0:
                    tok = 2000 + n
                r.first = False
                r.gen.append(tok)
                r.out.append(tok)
                text, fin, stop = dec(r.out), None, None
                for s in r.params.stop or []:
                    if s in text and len(r.out) > (r.params.min_tokens or 0):  # none before min_tokens, as vLLM
                        fin, stop, text = "stop", s, text[: text.find(s)]
                if fin is None and len(r.out) >= r.params.max_tokens:
                    fin = "length"
                prev = dec(r.out[:-1])
                o = NS(token_ids=[tok], text=text[len(prev):] if text.startswith(prev) else "", finish_reason=fin,
                       stop_reason=stop)
                outs.append(NS(request_id=rid, prompt_token_ids=PROMPT_IDS, num_cached_tokens=0, outputs=[o],
                               finished=fin is not None))
                if fin:
                    del self.reqs[rid]
            return outs

    llm = NS(llm_engine=Engine(), collective_rpc=lambda f: [], get_tokenizer=lambda: NS(decode=dec))
    out = GuardedLLM(llm, model_name="fake").generate(["hi"], SamplingParams(temperature=0, max_tokens=120,
                                                                              stop=[" END"]))[0]
    assert out.report["rollbacks"] == 1 and out.finish_reason == "stop" and out.token_ids[-1] == 999
    assert " END" not in out.text and out.text.endswith(" t10")
    # With min_tokens, the engine looks for no stop string in the first tokens' text, and neither may the front:
    # " t101" (the second token, in the text a rollback keeps) once ended the request right after the rollback.
    params = SamplingParams(temperature=0, max_tokens=120, min_tokens=40, stop=[" t101", " END"])
    out = GuardedLLM(llm, model_name="fake").generate(["hi"], params)[0]
    assert out.report["rollbacks"] == 1 and out.finish_reason == "stop" and out.token_ids[-1] == 999
    assert out.text.startswith(" t100 t101 t102") and len(out.token_ids) == 41  # its 41st token, the first it may
    assert out.text.endswith(" END END t2039")  # cut there, the " END"s inside the min_tokens text kept


# -- text streamed after a rollback ---------------------------------------------------------------------------
def sentencepiece_detok(ids):
    """``/detokenize`` of a SentencePiece model: a text's first space is dropped."""
    return "".join(f" f{t - 3000}" if t >= 3000 else f" w{t - 1000}" if t >= 1000 else
                   f" l{t - 10}" if t >= 10 else f" p{t}" for t in ids)[1:]


def test_text_streamed_after_a_rollback_is_the_outputs_text_with_a_sentencepiece_decoder():
    def script(prompt, body):
        if isinstance(prompt, list):
            return [(3000 + i, f" f{i}") for i in range(400)]
        return [(1000 + i, f" w{i}") for i in range(260)] + [(10 + i % 6, f" l{i % 6}") for i in range(300)]

    app = proxy_app(FakeUpstream(script, detok=sentencepiece_detok))
    resp = post(app, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 400, "temperature": 0,
                                         "stream": True, "return_token_ids": True})
    chunks = [e["choices"][0] for e in events_of(resp) if e.get("choices")]
    ids = [t for c in chunks for t in c["token_ids"]]
    assert chunks[-1]["repguard"]["rollbacks"] == 1 and any(t >= 3000 for t in ids)
    text = "".join(c["text"] for c in chunks)
    assert text == sentencepiece_detok([1] + ids)[len(sentencepiece_detok([1])):]  # what vLLM streams
    assert all(c["text"] for c in chunks[:-1] if c["token_ids"])  # no chunk after the rollback went empty


# -- stop strings across two submissions ---------------------------------------------------------------------
STOP_TEXT = {777: " <st", 778: "op>"}


def stop_detok(ids):
    return "".join(STOP_TEXT.get(t, f" t{t}") for t in ids)


def straddling(prompt, body):
    """A loop; its ban step picks " <st" and the continuation goes on "op>": "<stop>" straddles the two."""
    if not isinstance(prompt, list):
        toks = [100 + i for i in range(5)] + [10 + i % 6 for i in range(300)]
    elif body.get("max_tokens") == 1 and any(v <= -100 for v in (body.get("logit_bias") or {}).values()):
        toks = [777]
    elif prompt[-1] == 777:
        toks = [778] + [3000 + i for i in range(300)]
    else:
        toks = [3000 + i for i in range(300)]
    return [(t, stop_detok([t])) for t in toks]


def own_text_stop(body, toks):  # vLLM searches stop strings in a request's own output text only
    assert not any(s in stop_detok([t for t, _ in toks]) for s in body.get("stop") or [])
    return ("length" if len(toks) == body.get("max_tokens") else "stop"), None


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_across_a_resubmission_ends_the_request(stream):
    app = proxy_app(FakeUpstream(straddling, detok=stop_detok, finish=own_text_stop))
    resp = post(app, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 60, "temperature": 0,
                                         "stop": ["<stop>"], "return_token_ids": True, "stream": stream})
    text, ids, last = choice_of(resp, stream)
    assert last["repguard"]["rollbacks"] == 1
    assert last["finish_reason"] == "stop" and last["stop_reason"] == "<stop>"
    assert ids[-2:] == [777, 778] and text.endswith(" ") and "<st" not in text


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_in_the_text_of_min_tokens_never_ends_a_rolled_back_request(stream):
    """vLLM looks for stop strings only after ``min_tokens`` tokens; the proxy's check across a resubmission's
    start read the whole kept text, and ended a rolled-back request at once on a stop string inside it."""
    app = proxy_app(FakeUpstream(straddling, detok=stop_detok))
    resp = post(app, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 60, "min_tokens": 50,
                                         "temperature": 0, "stop": [" t101"], "return_token_ids": True,
                                         "stream": stream})
    text, ids, last = choice_of(resp, stream)
    assert last["repguard"]["rollbacks"] == 1
    assert last["finish_reason"] == "length" and len(ids) == 60 and text.startswith(" t100 t101 t102")


def test_a_stop_string_is_found_and_cut_where_an_engine_finds_it():
    """The occurrence that ends first (an engine reads the text token by token), past the text of min_tokens."""
    from repguard.request_guard import end_text, find_stop

    assert find_stop("xx abcd", ["bcd", "ab"]) == "ab"  # "ab" is complete one character before "bcd"
    assert find_stop("a. b. c.", ["."], after=3) == "."
    assert find_stop("a. b", ["."], after=3) is None  # its only "." lies in the min_tokens text
    assert end_text("a. b. c.", "stop", ".", after=3) == "a. b"  # cut at the one found, not the first
    assert end_text("a. b. c.", "stop", ".", include_stop=True, after=3) == "a. b."
    assert end_text("a. b. c.", "stop", ".") == "a"


# -- chat reasoning ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["reasoning", "reasoning_content"])  # vLLM 0.32's name, and the earlier one
@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_request_that_never_loops_keeps_the_upstreams_reasoning_content(stream, key):
    def reasoning(piece):  # an upstream with a reasoning parser: the first tokens' text is reasoning
        text = "".join(f" r{t}" for t, _ in piece if t < 1005)
        return {key: text} if text else {}

    words = [(1000 + i, "" if i < 5 else f" w{i}") for i in range(12)]
    app = proxy_app(FakeUpstream(lambda prompt, body: words, extra=reasoning))
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "stream": stream}
    resp = post(app, "/v1/chat/completions", body)
    if stream:
        deltas = [e["choices"][0]["delta"] for e in events_of(resp) if e.get("choices")]
        content = "".join(d.get("content") or "" for d in deltas)
        thought = "".join(d.get(key) or "" for d in deltas)
    else:
        message = resp.json()["choices"][0]["message"]
        content, thought = message["content"], message.get(key)
    assert thought == " r1000 r1001 r1002 r1003 r1004"
    assert content == "".join(w for _, w in words)


# -- the proxy's answers, as the upstream gives them ------------------------------------------------------------
def test_a_guarded_stream_carries_the_upstreams_id_and_created():
    words = [(1000 + i, f" w{i}") for i in range(8)]
    app = proxy_app(FakeUpstream(lambda prompt, body: words))
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        resp = post(app, path, {"model": "fake", "max_tokens": 8, "stream": True,
                                "stream_options": {"include_usage": True}, **body})
        events = events_of(resp)
        assert len(events) >= 2 and {(e["id"], e["created"]) for e in events} == {("x", 1)}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": "x"}, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "stream_options": [1]}, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),  # as vLLM
    ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stop": [1]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "include_reasoning": False},
     "include_reasoning"),
])
def test_guarded_requests_the_proxy_cannot_run_are_a_400_naming_the_field(path, body, param):
    fake = FakeUpstream(lambda prompt, body: [(1000, " w")])
    resp = post(proxy_app(fake), path, {"model": "fake", **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param and param in resp.json()["error"]["message"]
    assert not fake.requests  # refused before anything reached the upstream


def test_top_logprobs_zero_asks_for_nothing_and_is_served_guarded():
    """``top_logprobs: 0`` is vLLM's default (it asks for no logprobs): a client that sends it explicitly was refused."""
    fake = FakeUpstream(lambda prompt, body: [(1000, " w")])
    resp = post(proxy_app(fake), "/v1/chat/completions", {"model": "fake", "max_tokens": 1, "logprobs": False,
                                                          "top_logprobs": 0,
                                                          "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == " w"
    refused = post(proxy_app(fake), "/v1/chat/completions", {"model": "fake", "max_tokens": 1, "top_logprobs": 2,
                                                             "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_logprobs"


@pytest.mark.parametrize("chat", [False, True])
def test_an_upstream_output_cap_holds_for_a_rolled_back_request_too(chat):
    """An upstream that caps every request's output at 64 tokens (vLLM's override of max_new_tokens): a
    rollback's resubmission is a new request, capped afresh, so a looping request came back longer than the
    upstream ever answers one. With ``upstream_max_tokens`` the whole output is held to the cap."""
    cap = 64

    def capped(prompt, body):
        if isinstance(prompt, list):  # a resubmission: fresh text
            toks = [3000 + i for i in range(400)]
        else:
            toks = [100 + i for i in range(5)] + [10 + i % 6 for i in range(400)]
        return [(t, f" t{t}") for t in toks[:cap]]

    def finish(body, toks):
        return ("length" if len(toks) in (cap, body.get("max_tokens")) else "stop"), None

    def run(**settings):
        app = proxy_app(FakeUpstream(capped, finish=finish), **settings)
        if chat:  # no max_tokens: the upstream's own limit decides
            resp = post(app, "/v1/chat/completions", {"model": "fake", "temperature": 0, "return_token_ids": True,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        else:
            resp = post(app, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 500,
                                                 "temperature": 0, "return_token_ids": True})
        choice = resp.json()["choices"][0]
        return choice["token_ids"], choice["finish_reason"], choice["repguard"]["rollbacks"]

    ids, finish_reason, rollbacks = run()
    assert rollbacks == 1 and len(ids) > cap  # what the upstream's cap alone cannot hold
    ids, finish_reason, rollbacks = run(upstream_max_tokens=cap)
    assert rollbacks == 1 and len(ids) == cap and finish_reason == "length"
    assert ids[:5] == [100, 101, 102, 103, 104] and any(t >= 3000 for t in ids)



def test_an_empty_stream_options_without_stream_is_accepted_as_vllm_accepts_it():
    fake = FakeUpstream(lambda prompt, body: [(1000, " w")])
    resp = post(proxy_app(fake), "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 1,
                                                     "stream_options": {}})
    assert resp.status_code == 200, resp.text
