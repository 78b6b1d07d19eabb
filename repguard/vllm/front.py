"""The request-level guard for vLLM: rollback on any runner, through vLLM's public request API.

``GuardedLLM`` (offline batches, around ``vllm.LLM``) and ``GuardedAsyncLLM`` (serving, around an
``AsyncLLM`` / engine client) stream each request's token ids, watch them with the core
``RequestGuard`` and roll a confirmed loop back by resubmitting the prompt token ids plus the kept tokens
as a ``TokensPrompt`` (module ``repguard.request_guard``). Everything they use is public and stable
across vLLM's runners: ``TokensPrompt``, ``SamplingParams.logit_bias`` (the ban and the penalty on one-token
steps; on every resubmission, the kept tokens' presence and frequency penalties, ``request_guard.submission_bias``,
within V2's 1024 entries), ``seed``, abort, ``RequestOutput.num_cached_tokens``. So they work with model runner V1
or V2, async scheduling, CUDA graphs, tensor/pipeline parallelism and replicas alike, and need no neuron
map: detection, ban, rollback, escalation and stop are token-level. Not with speculative decoding, under which
vLLM refuses ``logit_bias``: a guard that repairs is refused there by name (the monitor runs).

The neuron step joins in where the engine can run it: an engine started with the ``repguard_neurons``
plugin and ``logits_processors=[repguard.vllm.RepGuardLogitsProcessor]`` on the V1 runner, with a map
for the model. Re-decode passes then ask the plugin to keep the mapped neurons off throughout. Each
report says which form ran (``"form": "tokens"`` or ``"tokens+neurons"``).

The repair (the re-decode's penalty on tokens that extend a repeat, and the ban of its first token) runs
by resubmission on any engine: a one-token ``logit_bias`` step each time the engine picks a penalised token.
Where the engine runs repguard's logits processor (``logits_processors=[RepGuardLogitsProcessor]`` on model
runner V1, ``RepGuardLogitsProcessorV2`` on V2; no plugin or map needed), the front sends the repair with each
re-decode submission instead and the engine applies it at every step: the same tokens under greedy decoding,
one submission per pass.
Each report says which ran (``"repair": "engine"`` or ``"resubmission"``).

Prefix caching (vLLM's default) makes a resubmission re-prefill almost nothing; each output reports the
prompt tokens the cache served (``cached_prompt_tokens``) and the tokens decoded in all
(``decoded_tokens``, discarded ones included).

A request whose output never loops is sent once, unchanged, and its tokens are the engine's.
Sampling: submission 0 keeps the caller's seed; later submissions use ``derive_seed(seed, i)``, so a
seeded request is reproducible. Not supported: ``n > 1`` (send n requests), beam search, prompt
logprobs on resubmissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from .. import metrics
from ..config import GuardConfig
from ..errors import ConfigError
from ..request_guard import (RESUBMISSION_KEY, RequestGuard, Submission, check_request_config, decode_output,
                             derive_seed, end_text, find_stop, min_tokens_chars, neurons_off_config, submission_bias,
                             submission_salt, text_ids)
from ..rollback import RollbackConfig, RollbackPolicy
from .logits import REPAIR_KEY

log = logging.getLogger("repguard")

_ids = itertools.count()


@dataclass
class GuardedOutput:
    """One request's result (or, streaming, the latest state: ``new_token_ids`` are the final tokens
    released since the previous yield)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None = None
    new_token_ids: list[int] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


