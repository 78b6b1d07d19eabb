"""The embedded backend: one worker thread runs ``model.generate`` on batches of rows, under the guard's hooks.

A request is ``len(prompts) * n`` choices; each choice is one row of a batch at a time. Rows with
compatible sampling settings (greedy, or the same temperature/top_p; a seeded request only with itself)
are generated together with left padding, each with its own ``GuardConfig`` (``Guard.configure_rows``).

Guarded choices run with rollback by default, through the core ``RequestGuard`` (the same policy as the
vLLM front and ``--upstream``): the row's tokens are fed to it as they are decoded; when it confirms a
loop the row ends in its batch, and the choice re-enters the queue as a new row (prompt + kept tokens,
the loop's next token banned on its first step, the mapped neurons off for the re-decode through the
row's ``GuardConfig`` when a map is loaded), in admission order, so it neither stalls nor reorders the
other rows. Streaming holds ``holdback`` tokens back, so a rollback never retracts text already sent.
``"rollback": false`` runs the single pass: the hooks alone (deactivate, escalate, stop), in one batch.

Under greedy decoding, the penalties a row's guard waits to apply to its next token (the re-decode's repair,
the last pass's escalation) are added to that row's next logits in the running batch: the engine then picks
what the guard's re-decode of that position would, without a new row for it.

A running batch of rollback or unguarded rows ends early (after ``rebatch_steps`` steps) when rows of
its kind wait and there is room for them beside its unfinished rows (for all of them, or a quarter of the
batch, so that a re-prefill serves several): those re-enter the queue with their tokens so
far and the next batch takes them with the waiting ones (the KV cache is not kept: a re-prefill), so a
request arriving mid-batch does not wait for the batch to finish. Single-pass rows keep their hooks'
state for the whole pass, so their batches run to the end; so do seeded ones (reproducible sampling).

Per row, a stopping criterion ends the row at its own ``max_tokens``, stop string, EOS, rollback, or when
its client went away; a ``BaseStreamer`` hands each choice's new text to its request's asyncio queue.
Admission is bounded (admitted requests: running + queued): beyond it ``submit`` raises ``EngineBusy``
(429); while draining, ``EngineDraining`` (503).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .. import metrics
from . import metrics as server_metrics
from ..config import GuardConfig
from ..errors import ConfigError
from ..request_guard import RequestGuard, Submission, check_request_config, derive_seed, find_stop
from ..rollback import RollbackConfig, RollbackPolicy
from ..runtime import token_id_list

log = logging.getLogger("repguard.serve")


SAMPLING_EPS = 1e-5
HOOKS_OFF = GuardConfig.from_dict({"enabled": False})  # a row the hooks leave alone


class EngineBusy(Exception):
    """The queue is full: answer 429."""


class EngineDraining(Exception):
    """The server is shutting down: answer 503."""


@dataclass(eq=False)
class GenerationRequest:
    """One HTTP request: ``len(prompts) * n`` choices sharing sampling settings and a guard config.

    ``rollback`` / ``holdback``: None takes the server's rollback settings."""

    prompts: list[list[int]]
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    guard_config: GuardConfig | None = None
    rollback: bool | None = None
    holdback: int | None = None
    stream: bool = True  # False: the response is not streamed, so rollback rows release their tokens at the end only
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    admitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None
    started: bool = False  # some choice ran in a batch
    first_token_at: float | None = None  # its first token: the first text streamed, or (not streamed) decoded
    open: int = 0  # choices not finished yet
    batches: int = 0  # batches it ran in (seeded requests derive each batch's seed from it)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflows to inf and sampling degenerates to argmax anyway
        return self.temperature < SAMPLING_EPS

    def batch_key(self) -> tuple:
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", self.id)  # a seed makes the request reproducible only when it runs alone
        return ("sample", self.temperature, self.top_p)

    def emit(self, event: dict[str, Any]) -> None:
        """Thread-safe hand-off to the request's asyncio queue (dropped if its loop is gone)."""
        if self.loop is None or self.queue is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # event loop closed: nobody is listening any more
            pass


