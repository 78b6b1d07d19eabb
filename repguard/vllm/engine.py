"""``EngineGuard``: the worker-side guard of one vLLM engine (one per worker process / TP rank).

It drives the core ``GuardRuntime`` exactly like the transformers adapter does, with vLLM's batch
layout instead of a padded tensor:

* rows are the persistent batch's indexes (``input_batch.req_ids[i]``, the logits processor's rows);
  one extra *trash* row absorbs every token that is not some request's newest token;
* a forward pre-hook on the outer model (outside the compiled region) fills ``token_row``: for each
  flat token position, the row it is the newest token of, else the trash row; padding rows stay trash;
* each mapped layer's fused act module (input [gate | up], output act(gate) * up) gets a hook that does
  only tensor math on these fixed buffers, so it is safe to trace with torch.compile / CUDA graphs:
  it records act(gate) of the mapped neurons (the calibration quantity, ../shared/PAPER.md §1.4) into
  the runtime's monitor buffer, and for switched-off rows writes 0 (or pre-onset mean * up) into the
  output column, which equals switching act(gate) off in transformers;
* the logits processor (``logits.py``) forwards batch updates here: it opens/closes/moves rows and
  feeds each guarded row its newest token once per step, before the forward (like the HF pre-hook).

A row that never leaves MONITOR is rewritten with its own values only, so its tokens are unchanged.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .. import metrics
from ..archs import ArchSpec, arch_for, resolve
from ..config import GuardConfig
from ..errors import UnsupportedModelError
from ..neuron_map import Fingerprint, NeuronMap
from ..request_guard import RESUBMISSION_KEY
from ..runtime import GuardRuntime, LayerPlan, model_fingerprint as _fingerprint, switch_off
from . import compat

log = logging.getLogger("repguard")

REPORTS_KEPT = 4096  # finished requests whose reports wait to be fetched, per worker


# -- tensor parallel ------------------------------------------------------------------------------------
@dataclass
class RankPlan:
    """One layer's neurons as held by one TP rank: local column indexes and their monitor slots."""

    layer: int
    local: torch.Tensor  # long [n] columns of this rank's act slice
    slots: torch.Tensor  # long [n] columns of the runtime's [rows, K] buffers
    pre_onset: torch.Tensor  # [n]


def slice_plans(plans: dict[int, LayerPlan], d_ff: int, rank: int, world: int) -> dict[int, RankPlan]:
    """The part of every layer plan that rank ``rank`` of ``world`` holds.

    vLLM shards the MLP columns evenly: rank r holds neurons [r*d/world, (r+1)*d/world) of both the
    gate and the up projection. Layers with no neuron on this rank are left out.
    """
    if d_ff % world:
        raise UnsupportedModelError(f"intermediate size {d_ff} is not divisible by tensor parallel size {world}")
    width = d_ff // world
    lo, hi = rank * width, (rank + 1) * width
    out: dict[int, RankPlan] = {}
    for layer, plan in plans.items():
        mask = (plan.neurons >= lo) & (plan.neurons < hi)
        if not bool(mask.any()):
            continue
        slots = torch.arange(plan.slots.start, plan.slots.stop, device=plan.neurons.device)[mask]
        out[layer] = RankPlan(layer, plan.neurons[mask] - lo, slots, plan.pre_onset[mask])
    return out


# -- per-request bookkeeping ----------------------------------------------------------------------------
@dataclass
class RowState:
    config: GuardConfig
    outputs: list  # live reference to the request's output token ids (vLLM appends in place)
    eos: int | None
    seen: int = 0
    req_id: str | None = None
    done: bool = False
    report: object = None
    extra: dict = field(default_factory=dict)
    counted_elsewhere: bool = False  # a request-level guard's re-decode: that guard counts the request


def _gate_fn(name: str):
    if name == "silu":
        return torch.nn.functional.silu
    if name == "gelu_tanh":
        return lambda x: torch.nn.functional.gelu(x, approximate="tanh")
    raise UnsupportedModelError(f"unknown gate activation {name!r}")