class _Front:
    """What both fronts share: per-request settings, submission parameters, reports."""

    def __init__(self, config: GuardConfig | dict | None, rollback: RollbackConfig | dict | None,
                 model_name: str) -> None:
        self.config = config if isinstance(config, GuardConfig) else GuardConfig.from_dict(config)
        self.rollback = rollback if isinstance(rollback, RollbackConfig) else RollbackConfig.from_dict(rollback)
        self.policy = RollbackPolicy(self.config, self.rollback)
        check_request_config(self.config)  # settings a token stream cannot run are refused before any request
        self.model_name = model_name
        self.neuron_step = False
        self.engine_repair = False
        self.max_model_len: int | None = None  # the engine's context (set by each front)
        self.speculative = False  # the engine decodes speculatively (set by each front)

    def _capabilities(self, results, neuron_step: bool | None, engine_repair: bool | None, vllm_config=None) -> None:
        """Settle ``neuron_step`` and ``engine_repair`` from every worker's ``_status`` (None: use what the
        engine can do; True: require it). Where the workers cannot be asked (an ``AsyncLLM``'s engine core
        takes no function by RPC), the repair is read from the engine's config and the neuron step is off."""
        for name, value in (("neuron_step", neuron_step), ("engine_repair", engine_repair)):
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{name}: expected True, False or None (use what the engine can do), got {value!r}")
        results = results or []
        can = {key: bool(results) and all(r.get(key) for r in results) for key in ("neurons", "repair")}
        if not results and vllm_config is not None:
            from .compat import repair_processor_configured

            can["repair"] = repair_processor_configured(vllm_config)
        if neuron_step and not can["neurons"]:
            raise ConfigError("neuron_step: this engine cannot run the neuron step (start it with the "
                              "repguard_neurons plugin, logits_processors=[RepGuardLogitsProcessor], the V1 "
                              "runner and a neuron map), or pass neuron_step=None")
        if engine_repair and not can["repair"]:
            raise ConfigError("engine_repair: this engine does not run repguard's logits processor (start it with "
                              "logits_processors=['repguard.vllm:RepGuardLogitsProcessor'] on model runner V1, "
                              "'repguard.vllm:RepGuardLogitsProcessorV2' on V2, without speculative decoding), or "
                              "pass engine_repair=None to repair by resubmission")
        self.neuron_step = can["neurons"] if neuron_step is None else bool(neuron_step)
        self.engine_repair = can["repair"] if engine_repair is None else bool(engine_repair)

    def _tokens_left(self, prompt_ids: list[int]) -> int | None:
        """Tokens the engine's context holds after ``prompt_ids`` (None: unknown)."""
        return self.max_model_len - len(prompt_ids) if self.max_model_len else None

    def _guard(self, policy: RollbackPolicy, params) -> RequestGuard:
        return RequestGuard(policy, params.max_tokens, neuron_step=self.neuron_step, greedy=_greedy(params),
                            engine_repair=self.engine_repair, model_name=self.model_name)

    def _policy(self, guard: GuardConfig | dict | bool | None) -> RollbackPolicy | None:
        if guard is None or guard is True:
            return self.policy
        if guard is False:
            return None
        cfg = guard if isinstance(guard, GuardConfig) else self.config.replace(**dict(guard))
        if not cfg.enabled:
            return None
        return self._check_repairs(RollbackPolicy(cfg, self.rollback))

    def _engine_config(self, vllm_config) -> None:
        """What the front reads of the engine's config when it is made."""
        self.speculative = getattr(vllm_config, "speculative_config", None) is not None
        self._check_repairs(self.policy)

    def _check_repairs(self, policy: RollbackPolicy) -> RollbackPolicy:
        """A guard that repairs resubmits with a logit bias, which vLLM refuses under speculative decoding (its
        refusal of a resubmission in the middle of a batch would fail the batch): refused here, by name."""
        if self.speculative and policy.repairs:
            raise ConfigError("speculative decoding: a rollback's resubmission carries its repair as logit_bias, "
                              "which vLLM refuses with speculative decoding; start the engine without it, or guard "
                              "with the monitor preset (it reports loops and never resubmits)")
        return policy

    @staticmethod
    def _check_params(params, prompt=None, guarded: bool = True) -> None:
        if getattr(params, "n", 1) != 1:
            raise ConfigError(f"n: the guarded front runs one sequence per request (got n={params.n}); "
                              "send n requests instead")
        if params.max_tokens is None:
            raise ConfigError("max_tokens: the guarded front needs a token budget per request")
        if not guarded:
            return
        off = "; pass guard=False for this request"
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(params, name, None) is not None:
                raise ConfigError(f"{name}: not returned by the guarded front (a rollback replaces the tokens they "
                                  f"belong to){off}")
        if getattr(params, "structured_outputs", None) is not None:
            raise ConfigError("structured_outputs: a rollback resubmits the kept text as prompt, and the engine's "
                              f"grammar would start again after it{off}")
        if isinstance(prompt, dict):
            # Also vLLM's rendered inputs ({"type": "multimodal", "mm_kwargs": ...}, {"type": "embeds", ...}).
            kind = prompt.get("type") if prompt.get("type") in ("multimodal", "embeds", "enc_dec") else None
            for key in ("prompt_embeds", "multi_modal_data", "mm_kwargs"):
                if prompt.get(key) is not None or (kind is not None and key == "mm_kwargs"):
                    name = key if kind is None else f"{kind} input"
                    raise ConfigError(f"{name}: a rollback resubmits the prompt as token ids, which would lose "
                                      f"its embeddings or media{off}")

    def _sub_params(self, params, sub: Submission, kind, prompt_len: int, config: GuardConfig):
        """The engine parameters of ``sub`` of a request guarded with ``config``."""
        p = params.clone()
        p.output_kind = kind
        p.max_tokens = sub.max_tokens
        if sub.index > 0:
            p.seed = derive_seed(params.seed, sub.index)
            if getattr(p, "min_tokens", 0):
                p.min_tokens = max(0, params.min_tokens - len(sub.generated))
                if p.min_tokens > p.max_tokens:
                    p.min_tokens = p.max_tokens
        if sub.index > 0:
            p.logit_bias = submission_bias(params.logit_bias, sub, params.presence_penalty, params.frequency_penalty)
        extra = {}
        if sub.neurons_off:
            extra.update(repguard=True, repguard_config=neurons_off_config(config))
        if sub.repair is not None:
            extra[REPAIR_KEY] = sub.engine_repair(prompt_len).to_json()
        if sub.index > 0:
            extra[RESUBMISSION_KEY] = True  # this front counts the request; the neuron step must not again
        if extra:
            p.extra_args = {**(params.extra_args or {}), **extra}
        return p

    @staticmethod
    def _prompt(original, prompt_ids: list[int] | None, sub: Submission):
        """The engine prompt of ``sub``: the caller's own first, then its token ids + the kept tokens, with the
        caller's cache salt (``submission_salt``)."""
        own = original.get("cache_salt") if isinstance(original, dict) else None
        salt = submission_salt(own, sub)
        if sub.index == 0:
            if salt == own:
                return original
            # The caller's prompt with the neurons off throughout (an always-on config): salted apart.
            if isinstance(original, dict):
                return {**original, "cache_salt": salt}
            if isinstance(original, str):
                return {"prompt": original, "cache_salt": salt}
            if isinstance(original, (list, tuple)):
                return {"prompt_token_ids": list(original), "cache_salt": salt}
            return original  # an input vLLM has rendered already: as the caller made it
        prompt = {"prompt_token_ids": list(prompt_ids or []) + list(sub.generated)}  # a TokensPrompt
        if salt is not None:
            prompt["cache_salt"] = salt
        return prompt

    def _report(self, rg: RequestGuard, cached: int) -> dict[str, Any]:
        data = rg.report.to_dict()
        data.update(
            rollbacks=rg.rollbacks, submissions=rg.submissions, decoded_tokens=rg.decoded,
            cached_prompt_tokens=cached, form=rg.form, stopped=rg.finish_reason == "repetition",
            repair="engine" if rg.engine_repair else "resubmission",
        )
        return data

    def _record(self, rg: RequestGuard) -> None:
        metrics.record_report(self.model_name, rg.report)  # metrics never raise (``repguard.metrics.never_raises``)
        metrics.record_rollback(self.model_name, rg.rollbacks, max(0, rg.decoded - len(rg.tokens)))