@dataclass(eq=False)
class _Choice:
    """One choice of a request, across the batches it runs in.

    ``mode``: "plain" (guard off), "single" (the hooks' single pass) or "rollback" (``guard`` drives it)."""

    request: GenerationRequest
    index: int
    prompt: list[int]
    mode: str
    config: GuardConfig  # the request's guard settings
    guard: RequestGuard | None = None
    sub: Submission | None = None  # rollback: the submission running now
    fed: list[int] = field(default_factory=list)  # rollback: tokens of ``sub`` decoded so far
    tokens: list[int] = field(default_factory=list)  # plain/single: generated tokens; rollback: released ones
    text: str = ""
    sent: int = 0  # characters of ``text`` already emitted
    stopped_at: int = -1  # rollback: character where a stop string cut the text
    done: bool = False
    finish_reason: str | None = None

    @property
    def order(self) -> tuple:
        return (self.request.admitted, self.request.id, self.index)

    @property
    def key(self) -> tuple:
        return ("single", *self.request.batch_key()) if self.mode == "single" else self.request.batch_key()

    def row_input(self) -> list[int]:
        if self.mode == "rollback":
            return self.prompt + list(self.sub.generated) + self.fed
        return self.prompt + self.tokens

    def budget(self) -> int:
        """New tokens this choice may still decode in its next row."""
        if self.mode == "rollback":
            return self.sub.max_tokens - len(self.fed)
        return self.request.max_tokens - len(self.tokens)

    def first_bias(self) -> dict[int, float] | None:
        """Logit bias of the row's first step: a submission's own, unless the row resumes it; else, for a greedy
        request, the penalties its guard waits to apply to the next token (as at every later step)."""
        if self.mode != "rollback":
            return None
        if not self.fed and self.sub.bias:
            return self.sub.bias
        return self.penalties()

    def penalties(self) -> dict[int, float] | None:
        """A greedy rollback row's bias for its next step: the guard's pending penalties. The engine then picks
        what a one-token step with them would, and tells the guard so (``RequestGuard.feed(penalised=True)``)."""
        if self.mode != "rollback" or not self.request.greedy:
            return None
        pending = self.guard.pending_penalties
        return {t: -a for t, a in pending.items()} if pending else None

    def hook_config(self) -> GuardConfig:
        if self.mode == "single":
            return self.config
        if self.mode == "rollback" and self.sub.neurons_off:  # the re-decode: only the neuron step, from the start
            return self.config.replace(always_on=True, escalate=False, stop=False)
        return HOOKS_OFF


@dataclass(eq=False)
class _Slot:
    """One row of one batch."""

    choice: _Choice
    stopped: bool = False  # this row wants no more tokens in this batch
    finished_at: int = -1  # single/plain: the step at which its choice finished
    announced: bool = False
    preempted: bool = False  # ended by a re-batch: its choice continues in a later batch


class _RowBias:
    """Logits processor: per-row logit biases. At the batch's first step, each row's submission bias (a
    rollback's ban, a penalty step); at later steps, the penalties the row's guard is waiting to apply to the
    next token (greedy rows: the engine then picks what the guard's re-decode of that position would)."""

    def __init__(self, first: dict[int, dict[int, float]], start_length: int) -> None:
        self.first, self.start_length = first, start_length
        self.next: dict[int, dict[int, float]] = {}  # set by the tracker after each step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bias = self.first if input_ids.shape[1] == self.start_length else self.next
        if not bias:
            return scores
        scores = scores.clone()
        for row, row_bias in bias.items():
            for token, amount in row_bias.items():
                if amount == float("-inf"):
                    scores[row, token] = float("-inf")
                else:
                    scores[row, token] += amount
        return scores


