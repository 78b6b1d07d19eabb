"""The embedded backend: one worker thread runs guarded ``model.generate`` on dynamic batches.

Requests with compatible sampling settings (greedy, or the same temperature/top_p; a seeded
request only with itself) are generated together in one batch with left padding, each row with its
own ``GuardConfig`` (``Guard.configure_rows``). Per row, a stopping criterion ends the row at its own
``max_tokens``, stop string, EOS, or when its client went away; a ``BaseStreamer`` then hands each
row's new text to its request's asyncio queue. Admission is bounded (running rows + a queue):
beyond it ``submit`` raises ``EngineBusy`` (429); while draining, ``EngineDraining`` (503).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .. import metrics
from ..config import GuardConfig

log = logging.getLogger("repguard.serve")


SAMPLING_EPS = 1e-5


class EngineBusy(Exception):
    """The queue is full: answer 429."""


class EngineDraining(Exception):
    """The server is shutting down: answer 503."""


@dataclass
class GenerationRequest:
    """One HTTP request: ``len(prompts) * n`` rows sharing sampling settings and a guard config."""

    prompts: list[list[int]]
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    guard_config: GuardConfig | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    admitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None

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


@dataclass
class _Row:
    request: GenerationRequest
    index: int  # choice index inside the request
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already emitted
    done: bool = False
    finish_reason: str | None = None
    finished_at: int = -1  # the decoding step at which the row finished
    announced: bool = False


class _BatchTracker(StoppingCriteria, BaseStreamer):
    """Per-row bookkeeping of one batch: a stopping criterion (ends rows) and a streamer (emits text).

    ``generate`` calls the criterion with the grown ``input_ids`` and then ``put`` with the new tokens,
    once per step; finished rows keep receiving padding, which is ignored here.
    """

    def __init__(self, rows: list[_Row], tokenizer, eos: set[int], reports, observe_last=None) -> None:
        self.rows = rows
        self.tok = tokenizer
        self.eos = eos
        self.reports = reports  # callable -> the guard's live per-row reports
        self.observe_last = observe_last  # callable(rows): show the guard the tokens no forward pass fed it
        self.holdback = max((len(s) for r in rows for s in (r.request.stop or [])), default=1) - 1
        self._prompt_seen = False
        self.step = 0

    # -- StoppingCriteria -------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()
        reports = self.reports()
        for i, row in enumerate(self.rows):
            if row.done:
                continue
            req = row.request
            token = newest[i]
            if req.cancelled.is_set():
                self._finish(row, "cancelled")
                continue
            if token in self.eos:
                report = reports[i] if i < len(reports) else None
                stopped = report is not None and report.finish_reason == "repetition"
                self._finish(row, "repetition" if stopped else "stop")
                continue
            row.tokens.append(token)
            row.text = self.tok.decode(row.tokens, skip_special_tokens=True)
            if req.stop:
                cut = min((p for p in (row.text.find(s) for s in req.stop) if p >= 0), default=-1)
                if cut >= 0:
                    row.text = row.text[:cut]
                    self._finish(row, "stop")
                    continue
            if len(row.tokens) >= req.max_tokens:
                self._finish(row, "length")
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)

    def _finish(self, row: _Row, reason: str) -> None:
        row.done, row.finish_reason, row.finished_at = True, reason, self.step

    # -- BaseStreamer -----------------------------------------------------------------------------------
    def put(self, value) -> None:
        if not self._prompt_seen:  # the first call carries the prompts
            self._prompt_seen = True
            return
        self.flush()
        self.step += 1

    def end(self) -> None:
        for row in self.rows:
            if not row.done:
                self._finish(row, "length")
        if self.observe_last is not None:
            self.observe_last(self.rows)
        self.flush(final=True)

    def flush(self, final: bool = False) -> None:
        """Emit new text; announce a row's finish one step after it finished (or at the end), once the
        guard has observed its last token (the next forward pass feeds it), so its report is complete."""
        reports = None
        for i, row in enumerate(self.rows):
            if row.announced or row.request.cancelled.is_set():
                continue
            upto = len(row.text)
            if not row.done:
                upto -= self.holdback
                while upto > row.sent and row.text[upto - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                    upto -= 1
            if upto > row.sent:
                row.request.emit({"type": "delta", "index": row.index, "text": row.text[row.sent:upto]})
                row.sent = upto
            if row.done and (final or row.finished_at < self.step):
                row.announced = True
                reports = reports if reports is not None else self.reports()
                report = reports[i].to_dict() if i < len(reports) and reports[i] is not None else None
                row.request.emit({
                    "type": "finish", "index": row.index, "finish_reason": row.finish_reason,
                    "report": report, "completion_tokens": len(row.tokens), "prompt_tokens": len(row.prompt),
                })


class Engine:
    """Owns the model, its installed guard and the worker thread. Thread-safe ``submit``/``cancel``."""

    def __init__(
        self, model, tokenizer, guard, model_name: str, *, max_batch_size: int = 8, max_queue: int = 64,
        batch_wait_s: float = 0.005, default_guard: GuardConfig | None = None,
    ) -> None:
        self.model, self.tokenizer, self.guard = model, tokenizer, guard
        self.model_name = model_name
        self.max_batch_size, self.max_queue, self.batch_wait_s = max_batch_size, max_queue, batch_wait_s
        self.default_guard = default_guard or guard.config
        self.eos = set(guard.eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        # Finished rows are padded with EOS, so the guard stops watching them (it ignores rows after EOS).
        self.pad_id = min(self.eos) if self.eos else tokenizer.pad_token_id
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.num_layers = int(guard.neuron_map.meta.num_layers)  # the map fits the model (checked by the guard)
        self.map_size = len(guard.neuron_map)
        self._pending: deque[GenerationRequest] = deque()
        self._running: set[str] = set()
        self._cond = threading.Condition()
        self._draining = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        metrics.init_model(model_name)

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
            while (self._pending or self._running) and time.monotonic() < deadline:
                self._cond.wait(0.05)
            for req in list(self._pending):
                req.emit({"type": "error", "status": 503, "message": "server shut down before the request ran"})
            self._pending.clear()
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 5.0)

    # -- admission --------------------------------------------------------------------------------------
    def load(self) -> tuple[int, int]:
        with self._cond:
            return len(self._pending), len(self._running)

    def submit(self, req: GenerationRequest) -> None:
        """Admit ``req`` or raise EngineBusy / EngineDraining. Must be called from an event loop."""
        req.loop = asyncio.get_running_loop()
        req.queue = asyncio.Queue()
        with self._cond:
            if self._draining or self._stopped:
                raise EngineDraining("the server is shutting down")
            if len(self._pending) + len(self._running) >= self.max_batch_size + self.max_queue:
                raise EngineBusy(
                    f"the server is at capacity ({len(self._running)} running, {len(self._pending)} queued); retry later"
                )
            req.admitted = time.perf_counter()
            self._pending.append(req)
            metrics.SERVER_QUEUED.labels(self.model_name).set(len(self._pending))
            self._cond.notify_all()

    def cancel(self, req: GenerationRequest) -> None:
        """The client is gone: free its slot now; its rows end at the next decoding step."""
        req.cancelled.set()
        with self._cond:
            try:
                self._pending.remove(req)
            except ValueError:
                pass
            self._release(req)
            metrics.SERVER_QUEUED.labels(self.model_name).set(len(self._pending))
            self._cond.notify_all()

    def _release(self, req: GenerationRequest) -> None:
        if req.id in self._running:
            self._running.discard(req.id)
            metrics.SERVER_RUNNING.labels(self.model_name).set(len(self._running))

    # -- worker -----------------------------------------------------------------------------------------
    def _take_batch(self) -> list[GenerationRequest] | None:
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
        if self.batch_wait_s:
            time.sleep(self.batch_wait_s)  # let concurrent arrivals join this batch
        with self._cond:
            batch: list[GenerationRequest] = []
            rows = 0
            key = None
            for req in list(self._pending):
                if req.cancelled.is_set():
                    self._pending.remove(req)
                    continue
                if key is None:
                    key = req.batch_key()
                if req.batch_key() != key or rows + req.rows > self.max_batch_size:
                    continue
                batch.append(req)
                rows += req.rows
                self._pending.remove(req)
                self._running.add(req.id)
            metrics.SERVER_QUEUED.labels(self.model_name).set(len(self._pending))
            metrics.SERVER_RUNNING.labels(self.model_name).set(len(self._running))
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
                for req in batch:
                    req.emit({"type": "error", "status": 500, "message": f"generation failed: {type(exc).__name__}"})
            finally:
                with self._cond:
                    for req in batch:
                        self._release(req)
                    self._cond.notify_all()
                for req in batch:
                    req.emit({"type": "done"})

    def _observe_last(self, rows: list[_Row]) -> None:
        """``generate`` returns without feeding the last step's tokens back through the model, so the
        guard's hooks never saw them: show them to its runtime, with the neuron scores of the pass that
        produced them, as its forward pre-hook would have."""
        reports = self.guard.reports
        tokens = {
            i: row.tokens[-1] for i, row in enumerate(rows)
            if row.tokens and i < len(reports) and reports[i] is not None and reports[i].tokens_observed < len(row.tokens)
        }
        if not tokens:
            return
        try:
            runtime = self.guard.runtime
            runtime.observe(tokens, runtime.neuron_scores())
        except Exception:  # the guard fails open: a report one token short beats a failed request
            log.exception("repguard: observing the final tokens failed")

    def _generate(self, batch: list[GenerationRequest]) -> None:
        rows = [
            _Row(req, p_i * req.n + j, prompt)
            for req in batch for p_i, prompt in enumerate(req.prompts) for j in range(req.n)
        ]
        enc = self.tokenizer.pad({"input_ids": [r.prompt for r in rows]}, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        input_ids, attention = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        first = batch[0]
        self.guard.configure_rows([r.request.guard_config or self.default_guard for r in rows])
        tracker = _BatchTracker(rows, self.tokenizer, self.eos, lambda: self.guard.reports, self._observe_last)
        sampling: dict[str, Any] = (
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            if first.greedy
            else {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p, "top_k": 0}
        )
        if first.seed is not None:
            torch.manual_seed(first.seed)
        metrics.SERVER_BATCH_ROWS.labels(self.model_name).observe(len(rows))
        self.batches += 1
        try:
            with torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids, attention_mask=attention,
                    max_new_tokens=max(r.request.max_tokens for r in rows),
                    stopping_criteria=StoppingCriteriaList([tracker]), streamer=tracker,
                    pad_token_id=self.pad_id, eos_token_id=sorted(self.eos) or None, **sampling,
                )
        finally:
            self.guard.configure_rows(None)
            self.guard.flush()  # record this batch's reports now, not when the next batch starts