def vllm_arch(vllm_config) -> ArchSpec:
    spec = arch_for(compat.text_config(vllm_config).model_type)
    if spec.vllm_act is None:
        raise UnsupportedModelError(f"{spec.family}: repguard has no vLLM hook point for this architecture yet")
    return spec


def model_fingerprint(vllm_config, model) -> Fingerprint:
    """The served model's identity (``repguard.runtime.model_fingerprint``, as for transformers)."""
    spec = vllm_arch(vllm_config)
    try:
        resolve(model, spec.vllm_layers)
    except (AttributeError, IndexError, TypeError) as exc:  # e.g. a vision-language wrapper around the text model
        raise UnsupportedModelError(f"{type(model).__name__}: expected its layers at {spec.vllm_layers} ({exc})") from None
    return _fingerprint(spec, compat.text_config(vllm_config), model)


class EngineGuard:
    """Hooks plus per-row state for one vLLM model runner."""

    def __init__(self, runner, neuron_map: NeuronMap, config: GuardConfig, model_name: str) -> None:
        vllm_config = runner.vllm_config
        self.runner = runner
        self.model = runner.get_model()
        self.model_name = model_name
        self.neuron_map = neuron_map
        self.config = config
        self.spec = vllm_arch(vllm_config)
        text = compat.text_config(vllm_config)
        self.num_layers, self.d_ff = self.spec.num_layers(text), self.spec.intermediate_size(text)
        self.compiled = compat.is_compiled(vllm_config)
        self.rank, self.world = compat.tp_rank_world()
        self.max_rows = int(runner.max_num_reqs)
        self.trash = self.max_rows
        param = next(self.model.parameters())
        self.device = param.device
        self.runtime = GuardRuntime(neuron_map, config, max_rows=self.max_rows + 1, device=self.device, dtype=param.dtype)
        self.plans = slice_plans(self.runtime.neurons.plans, self.d_ff, self.rank, self.world)
        self.local_width = self.d_ff // self.world
        max_tokens = int(getattr(runner, "max_num_tokens", 0) or vllm_config.scheduler_config.max_num_batched_tokens)
        self.token_row = torch.full((max_tokens + 1,), self.trash, dtype=torch.long, device=self.device)
        # Flat offset of each token's row in a [tokens, local_width] act output (for ``switch_off``).
        self.token_base = torch.arange(max_tokens + 1, dtype=torch.long, device=self.device) * self.local_width
        self._gate = _gate_fn(self.spec.vllm_gate_act)
        self.rows: dict[int, RowState] = {}
        self.reports: OrderedDict[str, dict] = OrderedDict()  # finished requests
        self.live: dict[str, RowState] = {}  # running guarded requests, by request id
        self._taken: set[str] = set()  # live reports already handed out (bounded by running requests)
        self.parked: dict[str, tuple] = {}  # requests vLLM took out of the batch but did not finish
        self.resumed = 0  # parked requests that came back (after preemption) with their state
        self.stop_signals: list[str] = []  # requests ended by a forced EOS in this step (see plugin)
        self._handles: list = []
        self._mapped = False  # rows already mapped for the forward in progress (by the runner wrapper)
        self._last_rows: torch.Tensor | None = None
        self._owner_batch = None
        self._owner = None
        self.broken = False
        # Tensor parallelism: a failure on this rank alone, not yet told to the others (``_observe``).
        self._fault = False
        # Rows that hold a guarded request, from vLLM's batch updates alone: the same on every rank whatever
        # failed on one, so every rank joins the same per-step all-reduces (``_observe``).
        self._tp_rows: set[int] = set()
        self._tp_buf = (torch.zeros(self.runtime.acts.numel() + 1, dtype=self.runtime.acts.dtype, device=self.device)
                        if self.world > 1 else None)
        self.errors = 0
        self._row_fault_logged = False  # a request whose guard could not open, logged once (``_row_failed``)
        self.steps = 0
        self.overhead_seconds = 0.0

    # -- install / remove ------------------------------------------------------------------------------
    def install(self) -> "EngineGuard":
        try:
            layers = resolve(self.model, self.spec.vllm_layers)
            self._handles.append(self.model.register_forward_pre_hook(self._pre_forward))
            self._wrap_runner_forward()
            for layer, plan in self.plans.items():
                act = resolve(layers[layer], self.spec.vllm_act)
                self._handles.append(act.register_forward_hook(self._make_act_hook(plan)))
        except (AttributeError, IndexError, TypeError) as exc:
            self.remove()
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: expected {self.spec.vllm_layers}[i].{self.spec.vllm_act} ({exc})"
            ) from None
        except BaseException:
            self.remove()  # no hook or wrapper is left behind by an install that failed
            raise
        metrics.set_info(self.model_name, self.neuron_map.meta.model_name)
        log.info(
            "repguard: guarding %s with %d neurons in %d layers (rank %d/%d, %s)",
            self.model_name, len(self.neuron_map), len(self.plans), self.rank, self.world,
            "compiled" if self.compiled else "eager",
        )
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        # A compiled graph may still hold the layer hook (it reads these buffers): switch every row's neurons on.
        self.runtime.switch_all_on()
        if "_model_forward" in getattr(self.runner, "__dict__", {}):
            del self.runner.__dict__["_model_forward"]

    def _wrap_runner_forward(self) -> None:
        """Map rows in the runner's ``_model_forward`` (called eagerly every step, inside the forward
        context), not only in the model's forward pre-hook: a full CUDA graph replay runs the captured
        kernels without calling the model, so a pre-hook on it would not run (and the row map would stay
        as it was at capture time). The pre-hook still covers direct model calls (warm-up, capture)."""
        forward = getattr(self.runner, "_model_forward", None)
        if forward is None or "_model_forward" in getattr(self.runner, "__dict__", {}):
            return
        guard = self

        def _model_forward(*args, **kwargs):
            guard._map_step()
            guard._mapped = True
            try:
                return forward(*args, **kwargs)
            finally:
                guard._mapped = False

        self.runner._model_forward = _model_forward

    # -- forward side (hooks) --------------------------------------------------------------------------
    def _pre_forward(self, module, args):
        """Model forward pre-hook: maps rows unless the runner's forward already did for this call."""
        if not self._mapped:
            self._map_step()
        return None

    def _map_step(self) -> None:
        """Runs eagerly before every forward (outside any compiled region or CUDA graph)."""
        if self.broken:  # failed open: every row's neurons are on, nothing to map
            return
        try:
            num_reqs = int(self.runner.input_batch.num_reqs)
            self.map_tokens(compat.query_start_loc(num_reqs, self.runner))
        except Exception as exc:
            self._fail("observe", exc)

    def map_tokens(self, qsl: list[int] | None) -> None:
        """Point each request's newest token at its row; every other position at the trash row.
        ``qsl`` is ``query_start_loc`` (None during warm-up: all trash)."""
        if self._last_rows is not None:
            self.token_row.index_fill_(0, self._last_rows, self.trash)
            self._last_rows = None
        if not qsl or len(qsl) < 2:
            return
        starts = torch.tensor(qsl[:-1], dtype=torch.long)
        last = torch.tensor(qsl[1:], dtype=torch.long) - 1
        keep = last >= starts  # a request with no token in this forward has no newest token
        pin = self.device.type == "cuda"
        rows = torch.arange(len(starts), dtype=torch.long)[keep]
        last = last[keep]
        if pin:  # pinned host memory: the copies below do not block the host
            rows, last = rows.pin_memory(), last.pin_memory()
        rows = rows.to(self.device, non_blocking=True)
        last = last.to(self.device, non_blocking=True)
        self.token_row.index_copy_(0, last, rows)
        self._last_rows = last

    def _make_act_hook(self, plan: RankPlan):
        rt = self.runtime
        gate_fn = self._gate
        local, slots = plan.local, plan.slots
        up_cols = plan.local + self.local_width
        pre_onset = plan.pre_onset
        compiled = self.compiled
        count = int(slots.numel())
        host_slots = slots.tolist()  # once, at install: the slots' device may be an accelerator
        first_slot = host_slots[0] if count and host_slots == list(range(host_slots[0], host_slots[0] + count)) else None

        def work(module, inputs, output):
            # Eager: skip the work while no request is guarded. Compiled: always the same tensor math
            # (Python conditions would be frozen at trace time).
            if not compiled and (not self.rows or self.broken):
                return None
            x = inputs[0]
            tokens = output.shape[0]
            row = self.token_row[:tokens]
            gate = x.index_select(1, local)  # [T, n] pre-activation of the mapped neurons
            if first_slot is not None and not compiled:  # eager fast path: slots are one block
                rt.acts[:, first_slot : first_slot + count].index_copy_(0, row, gate_fn(gate).float())
            else:
                rt.acts[row.unsqueeze(1), slots.unsqueeze(0)] = gate_fn(gate).float()
            if not compiled and not rt.any_off:
                return None
            off = rt.off.index_select(0, row).index_select(1, slots)  # [T, n]; trash row is never off
            use_mean = rt.use_mean.index_select(0, row)  # [T, 1]
            up = x.index_select(1, up_cols)
            fill = torch.where(use_mean, pre_onset.to(x.dtype) * up, torch.zeros_like(up))
            index = self.token_base[:tokens].unsqueeze(1) + local.unsqueeze(0)  # [T, n] flat positions
            switch_off(output, index, fill.to(output.dtype), off, current=output.index_select(1, local))
            return None

        if compiled:  # traced once into the graph: a fault shows at capture, where the install fails open
            return work

        def hook(module, inputs, output):
            try:
                return work(module, inputs, output)
            except Exception as exc:  # never the engine's forward: this step's rows go on with their neurons on
                self._fail("deactivate", exc)
                return None

        return hook

    # -- request side (called by the logits processor, once per step, before the forward) -------------
    def owns(self, processor) -> bool:
        """Only one logits-processor instance per input batch drives the guard (it may be loaded both
        from the entry point and from ``--logits-processors``): the first of the caller's class."""
        batch = self.runner.input_batch
        if batch is not self._owner_batch:
            self._owner_batch = batch
            procs = getattr(getattr(batch, "logitsprocs", None), "all", ())
            self._owner = next((p for p in procs if isinstance(p, type(processor))), processor)
        return self._owner is processor

    def update(self, batch_update, configs: dict[int, GuardConfig]) -> None:
        """Apply vLLM's removed/added/moved lists, then feed every guarded row its newest token."""
        t0 = time.perf_counter()
        if self.world > 1 and batch_update is not None and not self.broken:
            try:
                self._track_tp_rows(batch_update, configs)
            except Exception as exc:
                self._fail("observe", exc)
        try:
            if batch_update is not None:
                for index in batch_update.removed:
                    self._close(index)
                for index, params, prompt_ids, output_ids in batch_update.added:
                    self._close(index)
                    cfg = configs.get(index)
                    if cfg is not None:
                        try:
                            self._open(index, cfg, params, prompt_ids, output_ids)
                        except Exception as exc:  # this request's own setting: it alone runs unguarded
                            if self.world > 1:  # ranks must hold the same rows: every rank stops together
                                raise
                            self._row_failed(index, exc)
                for a, b, direction in batch_update.moved:
                    self._move(a, b, swap=direction == compat.SWAP)
                if any(state.req_id is None for state in self.rows.values()):
                    req_ids = self.runner.input_batch.req_ids
                    for index, state in self.rows.items():
                        if state.req_id is None and index < len(req_ids):
                            state.req_id = req_ids[index]
                            if state.req_id in self.parked:
                                state = self._unpark(index, state)
                            self.live[state.req_id] = state
                if self.parked:
                    self._finish_parked()
        except Exception as exc:
            self._fail("observe", exc)
        if not self.broken and (self.rows or self._tp_rows):
            try:
                self._observe()
            except Exception as exc:
                self._fail("observe", exc)
        self.overhead_seconds += time.perf_counter() - t0

    def _track_tp_rows(self, batch_update, configs: dict[int, GuardConfig]) -> None:
        rows = self._tp_rows
        for index in batch_update.removed:
            rows.discard(index)
        for index, *_ in batch_update.added:
            (rows.add if index in configs else rows.discard)(index)
        for a, b, direction in batch_update.moved:
            in_a, in_b = a in rows, b in rows
            for index, guarded in ((b, in_a), (a, in_b and direction == compat.SWAP)):
                (rows.add if guarded else rows.discard)(index)

    def _open(self, index: int, cfg: GuardConfig, params, prompt_ids, output_ids) -> None:
        prompt = list(prompt_ids or []) if cfg.watch_prompt else None
        seq = self.runtime.open(index, cfg, prompt)
        if self.broken:  # the guard failed open earlier: this request runs unguarded, and its report says so
            seq.report.errors += 1
        self.rows[index] = RowState(cfg, output_ids, compat.eos_token_id(params, self.runner.vllm_config), report=seq.report,
                                    counted_elsewhere=bool(compat.extra_args(params).get(RESUBMISSION_KEY)))

    def _finish_parked(self) -> None:
        """Parked requests that vLLM finished (e.g. aborted) while out of the batch."""
        requests = getattr(self.runner, "requests", None) or {}
        for req_id in [r for r in self.parked if r not in requests]:
            state, seq, *_ = self.parked.pop(req_id)
            if seq is not None:
                self._finish(state, seq.report)

    def _unpark(self, index: int, fresh: RowState) -> RowState:
        rt = self.runtime
        state, seq, chosen, row_k, use_mean, fill = self.parked.pop(fresh.req_id)
        self.resumed += 1
        state.outputs = fresh.outputs
        rt.seqs[index], rt.row_k[index] = seq, row_k
        if chosen is not None:
            rt._chosen[index] = chosen
        rt.use_mean[index], rt.fill[index] = use_mean, fill
        rt._refresh(index)  # the switched-off mask follows from the sequence's level and chosen neurons
        rt._track(index)
        self.rows[index] = state
        return state

    @staticmethod
    def _report_dict(index, state: "RowState", report) -> dict:
        data = report.to_dict()
        data["stopped"] = bool(state.done)
        data["config"] = state.config.to_dict()
        return data

    def _close(self, index: int) -> None:
        state = self.rows.pop(index, None)
        if state is None:
            return
        rt = self.runtime
        requests = getattr(self.runner, "requests", None)
        if state.req_id is not None and requests is not None and state.req_id in requests:
            # Not finished: vLLM left it out of this step (preempted or not scheduled) and will add it
            # back later; keep its guard state.
            # Per-row state only (``rt.watch`` is the monitor's per-neuron weights, shared by all rows).
            self.parked[state.req_id] = (state, rt.seqs[index], rt._chosen.get(index), rt.row_k[index],
                                         rt.use_mean[index].clone(), rt.fill[index].clone())
            rt.close(index)
            return
        report = rt.close(index)
        if report is not None:
            self._finish(state, report)

    def take_stop_signals(self) -> list[str]:
        """Ids (vLLM's internal ones) of the requests whose EOS ``apply`` forced since the last call."""
        out, self.stop_signals = self.stop_signals, []
        return out

    def _finish(self, state: RowState, report) -> None:
        if not state.counted_elsewhere:
            metrics.record_report(self.model_name, report)
        if state.req_id is None:
            return
        self.live.pop(state.req_id, None)
        if state.req_id in self._taken:  # already handed out while running
            self._taken.discard(state.req_id)
            return
        self.reports[state.req_id] = self._report_dict(None, state, report)
        while len(self.reports) > REPORTS_KEPT:
            self.reports.popitem(last=False)

    def _move(self, a: int, b: int, swap: bool) -> None:
        rt = self.runtime
        if not swap and b in self.rows:
            # vLLM's condense fills a slot its request left with a one-way move and takes that slot off the
            # removed list: the request that was in b ends (or is parked) here, before a overwrites it.
            self._close(b)
        for name in ("off", "use_mean", "fill", "acts"):
            buf = getattr(rt, name)
            if swap:
                buf[[a, b]] = buf[[b, a]]
            else:
                buf[b] = buf[a]
        if swap:
            rt.seqs[a], rt.seqs[b] = rt.seqs[b], rt.seqs[a]
            rt.row_k[a], rt.row_k[b] = rt.row_k[b], rt.row_k[a]
            ca, cb = rt._chosen.pop(a, None), rt._chosen.pop(b, None)
            if ca is not None:
                rt._chosen[b] = ca
            if cb is not None:
                rt._chosen[a] = cb
            sa, sb = self.rows.pop(a, None), self.rows.pop(b, None)
            if sa is not None:
                self.rows[b] = sa
            if sb is not None:
                self.rows[a] = sb
        else:
            rt.seqs[b], rt.seqs[a] = rt.seqs[a], None
            rt.row_k[b] = rt.row_k[a]
            chosen = rt._chosen.pop(a, None)
            if chosen is not None:
                rt._chosen[b] = chosen
            rt.off[a] = False
            state = self.rows.pop(a, None)
            if state is not None:
                self.rows[b] = state
            else:
                self.rows.pop(b, None)
        rt.recount_off()
        rt._track(a)
        rt._track(b)

    def _observe(self) -> None:
        """Feed every guarded row its newest token, with the neuron scores of the last forward.

        Under tensor parallelism each rank holds a slice of the mapped neurons, and the ranks add up their
        monitor buffers in one all-reduce. Every rank joins it in every step where the batch holds a guarded
        request, whatever failed on that rank: a rank that left it out would stall the others' collective, and
        the engine with it. A failure on any rank rides along in that all-reduce, so every rank goes on
        unguarded from the same step (a failure before it, in this step's batch update, before any rank has
        changed this step's logits)."""
        rt = self.runtime
        tokens: dict[int, int] = {}
        earlier: list[tuple[int, int]] = []
        if not self._fault:
            try:
                tokens, earlier = self._new_tokens()
            except Exception as exc:
                self._fail("observe", exc)
        if self.world > 1:
            if not self._tp_rows:
                return
            scores = self._tp_scores()
            if scores is None:
                return
        elif not tokens:
            return
        else:
            scores = rt.neuron_scores().tolist()
        if not tokens:
            return
        for index, token in earlier:  # more than one new token in a step (not expected in V1)
            rt.observe({index: token}, None)
        rt.observe(tokens, scores)
        self.steps += 1

    def _new_tokens(self) -> tuple[dict[int, int], list[tuple[int, int]]]:
        """({row: newest token}, [(row, older new token)]) of the guarded rows, from vLLM's output lists."""
        tokens: dict[int, int] = {}
        earlier: list[tuple[int, int]] = []
        for index, state in self.rows.items():
            n = len(state.outputs)
            if n <= state.seen or state.done:
                continue
            new = state.outputs[state.seen : n]
            if new[-1] < 0:  # placeholders (-1) of tokens not sampled yet: read committed tokens only
                new = new[: new.index(-1)] if -1 in new else []
                if not new:
                    continue
            state.seen += len(new)
            earlier.extend((index, t) for t in new[:-1])
            tokens[index] = int(new[-1])
        return tokens, earlier

    def _tp_scores(self) -> list[float] | None:
        """The rows' neuron scores from every rank's monitor buffer (each rank wrote only its own slots; the
        others are zero), summed in one all-reduce that also carries whether any rank failed: then every rank
        goes on unguarded (None). Read to the host once, as on one rank."""
        rt = self.runtime
        buf = self._tp_buf
        try:
            buf[:-1].copy_(rt.acts.reshape(-1))
            buf[-1] = 1.0 if self._fault else 0.0
        except Exception as exc:  # this rank still joins, with its failure in the flag
            self._fail("observe", exc)
            buf.zero_()
            buf[-1] = 1.0
        total = compat.tp_all_reduce(buf)
        acts = rt.acts
        try:
            rt.acts = total[:-1].view_as(acts)
            values = torch.cat([rt.neuron_scores().to(total.dtype), total[-1:]]).tolist()
        finally:
            rt.acts = acts
        if values[-1] > 0:
            self._fail_with_peers()
            return None
        return values[:-1]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Escalation penalties and forced EOS for the rows whose policy asks for them."""
        if not self.rows or self.broken:
            return logits
        rt = self.runtime
        if not rt.steering:  # no row escalates or stops (monitor mode, quiet rows): nothing to do
            return logits
        t0 = time.perf_counter()
        try:
            rows = [index for index in sorted(rt.steering) if index in self.rows and not self.rows[index].done]
            for index in rt.steer_logits(logits, rows, lambda index: self.rows[index].eos):
                state = self.rows[index]
                state.done = True
                if state.req_id is not None:
                    self.stop_signals.append(state.req_id)
                    if len(self.stop_signals) > REPORTS_KEPT:  # nobody collects them (no tagging runner)
                        del self.stop_signals[: -REPORTS_KEPT]
        except Exception as exc:
            self._fail("penalty", exc)
        self.overhead_seconds += time.perf_counter() - t0
        return logits

    # -- reports ---------------------------------------------------------------------------------------
    def take_reports(self, request_ids=None, pop: bool = True) -> dict[str, dict]:
        """Reports of finished guarded requests, keyed by the caller's request id; with ``n > 1``, one per
        completion, keyed ``<index>_<id>`` (vLLM's names), and asking for ``<id>`` gives them all."""
        wanted = None if request_ids is None else {str(r) for r in request_ids}

        def chosen(internal: str) -> bool:
            if wanted is None or internal in wanted:
                return True
            external = compat.external_request_id(internal)
            return external in wanted or compat.parent_request_id(external) in wanted

        out = {}
        for internal in list(self.reports):
            if chosen(internal):
                out[compat.external_request_id(internal)] = self.reports.pop(internal) if pop else self.reports[internal]
        # Requests that finished after the engine's last step are still open here (vLLM removes them
        # from the batch at the next step): hand out their live report.
        for internal, state in list(self.live.items()):
            if chosen(internal):
                out[compat.external_request_id(internal)] = self._report_dict(None, state, state.report)
                if pop:
                    self._taken.add(internal)
                    del self.live[internal]
        return out

    # -- failure: fail open ----------------------------------------------------------------------------
    def _row_failed(self, index: int, exc: BaseException) -> None:
        """A request whose guard could not be opened (its own settings): it runs unguarded, the others stay
        guarded. Counted; logged once per engine."""
        self.rows.pop(index, None)
        try:
            self.runtime.close(index)
        except Exception:  # pragma: no cover - nothing was opened
            pass
        metrics.record_error(self.model_name, "observe")
        if not self._row_fault_logged:
            self._row_fault_logged = True
            log.error("repguard: the neuron step could not start for a request (%s: %s); it runs unguarded, the "
                      "other requests stay guarded (logged once)", type(exc).__name__, exc)

    def _fail(self, where: str, exc: BaseException) -> None:
        """Fail open: logged and counted once (a fault that repeats every step is one fault)."""
        if self.broken:
            return
        self.errors += 1
        if self.world > 1:
            # This rank alone: count it and say so here, and tell the other ranks in the next all-reduce; every
            # rank stops together there (``_observe``). Stopping here alone would leave the others waiting in it.
            first, self._fault = not self._fault, True
            if first:
                metrics.record_error(self.model_name, where)
                log.exception("repguard: guard failed in %s on tensor-parallel rank %d of %d; every rank goes on "
                              "unguarded from its next step", where, self.rank, self.world)
            return
        self.broken = True
        self.runtime.fail_open(self.model_name, where, [seq.report for seq in self.runtime.seqs if seq is not None],
                               True, "requests continue unguarded")

    def _fail_with_peers(self) -> None:
        """A rank's failure, told in the all-reduce: every rank goes on unguarded from this step."""
        self.broken = True
        self.runtime.fail_open(self.model_name, "tensor_parallel", [seq.report for seq in self.runtime.seqs if seq is not None],
                               True, f"the guard failed on a tensor-parallel rank; rank {self.rank} of {self.world} "
                               "goes on unguarded with the others", counted=True)