def _context_of(model_config) -> int | None:
    """The engine's ``max_model_len`` (None where a stand-in engine has none)."""
    value = getattr(model_config, "max_model_len", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _greedy(params) -> bool:
    return params.temperature is not None and params.temperature < 1e-5


def _status(worker_obj) -> dict:
    """Runs in each worker: can the plugin run the neuron step on this engine, and does it run repguard's
    logits processor (which applies repairs)?"""
    from . import compat, worker
    from .logits import RepGuardLogitsProcessor, RepGuardLogitsProcessorV2

    guard = worker.current()
    runner = getattr(worker_obj, "model_runner", None)
    if runner is not None and compat.uses_v2_runner(runner.vllm_config):
        kind, procs = RepGuardLogitsProcessorV2, getattr(getattr(runner, "sampler", None), "logits_processors", ())
    else:
        kind = RepGuardLogitsProcessor
        procs = getattr(getattr(getattr(runner, "input_batch", None), "logitsprocs", None), "all", ())
    repair = kind is not None and any(isinstance(p, kind) and p.repairs_here for p in procs or ())
    if getattr(getattr(runner, "vllm_config", None), "speculative_config", None) is not None:
        repair = False  # several logits rows per request: not supported
    return {"neurons": guard is not None and not guard.broken, "repair": repair}


def _engine_dead(exc: BaseException) -> bool:
    """vLLM's engine is gone (``EngineDeadError``): no resubmission can run, so nothing fails open."""
    return any(c.__name__ == "EngineDeadError" for c in type(exc).__mro__)


def _first_output(out):
    return out.outputs[0] if out.outputs else None


class GuardedLLM(_Front):
    """Rollback around ``vllm.LLM`` (offline batch inference).

    >>> # llm = LLM(model_path); front = GuardedLLM(llm)
    >>> # outs = front.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=200))
    >>> # outs[0].token_ids, outs[0].report["rollbacks"]
    """

    def __init__(self, llm, config: GuardConfig | dict | None = None, rollback: RollbackConfig | dict | None = None,
                 *, neuron_step: bool | None = None, engine_repair: bool | None = None,
                 model_name: str | None = None) -> None:
        name = model_name or str(getattr(llm.llm_engine.model_config, "served_model_name", None)
                                 or llm.llm_engine.model_config.model)
        super().__init__(config, rollback, name)
        self.llm = llm
        self.engine = llm.llm_engine
        self.max_model_len = _context_of(llm.llm_engine.model_config)
        self._engine_config(getattr(self.engine, "vllm_config", None))
        try:
            results = self.llm.collective_rpc(_status)
        except Exception:
            results = []
        self._capabilities(results, neuron_step, engine_repair, getattr(self.engine, "vllm_config", None))

    def generate(self, prompts, sampling_params=None,
                 guard: GuardConfig | dict | bool | Sequence[GuardConfig | dict | bool | None] | None = None, *,
                 use_tqdm: Any = True, lora_request=None, priority: int | Sequence[int] | None = None,
                 tokenization_kwargs: dict[str, Any] | None = None) -> list[GuardedOutput]:
        """Guarded ``LLM.generate``: ``prompts`` as vLLM takes them (strings or ``TokensPrompt``s),
        ``sampling_params`` one for all, one per prompt, or None (the model's defaults, as vLLM), ``guard``
        one for all or one per request (None: the front's settings, False: unguarded, a dict: overrides).
        ``lora_request`` and ``priority`` (one for all or one per prompt) go to every engine request of their
        prompt, its resubmissions included, ``tokenization_kwargs`` to the prompt's first (a resubmission is token
        ids already read through them); ``use_tqdm`` is accepted as ``LLM.generate`` takes it (the front draws no
        bar). If anything raises while the batch decodes, its requests are aborted in the engine first."""
        from vllm.sampling_params import RequestOutputKind

        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:  # as LLM.generate: the model's defaults
            get = getattr(self.llm, "get_default_sampling_params", None)
            if get is not None:
                sampling_params = get()
            else:
                from vllm import SamplingParams

                sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        one = guard is None or isinstance(guard, (bool, dict, GuardConfig))  # one setting for every prompt
        guards = [guard] * len(prompts) if one else list(guard)
        if len(params) != len(prompts) or len(guards) != len(prompts):
            raise ConfigError("generate: pass one sampling_params and one guard setting per prompt (or one for all)")
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        priorities = list(priority) if isinstance(priority, (list, tuple)) else [priority] * len(prompts)
        if len(loras) != len(prompts) or len(priorities) != len(prompts):
            raise ConfigError("generate: pass one lora_request and one priority per prompt (or one for all)")
        extras = []  # the keyword arguments of each prompt's engine requests (none given: none passed)
        for lora, prio in zip(loras, priorities):
            extra = {"lora_request": lora} if lora is not None else {}
            if prio is not None:
                extra["priority"] = prio
            extras.append(extra)
        # The prompt's tokenization settings go with its first request only: a resubmission is token ids already
        # read through them (a truncation would cut the kept text).
        first = {"tokenization_kwargs": tokenization_kwargs} if tokenization_kwargs is not None else {}
        tag = f"rg{next(_ids)}"
        reqs = []
        for i, (prompt, p, g) in enumerate(zip(prompts, params, guards)):
            policy = self._policy(g)
            self._check_params(p, prompt, policy is not None)
            rg = self._guard(policy or self.policy, p)
            reqs.append({"prompt": prompt, "params": p, "guard": rg, "guarded": policy is not None, "ids": None,
                         "cached": 0, "counted": set(), "text": "", "stop_reason": None, "out_reason": None, "tokens": [],
                         "t0": time.perf_counter()})
        live: dict[str, tuple[int, Submission]] = {}

        def submit(i: int) -> None:
            r = reqs[i]
            rg = r["guard"]
            while (sub := rg.next_submission()) is not None:
                rid = f"{tag}-{i}.{sub.index}"
                try:
                    self.engine.add_request(rid, self._prompt(r["prompt"], r["ids"], sub),
                                            self._sub_params(r["params"], sub, RequestOutputKind.DELTA,
                                                             len(r["ids"] or []), rg.policy.config),
                                            **extras[i], **(first if sub.index == 0 else {}))
                except Exception as exc:
                    if _engine_dead(exc) or not rg.refused(sub):  # a refused resubmission: on unguarded
                        raise
                    with contextlib.suppress(Exception):  # in case the engine took it in before refusing
                        self.engine.abort_request([rid])
                    continue
                live[rid] = (i, sub)
                return

        tokenizer = None
        try:
            self._run(reqs, live, submit)
        except BaseException:
            if live:  # nothing of this call stays in the engine (a later plain LLM.generate reads its ids)
                try:
                    self.engine.abort_request(list(live))
                except Exception:  # pragma: no cover - the engine is gone too
                    log.exception("repguard: could not abort the front's requests after an error")
            raise
        results = []
        for r in reqs:
            rg = r["guard"]
            if not r["guarded"]:
                results.append(GuardedOutput("", r["ids"] or [], r["tokens"], r["text"], True, r["out_reason"],
                                             r["stop_reason"]))
                continue
            text = r["text"]
            if rg.submissions > 1:
                tokenizer = tokenizer or _tokenizer_of(self.llm)
                text = _final_text(rg, r["params"], r["ids"], tokenizer.decode) if tokenizer is not None else ""
            self._record(rg)
            results.append(GuardedOutput("", r["ids"] or [], rg.tokens, text, True, rg.finish_reason, rg.stop_reason,
                                         report=self._report(rg, r["cached"])))
        for i, res in enumerate(results):
            res.request_id = f"{tag}-{i}"
        return results

    def _run(self, reqs: list[dict], live: dict, submit) -> None:
        """Step the engine until every request of ``reqs`` has finished (their submissions in ``live``)."""
        tokenizer = None
        for i in range(len(reqs)):
            submit(i)
        while live:
            for out in self.engine.step():
                entry = live.get(out.request_id)
                if entry is None:
                    continue
                i, sub = entry
                r, rg = reqs[i], reqs[i]["guard"]
                if r["ids"] is None:
                    r["ids"] = list(out.prompt_token_ids or [])
                    rg.limit_context(self._tokens_left(r["ids"]))
                if sub.index and out.num_cached_tokens and sub.index not in r["counted"]:
                    r["counted"].add(sub.index)  # every output of a request repeats its prefill's count
                    r["cached"] += int(out.num_cached_tokens)
                o = _first_output(out)
                tokens = list(o.token_ids) if o is not None else []
                if not r["guarded"]:
                    r["tokens"] += tokens
                    r["text"] += o.text if o is not None else ""
                    if out.finished:
                        del live[out.request_id]
                        r["out_reason"], r["stop_reason"] = o.finish_reason, o.stop_reason
                    continue
                if sub.index == 0 and o is not None:
                    r["text"] += o.text
                cancel = _feed(rg, sub, tokens, out.finished, o)
                if sub.index and r["params"].stop:  # finished outputs too: a one-token step always is
                    tokenizer = tokenizer or _tokenizer_of(self.llm)
                    if tokenizer is not None:
                        cancel = _stop_across(rg, r["params"], r["ids"], tokenizer.decode) or cancel
                if cancel or out.finished:
                    del live[out.request_id]
                    if not out.finished:
                        self.engine.abort_request([out.request_id])
                    submit(i)


def _tokenizer_of(llm):
    """The engine's tokenizer, or None where it has none (``skip_tokenizer_init``: its outputs carry no text
    either, and a resubmitted request's text stays empty as vLLM's own would)."""
    try:
        return llm.get_tokenizer()
    except Exception:
        return None


def _final_text(rg: RequestGuard, params, prompt_ids: list[int] | None, decode) -> str:
    """A resubmitted request's text, as vLLM ends an output's text (``request_guard.text_ids``/``end_text``: no
    EOS or stop token, a stop string cut off), read after the prompt (``decode_output``)."""
    if getattr(params, "detokenize", True) is False:  # vLLM's outputs carry no text then
        return ""
    include = bool(getattr(params, "include_stop_str_in_output", False))
    ids = text_ids(rg.tokens, rg.finish_reason, rg.stop_reason, include)
    dec = _decoder(params, decode)
    text = decode_output(dec, prompt_ids, ids)
    after = min_tokens_chars(dec, prompt_ids, rg.tokens, getattr(params, "min_tokens", 0))
    return end_text(text, rg.finish_reason, rg.stop_reason, include, after=after)


def _decoder(params, decode):
    return lambda t: decode(t, skip_special_tokens=params.skip_special_tokens)


def _stop_across(rg: RequestGuard, params, prompt_ids: list[int] | None, decode) -> bool:
    """A stop string that began in the tokens a resubmission continues and ends in its new ones (the engine
    searches its own new text only): end the request with it. True when it did."""
    stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    if decode is None or not rg.stop_may_straddle(stops):
        return False
    dec = _decoder(params, decode)
    text = decode_output(dec, prompt_ids, rg.tokens)
    # none before min_tokens tokens, as the engine looks for none there (the kept text may hold some)
    stop = find_stop(text, stops, min_tokens_chars(dec, prompt_ids, rg.tokens, getattr(params, "min_tokens", 0)))
    if stop is not None:
        rg.finish("stop", stop)
    return stop is not None


def _feed(rg: RequestGuard, sub: Submission, tokens: list[int], finished: bool, o) -> bool:
    """Feed one engine output to the guard (``RequestGuard.feed_output``); a finished output without a
    completion counts as aborted."""
    if not finished:
        return rg.feed_output(sub, tokens)
    reason = getattr(o, "finish_reason", None) if o is not None else "abort"
    return rg.feed_output(sub, tokens, reason or "stop", getattr(o, "stop_reason", None))


class GuardedAsyncLLM(_Front):
    """Rollback around an ``AsyncLLM`` (or the OpenAI server's engine client), for serving.

    ``generate`` yields ``GuardedOutput``s as tokens become final (held back by ``holdback`` tokens, so a
    rollback never retracts text already yielded); the last one has ``finished=True`` and the report.
    Closing the generator (a client that went away) aborts the engine request in flight.
    """

    def __init__(self, engine, config: GuardConfig | dict | None = None, rollback: RollbackConfig | dict | None = None,
                 *, neuron_step: bool | None = None, engine_repair: bool | None = None, model_name: str | None = None,
                 tokenizer=None) -> None:
        mc = getattr(engine, "model_config", None)
        name = model_name or str(getattr(mc, "served_model_name", None) or getattr(mc, "model", "model"))
        super().__init__(config, rollback, name)
        self.engine = engine
        self.max_model_len = _context_of(mc)
        self._engine_config(getattr(engine, "vllm_config", None))
        self._want_neurons = neuron_step
        self._want_repair = engine_repair
        self._checked = False
        self._lock = asyncio.Lock()
        self._tokenizer = tokenizer
        # The caller's id of each guarded request running -> one entry per request running under it (vLLM
        # takes the same id twice): the engine's id of its submission in flight (None between two), and whether
        # the caller aborted it (``abort``).
        self._running: dict[str, list[dict[str, Any]]] = {}

    async def abort(self, request_id: str | Sequence[str]) -> None:
        """Abort requests by the caller's ids, as ``AsyncLLM.abort``: a guarded request's submission in flight
        is aborted in the engine (it runs under an id of its own), no resubmission follows, and the request ends
        with finish_reason "abort". Other ids (unguarded requests run under the caller's) go to the engine."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        engine_ids = []
        for rid in ids:
            if rid in self._running:
                for entry in self._running[rid]:
                    entry["aborted"] = True  # seen at its next output, or before its next submission
                    if entry["engine_id"] is not None:
                        engine_ids.append(entry["engine_id"])
            else:
                engine_ids.append(rid)
        if engine_ids:
            await self.engine.abort(engine_ids)

    async def _check(self) -> None:
        if self._checked:
            return
        async with self._lock:
            if self._checked:
                return
            try:
                results = await self.engine.collective_rpc(_status)
            except Exception:
                results = []
            self._capabilities(results, self._want_neurons, self._want_repair,
                               getattr(self.engine, "vllm_config", None))
            self._checked = True

    async def _get_tokenizer(self):
        tok = self._tokenizer
        if tok is None:
            get = getattr(self.engine, "get_tokenizer", None)
            try:
                tok = get() if get is not None else None
                if asyncio.iscoroutine(tok):
                    tok = await tok
            except Exception:  # skip_tokenizer_init: no tokenizer, and no text in vLLM's outputs either
                tok = None
            self._tokenizer = tok
        return tok

    async def generate(self, prompt, sampling_params, request_id: str, *,
                       guard: GuardConfig | dict | bool | None = None, **kwargs) -> AsyncIterator[GuardedOutput]:
        """Guarded ``AsyncLLM.generate`` (extra keyword arguments go to every engine request of the request,
        ``tokenization_kwargs`` to its first only: a resubmission is token ids already read through them)."""
        from vllm.sampling_params import RequestOutputKind

        await self._check()
        policy = self._policy(guard)
        self._check_params(sampling_params, prompt, policy is not None)
        if policy is None:  # the engine's own outputs (in the caller's output kind), with new_token_ids as guarded
            delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
            seen = 0
            async for out in self.engine.generate(prompt, sampling_params, request_id, **kwargs):
                o = _first_output(out)
                ids = list(o.token_ids) if o else []
                new = ids if delta else ids[seen:]
                seen = seen + len(ids) if delta else max(seen, len(ids))
                yield GuardedOutput(request_id, list(out.prompt_token_ids or []), ids, o.text if o else "",
                                    out.finished, o.finish_reason if o else None, o.stop_reason if o else None,
                                    new_token_ids=new)
            return
        rg = self._guard(policy, sampling_params)
        # vLLM's OpenAI server asks for the final output only when the response is not streamed: then the
        # tokens are taken at the end (no hold-back limits the rollbacks)
        stream = getattr(sampling_params, "output_kind", None) != RequestOutputKind.FINAL_ONLY
        prompt_ids: list[int] | None = None
        cached = 0
        text0 = ""
        recorded = False
        entry: dict[str, Any] = {"engine_id": None, "aborted": False}
        self._running.setdefault(request_id, []).append(entry)
        # The prompt's own tokenization settings apply to the caller's request; a resubmission is token ids
        # already read through them (its truncation would cut the kept text).
        later = {k: v for k, v in kwargs.items() if k != "tokenization_kwargs"}
        try:
            while True:
                if entry["aborted"] and not rg.done:
                    rg.finish("abort")  # aborted by the caller between two submissions
                sub = rg.next_submission()
                if sub is None:
                    break
                gen = None
                counted = started = False
                entry["engine_id"] = engine_id = f"{request_id}.{sub.index}"
                try:
                    gen = self.engine.generate(self._prompt(prompt, prompt_ids, sub),
                                               self._sub_params(sampling_params, sub, RequestOutputKind.DELTA,
                                                                len(prompt_ids or []), rg.policy.config),
                                               engine_id, **(kwargs if sub.index == 0 else later))
                    async for out in gen:
                        started = True
                        if prompt_ids is None:
                            prompt_ids = list(out.prompt_token_ids or [])
                            rg.limit_context(self._tokens_left(prompt_ids))
                        if sub.index and out.num_cached_tokens and not counted:
                            counted = True  # every output of a request repeats its prefill's count
                            cached += int(out.num_cached_tokens)
                        o = _first_output(out)
                        if sub.index == 0 and o is not None:
                            text0 += o.text
                        cancel = _feed(rg, sub, list(o.token_ids) if o else [], out.finished, o)
                        if sub.index and sampling_params.stop:  # finished outputs too: a one-token step always is
                            tok = await self._get_tokenizer()
                            decode = tok.decode if tok is not None else None
                            cancel = _stop_across(rg, sampling_params, prompt_ids, decode) or cancel
                        if entry["aborted"] and not rg.done:  # an abort the engine did not see (not yet registered)
                            rg.finish("abort")
                            cancel = True
                        new = rg.take_released() if stream and not rg.done else []
                        if new:
                            yield GuardedOutput(request_id, prompt_ids, [], "", False, None, new_token_ids=new)
                        if cancel or out.finished:
                            break
                except Exception as exc:
                    if started or _engine_dead(exc) or not rg.refused(sub):  # a refused resubmission: on unguarded
                        raise
                finally:
                    entry["engine_id"] = None
                    if gen is not None:
                        await gen.aclose()  # aborts the engine request if it is still running
            tokens = rg.tokens
            new = rg.take_released()
            text = text0
            if rg.submissions > 1:
                tok = await self._get_tokenizer()
                text = _final_text(rg, sampling_params, prompt_ids, tok.decode) if tok is not None else ""
            self._record(rg)
            recorded = True
            yield GuardedOutput(request_id, prompt_ids or [], tokens, text, True, rg.finish_reason, rg.stop_reason,
                                new_token_ids=new, report=self._report(rg, cached))
        finally:
            entries = self._running.get(request_id, [])
            if entry in entries:
                entries.remove(entry)
            if not entries:
                self._running.pop(request_id, None)
            if not recorded and rg.submissions:
                self._record(rg)


__all__ = ["GuardedAsyncLLM", "GuardedLLM", "GuardedOutput"]