class _BatchTracker(StoppingCriteria, BaseStreamer):
    """Per-row bookkeeping of one batch: a stopping criterion (feeds and ends rows) and a streamer (emits).

    ``generate`` calls the criterion with the grown ``input_ids`` and then ``put`` with the new tokens,
    once per step; stopped rows keep receiving padding, which is ignored here."""

    def __init__(self, engine: "Engine", slots: list[_Slot], key: tuple, rebatch: bool, bias: _RowBias) -> None:
        self.engine = engine
        self.bias = bias
        self.slots = slots
        self.tok = engine.tokenizer
        self.eos = engine.eos
        self.key = key
        self.rebatch = rebatch and engine.rebatch_steps > 0
        self.single = key[0] == "single"
        self._prompt_seen = False
        self.step = 0
        self.preempted = False

    # -- StoppingCriteria -------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()
        reports = self.engine.guard.reports if self.single else None
        self.bias.next = {}
        for i, slot in enumerate(self.slots):
            if slot.stopped:
                continue
            ch = slot.choice
            if ch.request.cancelled.is_set():
                slot.stopped = True
                self.engine._drop(ch)
                continue
            if ch.request.first_token_at is None and not ch.request.stream:  # decoded now, sent at the end
                self.engine._observe_ttft(ch.request)
            if ch.mode == "rollback":
                self._feed_rollback(slot, newest[i])
                penalties = None if slot.stopped else ch.penalties()
                if penalties:
                    self.bias.next[i] = penalties
            else:
                self._feed_plain(slot, newest[i], reports[i] if reports is not None and i < len(reports) else None)
        live = sum(not s.stopped for s in self.slots)
        if (self.rebatch and live and self.step + 1 >= self.engine.rebatch_steps
                and self.engine._waiting(self.key, self.engine.max_batch_size - live, len(self.slots))):
            self.preempted = True  # rows wait that fit beside the live ones: end the batch, re-batch them all
            for slot in self.slots:
                if not slot.stopped:
                    slot.stopped = slot.preempted = True
        return torch.tensor([s.stopped for s in self.slots], dtype=torch.bool, device=input_ids.device)

    def _feed_plain(self, slot: _Slot, token: int, report) -> None:
        ch, req = slot.choice, slot.choice.request
        if token in self.eos:
            stopped = report is not None and report.finish_reason == "repetition"
            self._finish(slot, "repetition" if stopped else "stop")
            return
        ch.tokens.append(token)
        ch.text = self.tok.decode(ch.tokens, skip_special_tokens=True)
        if req.stop:
            cut = min((p for p in (ch.text.find(s) for s in req.stop) if p >= 0), default=-1)
            if cut >= 0:
                ch.text = ch.text[:cut]
                self._finish(slot, "stop")
                return
        if len(ch.tokens) >= req.max_tokens:
            self._finish(slot, "length")

    def _feed_rollback(self, slot: _Slot, token: int) -> None:
        ch, req = slot.choice, slot.choice.request
        rg, sub = ch.guard, ch.sub
        ch.fed.append(token)
        # A greedy row's every step had the guard's pending penalties in its bias (``_Choice.penalties``).
        over = rg.feed(sub, [token], penalised=req.greedy)
        # The token was taken (not rolled back nor re-decoded), though it may have ended a one-token step, or
        # the request at its length (a stop string it completes then ends it with "stop"):
        accepted = ((not rg.done or rg.finish_reason == "length")
                    and len(rg.tokens) == len(sub.generated) + len(ch.fed))
        if accepted and req.stop:  # a stop string in the text decided so far ends the request, as an engine does
            text = self.tok.decode(rg.tokens, skip_special_tokens=True)
            stop = find_stop(text, req.stop)
            if stop is not None:
                rg.finish("stop")
                ch.stopped_at = text.find(stop)
                over = True
        if not over and len(ch.fed) >= sub.max_tokens:
            rg.end(sub, "length")
            over = True
        if not over:
            return
        slot.stopped = True
        if rg.done:
            ch.done = True
            return
        ch.sub, ch.fed = rg.next_submission(), []
        self.engine._requeue(ch)  # a new row: prompt + kept tokens, with the submission's repair

    def _finish(self, slot: _Slot, reason: str) -> None:
        slot.stopped = True
        slot.choice.done, slot.choice.finish_reason, slot.finished_at = True, reason, self.step

    # -- BaseStreamer -----------------------------------------------------------------------------------
    def put(self, value) -> None:
        if not self._prompt_seen:  # the first call carries the prompts
            self._prompt_seen = True
            return
        self.flush()
        self.step += 1

    def end(self) -> None:
        for slot in self.slots:
            ch = slot.choice
            if slot.stopped or ch.done or ch.request.cancelled.is_set():
                continue
            if ch.mode == "single":
                self._finish(slot, "length")
            else:  # generate ended before this row did (it cannot, but never lose a choice): run it on
                self.engine._requeue(ch)
        for slot in self.slots:
            if slot.preempted and not slot.choice.done:
                self.engine._requeue(slot.choice)
        if self.single:
            self.engine._observe_last(self.slots)
        self.flush(final=True)

    def flush(self, final: bool = False) -> None:
        """Emit new text. A single-pass row's finish is announced one step after it finished (or at the
        end), once the guard has observed its last token (the next forward feeds it): its report is complete."""
        engine = self.engine
        reports = None
        for i, slot in enumerate(self.slots):
            ch = slot.choice
            if slot.announced or ch.request.cancelled.is_set():
                continue
            if ch.mode == "rollback":
                engine._emit_rollback(ch)
                slot.announced = ch.done
                continue
            engine._emit_text(ch, ch.text, ch.done)
            if ch.done and (final or slot.finished_at < self.step):
                slot.announced = True
                if reports is None:
                    reports = engine.guard.reports
                report = reports[i] if i < len(reports) else None
                if report is not None and ch.mode == "single":
                    engine._record(report)
                engine._announce(ch, report.to_dict() if report is not None else None, len(ch.tokens))


class Engine:
    """Owns the model, its installed guard and the worker thread. Thread-safe ``submit``/``cancel``."""

    def __init__(
        self, model, tokenizer, guard, model_name: str, *, max_batch_size: int = 8, max_queue: int = 64,
        batch_wait_s: float = 0.005, default_guard: GuardConfig | None = None,
        rollback: RollbackConfig | dict | None = None, rebatch_steps: int = 16,
    ) -> None:
        self.model, self.tokenizer, self.guard = model, tokenizer, guard
        self.model_name = model_name
        self.max_batch_size, self.max_queue, self.batch_wait_s = max_batch_size, max_queue, batch_wait_s
        self.rebatch_steps = rebatch_steps
        self.default_guard = default_guard or guard.config
        self.rollback = rollback if isinstance(rollback, RollbackConfig) else RollbackConfig.from_dict(rollback)
        self.neuron_step = guard.neuron_map is not None
        if self.rollback.enabled and self.default_guard.enabled:
            try:  # settings a token-level rollback cannot run fail at start, not on every request
                check_request_config(self.default_guard)
            except ConfigError as exc:
                raise ConfigError(f"guard.{exc} (or turn rollback off: rollback {{\"enabled\": false}})") from None
        self._policies: dict[tuple, RollbackPolicy] = {}
        if self.rollback.enabled and self.default_guard.enabled:
            try:  # and so do the guard and rollback settings that make no policy together
                self.policy(self.default_guard, None)
            except ConfigError as exc:
                raise ConfigError(f"guard and rollback settings: {exc}") from None
        self.eos = set(guard.eos) | set(token_id_list(tokenizer.eos_token_id))
        # Finished rows are padded with EOS, so the guard stops watching them (it ignores rows after EOS).
        self.pad_id = min(self.eos) if self.eos else tokenizer.pad_token_id
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.num_layers = (int(guard.neuron_map.meta.num_layers) if guard.neuron_map is not None
                           else int(getattr(model.config, "num_hidden_layers", 0) or 0))
        self.map_size = len(guard.neuron_map) if guard.neuron_map is not None else 0
        guard.record_metrics = False  # a request spans several generations: its reports are recorded here
        guard.observe_last = False  # each generation's last tokens are read by the batch's streamer (_observe_last)
        self._pending: list[_Choice] = []  # sorted by admission order
        self._live: dict[str, GenerationRequest] = {}  # admitted, not finished
        self._cond = threading.Condition()
        self._draining = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.preemptions = 0
        server_metrics.init_model(model_name)

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="repguard-engine", daemon=True)
            self._thread.start()
        return self

    def drain(self) -> None:
        """Refuse new requests (503); those already admitted still run."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    @property
    def draining(self) -> bool:
        return self._draining

    def close(self, timeout: float = 60.0) -> None:
        """Drain, wait for admitted requests to finish (up to ``timeout``), stop the worker."""
        self.drain()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._live and time.monotonic() < deadline:
                self._cond.wait(0.05)
            for req in list(self._live.values()):
                if not req.started:
                    req.emit({"type": "error", "status": 503, "message": "server shut down before the request ran"})
                    req.emit({"type": "done"})
            self._pending.clear()
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 5.0)

    # -- admission --------------------------------------------------------------------------------------
    def load(self) -> tuple[int, int]:
        """(queued, running) requests."""
        with self._cond:
            queued = sum(not r.started for r in self._live.values())
            return queued, len(self._live) - queued

    def policy(self, cfg: GuardConfig, holdback: int | None) -> RollbackPolicy:
        """The rollback policy of a request's settings (made once per distinct settings)."""
        key = (cfg.model_dump_json(), holdback)
        policy = self._policies.get(key)
        if policy is None:
            settings = self.rollback if holdback is None else self.rollback.model_copy(update={"holdback": holdback})
            policy = RollbackPolicy(cfg, settings)
            if len(self._policies) > 256:
                self._policies.clear()
            self._policies[key] = policy
        return policy

    def uses_rollback(self, cfg: GuardConfig | None, rollback: bool | None) -> bool:
        """Does a request with these settings run with rollback? Rollback is a repair: a config that only
        watches (no deactivation, escalation or stop; the "monitor" preset) asks for none: the single pass."""
        cfg = cfg or self.default_guard
        return cfg.repairs and (self.rollback.enabled if rollback is None else rollback)

    def _choices(self, req: GenerationRequest) -> list[_Choice]:
        cfg = req.guard_config or self.default_guard
        mode = "plain" if not cfg.enabled else "rollback" if self.uses_rollback(cfg, req.rollback) else "single"
        choices = []
        for p_i, prompt in enumerate(req.prompts):
            for j in range(req.n):
                ch = _Choice(req, p_i * req.n + j, list(prompt), mode, cfg)
                if mode == "rollback":
                    ch.guard = RequestGuard(self.policy(cfg, req.holdback), req.max_tokens, eos_ids=self.eos,
                                            neuron_step=self.neuron_step, greedy=req.greedy,
                                            model_name=self.model_name)
                    ch.sub = ch.guard.next_submission()
                choices.append(ch)
        return choices

    def submit(self, req: GenerationRequest) -> None:
        """Admit ``req`` or raise EngineBusy / EngineDraining. Must be called from an event loop."""
        req.loop = asyncio.get_running_loop()
        req.queue = asyncio.Queue()
        choices = self._choices(req)  # a ConfigError (settings rollback cannot run) leaves before admission
        with self._cond:
            if self._draining or self._stopped:
                raise EngineDraining("the server is shutting down")
            if len(self._live) >= self.max_batch_size + self.max_queue:
                queued, running = self._counts()
                raise EngineBusy(f"the server is at capacity ({running} running, {queued} queued); retry later")
            req.admitted = time.perf_counter()
            req.open = len(choices)
            self._live[req.id] = req
            for ch in choices:
                self._insert(ch)
            self._gauges()
            self._cond.notify_all()

    def cancel(self, req: GenerationRequest) -> None:
        """The client is gone (or the response is complete): free its slot now; its rows end at the next step."""
        req.cancelled.set()
        with self._cond:
            self._pending = [c for c in self._pending if c.request is not req]
            self._live.pop(req.id, None)
            self._gauges()
            self._cond.notify_all()

    def _counts(self) -> tuple[int, int]:
        queued = sum(not r.started for r in self._live.values())
        return queued, len(self._live) - queued

    def _gauges(self) -> None:
        queued, running = self._counts()
        server_metrics.set_queue(self.model_name, queued, running)

    def _insert(self, ch: _Choice) -> None:
        bisect.insort(self._pending, ch, key=lambda c: c.order)

    def _requeue(self, ch: _Choice) -> None:
        """A choice's next row (after a rollback, a one-token step, or a re-batch) joins the queue in order."""
        with self._cond:
            if ch.request.id in self._live and not ch.request.cancelled.is_set():
                self._insert(ch)
                self._cond.notify_all()

    def _waiting(self, key: tuple, free: int, size: int) -> bool:
        """Is a re-batch worth its re-prefill? Rows of kind ``key`` wait, and ``free`` rows are open for them:
        all of them, or a quarter of the batch. (No lock: a hint, read per step.)"""
        if free <= 0:
            return False
        waiting = sum(c.key == key and not c.request.cancelled.is_set() for c in list(self._pending))
        return waiting > 0 and (waiting <= free or free >= max(1, size // 4))

    def _drop(self, ch: _Choice) -> None:
        ch.done, ch.finish_reason = True, "cancelled"

    # -- events -----------------------------------------------------------------------------------------
    def _emit_text(self, ch: _Choice, text: str, final: bool) -> None:
        upto = len(text)
        if not final:
            stops = ch.request.stop
            upto -= max((len(s) for s in stops), default=1) - 1 if stops else 0  # a stop string may still complete
            while upto > ch.sent and text[upto - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                upto -= 1
        if ch.request.first_token_at is None and ch.request.stream and (upto > ch.sent or final):
            self._observe_ttft(ch.request)  # the first text the client gets (after any rollback hold-back)
        if upto > ch.sent:
            ch.request.emit({"type": "delta", "index": ch.index, "text": text[ch.sent:upto]})
            ch.sent = upto

    def _emit_rollback(self, ch: _Choice) -> None:
        rg = ch.guard
        new = rg.take_released() if ch.request.stream or ch.done else []  # not streamed: all at the end
        if not new and not ch.done:
            return
        ch.tokens.extend(new)
        out = ch.tokens
        if ch.done and rg.finish_reason == "stop" and out and out[-1] in self.eos:
            out = out[:-1]  # the EOS that ended it is not text (nor counted), as in the single pass
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        if ch.done and ch.stopped_at >= 0:
            text = text[: ch.stopped_at]
        self._emit_text(ch, text, ch.done)
        if not ch.done:
            return
        report = rg.report.to_dict()
        report.update(rollbacks=rg.rollbacks, submissions=rg.submissions, decoded_tokens=rg.decoded, form=rg.form,
                      stopped=rg.finish_reason == "repetition")
        ch.finish_reason = rg.finish_reason
        self._record(rg.report)
        metrics.record_rollback(self.model_name, rg.rollbacks, max(0, rg.decoded - len(rg.tokens)))
        self._announce(ch, report, len(out))

    def _observe_ttft(self, req: GenerationRequest) -> None:
        req.first_token_at = time.perf_counter()
        server_metrics.observe_ttft(self.model_name, req.first_token_at - req.admitted)

    def _record(self, report) -> None:
        metrics.record_report(self.model_name, report)

    def _announce(self, ch: _Choice, report: dict | None, completion_tokens: int) -> None:
        req = ch.request
        req.emit({"type": "finish", "index": ch.index, "finish_reason": ch.finish_reason, "report": report,
                  "completion_tokens": completion_tokens, "prompt_tokens": len(ch.prompt)})
        req.open -= 1
        if req.open <= 0:
            self._finish_request(req)

    def _finish_request(self, req: GenerationRequest) -> None:
        with self._cond:
            self._live.pop(req.id, None)
            self._pending = [c for c in self._pending if c.request is not req]
            self._gauges()
            self._cond.notify_all()
        req.emit({"type": "done"})

    # -- worker -----------------------------------------------------------------------------------------
    def _take_batch(self) -> list[_Choice] | None:
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            fresh = any(not c.request.started for c in self._pending)
        if self.batch_wait_s and fresh:
            time.sleep(self.batch_wait_s)  # let concurrent arrivals join this batch
        with self._cond:
            batch: list[_Choice] = []
            key = None
            rest = []
            for ch in self._pending:
                if ch.request.cancelled.is_set() or ch.request.id not in self._live:
                    continue
                if key is None:
                    key = ch.key
                if ch.key != key or len(batch) >= self.max_batch_size:
                    rest.append(ch)
                    continue
                batch.append(ch)
                ch.request.started = True
            self._pending = rest
            self._gauges()
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._generate(batch)
            except Exception as exc:  # a failed batch answers 500 to its requests; the server keeps going
                log.exception("repguard: generation failed")
                failed = {id(ch.request): ch.request for ch in batch}
                for req in failed.values():
                    if req.id in self._live:
                        req.emit({"type": "error", "status": 500,
                                  "message": f"generation failed: {type(exc).__name__}"})
                        self._finish_request(req)

    def _observe_last(self, slots: list[_Slot]) -> None:
        """``generate`` returns without feeding the last step's tokens back through the model, so the
        guard's hooks never saw them: show them to its runtime, with the neuron scores of the pass that
        produced them, as its forward pre-hook would have (single-pass rows)."""
        reports = self.guard.reports
        tokens = {
            i: s.choice.tokens[-1] for i, s in enumerate(slots)
            if s.choice.tokens and i < len(reports) and reports[i] is not None
            and reports[i].tokens_observed < len(s.choice.tokens)
        }
        if not tokens:
            return
        try:
            runtime = self.guard.runtime
            runtime.observe(tokens, runtime.neuron_scores())
        except Exception:  # the guard fails open: a report one token short beats a failed request
            log.exception("repguard: observing the final tokens failed")

    def _generate(self, batch: list[_Choice]) -> None:
        slots = [_Slot(ch) for ch in batch]
        rows = [ch.row_input() for ch in batch]
        enc = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        input_ids, attention = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        first = batch[0].request
        key = batch[0].key
        self.guard.configure_rows([ch.hook_config() for ch in batch])
        rebatch = key[0] in ("greedy", "sample")
        bias = _RowBias({i: ch.first_bias() for i, ch in enumerate(batch) if ch.first_bias()}, input_ids.shape[1])
        tracker = _BatchTracker(self, slots, key, rebatch, bias)
        processors = LogitsProcessorList([bias] if any(ch.mode == "rollback" for ch in batch) else [])
        sampling: dict[str, Any] = (
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            if first.greedy
            else {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p, "top_k": 0}
        )
        if first.seed is not None:
            torch.manual_seed(derive_seed(first.seed, first.batches))
        for req in {id(ch.request): ch.request for ch in batch}.values():
            req.batches += 1
        server_metrics.observe_batch(self.model_name, len(rows))
        self.batches += 1
        try:
            with torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids, attention_mask=attention,
                    max_new_tokens=max(1, max(ch.budget() for ch in batch)),
                    stopping_criteria=StoppingCriteriaList([tracker]), streamer=tracker, logits_processor=processors,
                    pad_token_id=self.pad_id, eos_token_id=sorted(self.eos) or None, **sampling,
                )
        finally:
            self.guard.configure_rows(None)
            self.guard.flush()
        if tracker.preempted:
            self.preemptions += 1
