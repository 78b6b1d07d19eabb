"""``GuardRuntime``: the framework-neutral part of a live guard, shared by the HF and vLLM adapters.

It owns the per-sequence ``SequenceGuard`` objects and the tensors that the adapters' hooks read:
which neurons to watch and switch off (``LayerPlan``), per-row masks, the monitor buffer, and the
per-row penalty/stop requests. Hooks do tensor math on these buffers only (graph-safe); all Python
decisions happen once per token in ``observe``.

One place each, for every adapter (transformers, vLLM, calibration):

* ``switch_off``: the only function that writes neurons;
* ``GuardRuntime.steer_logits``: escalation penalties and forced EOS;
* ``GuardRuntime.fail_open``: what a failure inside a hook does;
* ``model_fingerprint``: a model's identity for the map check;
* ``token_id_list``: EOS / pad ids read from a model's configs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from . import metrics
from .archs import ArchSpec, resolve
from .config import GuardConfig
from .neuron_map import Fingerprint, NeuronMap
from .policy import Level, SequenceGuard, SequenceReport

log = logging.getLogger("repguard")


@dataclass
class LayerPlan:
    """What one layer's hook touches: neuron indexes, their slots in the row buffers, fill values."""

    layer: int
    neurons: torch.Tensor  # long [n]
    slots: slice  # columns of the [rows, K] buffers that belong to this layer
    zero: torch.Tensor  # [n] zeros
    pre_onset: torch.Tensor  # [n] pre-onset means
    monitored: bool = True  # holds one of the neurons the monitor scores
    min_rank: int = 0  # best rank among its neurons: the layer is written for rows whose k exceeds it


class NeuronSet:
    """The map's stored neurons, grouped by layer, with each neuron's global rank."""

    def __init__(self, neuron_map: NeuronMap | None, device=None, dtype=torch.float32, monitor_k: int | None = None) -> None:
        self.map = neuron_map
        self.plans: dict[int, LayerPlan] = {}
        if neuron_map is None:  # token-level guard: no neuron to watch or switch off
            empty = torch.zeros(0, device=device)
            self.num_slots = 0
            self.rank = self.layer_of_slot = self.neuron_of_slot = empty.long()
            self.mean_before, self.std_before, self.pre_onset = empty.float(), empty.float() + 1, empty.to(dtype)
            return
        n = len(neuron_map)
        order = sorted(range(n), key=lambda i: (int(neuron_map.layer[i]), i))
        idx = torch.tensor(order, dtype=torch.long)
        self.num_slots = n
        self.rank = idx.to(device)  # rank of the neuron in each slot
        self.layer_of_slot = neuron_map.layer[idx].long().to(device)
        self.mean_before = neuron_map.mean_before[idx].to(device, torch.float32)
        std = neuron_map.std_before[idx].to(device, torch.float32)
        self.std_before = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.neuron_of_slot = neuron_map.neuron[idx].long().to(device)
        self.pre_onset = neuron_map.mean_before[idx].to(device, dtype)
        start = 0
        layers = neuron_map.layer[idx].tolist()
        for layer in sorted(set(layers)):
            count = layers.count(layer)
            sl = slice(start, start + count)
            neurons = neuron_map.neuron[idx[sl]].long().to(device)
            means = neuron_map.mean_before[idx[sl]].to(device, dtype)
            monitored = monitor_k is None or bool((idx[sl] < monitor_k).any())
            self.plans[int(layer)] = LayerPlan(int(layer), neurons, sl, torch.zeros_like(means), means, monitored,
                                               int(idx[sl].min()))
            start += count


class GuardRuntime:
    """Per-row guard state for one engine/model. Rows are batch slots; adapters map them to sequences."""

    def __init__(
        self,
        neuron_map: NeuronMap | None,
        config: GuardConfig | None = None,
        max_rows: int = 1,
        device=None,
        dtype=torch.float32,
        on_event: Callable[[str, dict], None] | None = None,
        monitor_neurons: int = 64,
    ) -> None:
        self.config = config or GuardConfig()
        # Without a map (None) the guard is token-level only: detection, penalties and stop.
        self.default_k = 0 if neuron_map is None else (neuron_map.meta.num_selected or len(neuron_map))
        # The monitor scores the best-ranked neurons only: layers without one are left alone until a
        # row needs deactivation, which keeps the per-token cost of a quiet guard small.
        self.monitor_k = max(1, min(monitor_neurons, self.default_k))
        self.neurons = NeuronSet(neuron_map, device, dtype, self.monitor_k)
        watch = (self.neurons.rank < self.monitor_k).float()
        self.watch = watch / watch.sum().clamp(min=1.0)
        self.device, self.dtype = device, dtype
        self.width = neuron_map.meta.intermediate_size if neuron_map is not None else 0
        self.on_event = on_event
        self.seqs: list[SequenceGuard | None] = []
        self.steering: set[int] = set()  # rows whose next logits get a penalty or a forced EOS
        # A model spread over devices (transformers' device_map): layer -> the device its activations are on.
        self.layer_devices: dict[int, torch.device] | None = None
        self._alloc(max_rows)

    # -- buffers ---------------------------------------------------------------------------------------
    def _alloc(self, rows: int) -> None:
        k = self.neurons.num_slots
        dev = self.device
        self.rows = rows
        self.acts = torch.zeros(rows, k, device=dev, dtype=torch.float32)  # monitor buffer, written by hooks
        self.off = torch.zeros(rows, k, device=dev, dtype=torch.bool)  # which slots are switched off, per row
        self.use_mean = torch.zeros(rows, 1, device=dev, dtype=torch.bool)
        self.fill = torch.zeros(rows, k, device=dev, dtype=self.dtype)  # value written into switched-off slots
        self.any_off = False  # some row is switched off (read by hooks; kept from Python state, never a device read)
        self._off_rows: set[int] = set()
        self._flat_index: torch.Tensor | None = None
        # Per layer, for the current step: flat positions ([B, n] and flattened), the layer's gather buffer
        # ([B, n], model dtype, contiguous: the gather writes into it), and views of the off / fill buffers.
        self._step: dict[int, tuple] = {}
        self._gathered: list[torch.Tensor] = []  # every layer's gather buffer, in slot order
        self._stage: torch.Tensor | None = None  # [rows, K] in the model dtype when that is not float32
        # Spread over devices: per device, copies of ``off`` / ``fill`` that its layers' hooks read, refreshed
        # when ``_masks_version`` moves (a row switched on or off); runs of consecutive layers on one device.
        self._mirrors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks_version = self._mirrored_version = 0
        self._runs: list[tuple[int, int, list[torch.Tensor]]] | None = None
        self._step_key = None
        self.seqs = [None] * rows
        self.row_k = [0] * rows
        self._chosen: dict[int, torch.Tensor] = {}
        self.steering = set()

    def ensure_rows(self, rows: int) -> None:
        if rows > self.rows:
            old, chosen, off, use_mean, fill = self.seqs, self._chosen, self.off, self.use_mean, self.fill
            n = len(old)
            self._alloc(rows)
            self.seqs[:n] = old
            self._chosen.update(chosen)
            self.off[:n], self.use_mean[:n], self.fill[:n] = off, use_mean, fill
            self.recount_off()

    # -- which layers a hook must sit on ----------------------------------------------------------------
    def layers_needed(self, configs: Iterable[GuardConfig]) -> set[int]:
        """Layers holding a neuron that rows with these settings will read (monitor) or write (deactivate).

        The monitor reads the best-ranked ``monitor_k`` neurons of every enabled row; deactivation writes a
        row's chosen neurons (rank < k, restricted to ``layers``). Other stored neurons are never touched, so
        their layers need no hook at all.
        """
        needed: set[int] = set()
        for cfg in configs:
            if not cfg.enabled:
                continue
            needed.update(layer for layer, plan in self.neurons.plans.items() if plan.monitored)
            if cfg.deactivate:
                k = min(cfg.k or self.default_k, self.neurons.num_slots)
                allowed = None if cfg.layers is None else set(cfg.layers)
                needed.update(layer for layer, plan in self.neurons.plans.items()
                              if plan.min_rank < k and (allowed is None or layer in allowed))
        return needed

    # -- sequences ---------------------------------------------------------------------------------------
    def open(
        self, row: int, config: GuardConfig | None = None, prompt_ids: Iterable[int] | None = None,
        history: Iterable[int] | None = None,
    ) -> SequenceGuard:
        cfg = config or self.config
        seq = SequenceGuard(cfg, prompt_ids, history=history)
        self.seqs[row] = seq
        k = min(cfg.k or self.default_k, self.neurons.num_slots)
        self.row_k[row] = k
        ranks = self.neurons.rank
        chosen = ranks < k
        if cfg.layers is not None:
            chosen &= torch.isin(self.neurons.layer_of_slot, torch.tensor(cfg.layers, device=ranks.device))
        self._chosen[row] = chosen
        self.use_mean[row] = cfg.deactivate_value == "pre_onset_mean"
        self.fill[row] = self.neurons.pre_onset if cfg.deactivate_value == "pre_onset_mean" else 0
        self._refresh(row)
        self._track(row)
        return seq

    def close(self, row: int) -> SequenceReport | None:
        seq = self.seqs[row]
        self.seqs[row] = None
        self.off[row] = False
        self._masks_version += 1
        self._off_rows.discard(row)
        self.any_off = bool(self._off_rows)
        self.steering.discard(row)
        return seq.report if seq is not None else None

    def reset(self) -> None:
        self.seqs = [None] * self.rows
        self.off.zero_()
        self._masks_version += 1
        self._off_rows.clear()
        self.any_off = False
        self.steering.clear()

    def reports(self) -> list[SequenceReport | None]:
        return [s.report if s is not None else None for s in self.seqs]

    def place_layers(self, devices: dict[int, torch.device | str] | None) -> None:
        """Where each layer's activations live, for a model spread over devices (transformers' ``device_map``).

        Each hooked layer then gathers and writes on its own device: its neuron indexes and gather buffer
        live there, and the row masks are mirrored there (one copy per device in a step where some row was
        switched on or off, none otherwise). The monitor's scores come back to this runtime's device in one
        copy per run of consecutive layers that share a device. None: every layer on ``self.device``, where
        the hooks read the row masks themselves."""
        if devices is None:
            self.layer_devices = None
        else:
            self.layer_devices = {int(layer): torch.device(dev) for layer, dev in devices.items()}
            for layer, plan in self.neurons.plans.items():
                dev = self.layer_devices.get(layer, torch.device(self.device or "cpu"))
                self.neurons.plans[layer] = replace(plan, neurons=plan.neurons.to(dev), zero=plan.zero.to(dev),
                                                    pre_onset=plan.pre_onset.to(dev))
        self._step_key = None  # the next step rebuilds its buffers where they belong

    def _sync_mirrors(self) -> None:
        for off, fill in self._mirrors.values():
            off.copy_(self.off)
            fill.copy_(self.fill)
        self._mirrored_version = self._masks_version

    # -- the per-token step ------------------------------------------------------------------------------
    def neuron_scores(self) -> torch.Tensor:
        """Mean z-score (against pre-onset statistics) of each row's monitored neurons, from the last forward."""
        if self._gathered:  # the transformers hooks gathered per layer: one copy brings them into ``acts``
            b = self._gathered[0].shape[0]
            if self._runs is not None:  # spread over devices: one copy per run of layers on one device
                for start, end, parts in self._runs:
                    self.acts[:b, start:end].copy_(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
            elif self._stage is None:
                torch.cat(self._gathered, dim=1, out=self.acts[:b])
            else:
                torch.cat(self._gathered, dim=1, out=self._stage[:b])
                self.acts[:b].copy_(self._stage[:b])
        z = (self.acts - self.neurons.mean_before) / self.neurons.std_before
        return z @ self.watch

    def observe(self, tokens: dict[int, int], scores: torch.Tensor | list[float] | None = None) -> None:
        """Feed each row's newest token; updates masks for the next forward."""
        score_list = scores.tolist() if isinstance(scores, torch.Tensor) else scores
        on_event = self.on_event
        for row, token in tokens.items():
            seq = self.seqs[row]
            if seq is None or seq.stopped:
                continue
            before = seq.level
            was_off = seq.deactivated
            n_det = len(seq.report.detections)
            seq.observe(token, score_list[row] if score_list is not None else None)
            if seq.level != before or seq._penalty is not None or row in self.steering:
                self._track(row)
            if seq.deactivated != was_off:
                self._refresh(row)
            if on_event is not None:
                if len(seq.report.detections) != n_det:
                    on_event("detect", {"row": row, "detection": seq.report.detections[-1]})
                if seq.level != before:
                    on_event("level", {"row": row, "level": seq.level, "from": before})

    def _track(self, row: int) -> None:
        seq = self.seqs[row]
        if seq is not None and (seq._penalty is not None or seq.stopped):
            self.steering.add(row)
        else:
            self.steering.discard(row)

    def _refresh(self, row: int) -> None:
        seq = self.seqs[row]
        if seq is not None and seq.deactivated:
            self.off[row] = self._chosen[row]
            self._off_rows.add(row)
        else:
            self.off[row] = False
            self._off_rows.discard(row)
        self.any_off = bool(self._off_rows)
        self._masks_version += 1

    def switch_all_on(self) -> None:
        """Every row's neurons on (the adapter stops guarding, or comes off)."""
        self.off.zero_()
        self._off_rows.clear()
        self.any_off = False
        self._masks_version += 1

    def recount_off(self) -> None:
        """Recompute which rows are switched off from their sequences (after an adapter moved rows)."""
        self._off_rows = {row for row, seq in enumerate(self.seqs) if seq is not None and seq.deactivated}
        self.any_off = bool(self._off_rows)
        self._masks_version += 1

    def steer_logits(self, logits: torch.Tensor, rows: Iterable[int], eos: Callable[[int], int | None]) -> list[int]:
        """The one place penalties and forced EOS reach the logits ([rows, vocab], changed in place).

        ``rows``: the rows this adapter may still write (not finished); ``eos(row)``: the token that ends
        that row (None: the row is only marked stopped). Every penalty of the step goes in one write.
        Returns the rows stopped at this step.
        """
        index, tokens, amounts, stopped = [], [], [], []
        vocab = logits.shape[-1]
        for row in rows:
            seq = self.seqs[row]
            if seq is None or row >= logits.shape[0]:
                continue
            if seq.stopped:
                stopped.append(row)
                continue
            penalty = seq._penalty
            if penalty is not None and 0 <= penalty[0] < vocab:
                index.append(row)
                tokens.append(penalty[0])
                amounts.append(-penalty[1])
        if index:  # one row holds at most one penalty; computed in float32 whatever the logits' dtype
            rows_, tokens_, amounts_ = host_to_device([index, tokens, amounts], logits.device)
            where = (rows_.long(), tokens_.long())
            shifted = logits[where].float() + amounts_.float()
            logits[where] = shifted.to(logits.dtype)
        for row in stopped:
            token = eos(row)
            if token is not None:
                force_token(logits, row, token)
        return stopped

    # -- failure -----------------------------------------------------------------------------------------
    def fail_open(self, model_name: str, where: str, reports: Iterable[SequenceReport | None], first: bool,
                  consequence: str, counted: bool = False) -> None:
        """The one fail-open path: count the error, switch every row's neurons back on, mark the reports,
        log the traceback once (``first``). The adapter then stops calling its hooks' work. ``counted``: the
        error was counted and logged where it happened (another tensor-parallel rank's failure, told here)."""
        self.switch_all_on()
        self.steering.clear()
        for report in reports:
            if report is not None:
                report.errors += 1
        if counted:
            if first:
                log.warning("repguard: %s; %s", where, consequence)
            return
        metrics.record_error(model_name, where)
        if first:
            log.exception("repguard: guard failed in %s; %s", where, consequence)

    # -- tensor math used inside hooks (graph-safe: no Python branching on tensor values) -----------------
    def begin_step(self, rows: torch.Tensor, key=None) -> None:
        """Precompute the flat positions of every mapped neuron at each row's newest token, per layer, with
        views of the row buffers, so that a layer hook is one gather (plus one write when a row is off).

        ``key`` (e.g. ``(batch, length)``): when it equals the previous step's, ``rows`` are the same and
        nothing is recomputed (every decoding step after the first), so a step allocates nothing.
        Spread over devices (``place_layers``), the row masks are mirrored here when they changed."""
        if key is not None and key == self._step_key:
            if self._mirrored_version != self._masks_version and self._mirrors:
                self._sync_mirrors()
            return
        self._step_key = key
        self._flat_index = flat = flat_index(rows, self.neurons.neuron_of_slot, self.width)
        b = flat.shape[0]
        if self.dtype != torch.float32 and (self._stage is None or self._stage.shape[0] < b):
            self._stage = torch.zeros(self.rows, self.neurons.num_slots, device=self.device, dtype=self.dtype)
        self._step = {}
        self._gathered = []
        devices = self.layer_devices
        self._mirrors, self._runs = {}, None if devices is None else []
        home = torch.device(self.device or "cpu")
        for layer, plan in self.neurons.plans.items():
            dev = home if devices is None else devices.get(layer, home)
            index = flat[:, plan.slots].to(dev).contiguous()
            gathered = torch.zeros(index.shape, device=dev, dtype=self.dtype)
            if devices is None:
                off, fill = self.off, self.fill
            else:
                if dev not in self._mirrors:
                    self._mirrors[dev] = (self.off.to(dev, copy=True), self.fill.to(dev, copy=True))
                off, fill = self._mirrors[dev]
                last = self._runs[-1] if self._runs else None
                if last is not None and last[2][-1].device == dev and last[1] == plan.slots.start:
                    self._runs[-1] = (last[0], plan.slots.stop, last[2] + [gathered])
                else:
                    self._runs.append((plan.slots.start, plan.slots.stop, [gathered]))
            self._step[layer] = (index, index.view(-1), gathered, gathered.view(-1), gathered.view(b, 1, -1),
                                 off[:b, plan.slots], fill[:b, plan.slots])
            self._gathered.append(gathered)
        self._mirrored_version = self._masks_version

    def apply_layer(self, plan: LayerPlan, act: torch.Tensor) -> torch.Tensor:
        """Monitor and deactivate one layer after ``begin_step``. ``act`` holds the layer's activations of
        the whole forward (any shape whose flattening is [tokens, d_ff], e.g. [batch, length, d_ff]).
        The mapped neurons' values at each row's newest token are gathered into the layer's buffer (the
        monitor reads them through ``neuron_scores``); switched-off rows are written in place, at their
        newest token only. Monitoring costs one op per layer; a switched-off row adds two (select, write)."""
        if not (plan.monitored or self.any_off):
            return act
        index, index_1d, gathered, gathered_1d, gathered_3d, off, fill = self._step[plan.layer]
        if act.dtype != gathered.dtype:  # activations in another dtype than the weights (e.g. autocast)
            gathered.copy_(act.take(index))
        elif act.dim() == 3 and act.shape[1] == 1 and act.shape[0] == gathered.shape[0]:
            # a decoding step ([batch, 1, d_ff]): every row's newest token is its only one
            torch.index_select(act, 2, plan.neurons, out=gathered_3d)
        else:
            torch.index_select(act.reshape(-1), 0, index_1d, out=gathered_1d)
        if self.any_off:
            switch_off(act, index, fill, off, current=gathered)
        return act


def host_read(tokens: torch.Tensor, scores: torch.Tensor | None = None, pack: bool | None = None):
    """The step's one read to the host: each row's newest token (and neuron score) as Python lists.

    On an accelerator both travel in one copy (a float64 vector holds every token id and float32 score
    exactly), so the guard adds one device-to-host read per step, not two. On CPU (``pack`` None) the
    lists are read directly: there is no device to wait for.

    >>> host_read(torch.tensor([5, 7]), torch.tensor([0.5, -1.0]), pack=True)
    ([5, 7], [0.5, -1.0])
    """
    if pack is None:
        pack = tokens.device.type != "cpu"
    if scores is None:
        return tokens.tolist(), None
    if not pack:
        return tokens.tolist(), scores.tolist()
    both = torch.cat((tokens.to(torch.float64), scores.to(torch.float64))).tolist()
    n = tokens.shape[0]
    return [int(t) for t in both[:n]], both[n:]


class LateRead:
    """The step's read to the host taken one step late, for settings whose actions never depend on it
    (``GuardConfig.acts_on_detection`` False: the monitor, the paper's always-on deactivation).

    ``push`` packs each row's newest token (and neuron score) as ``host_read`` does and starts its copy to
    the host; on a CUDA device into pinned memory with ``non_blocking=True``, so the host does not wait. It
    returns the previous step's values, whose copy has finished by then (``generate`` waits for the device
    once per step; an event says so without waiting, and is waited on only if not). ``take`` returns the
    values still pending (at the end of a generation). Two buffers alternate, so a copy in flight is never
    overwritten; on the CPU the copy is a plain one.

    >>> late = LateRead()
    >>> late.push(torch.tensor([5, 7]), torch.tensor([0.5, -1.0])) is None
    True
    >>> late.push(torch.tensor([6, 8]), torch.tensor([1.5, 2.0]))
    ([5, 7], [0.5, -1.0])
    >>> late.take(), late.take()
    (([6, 8], [1.5, 2.0]), None)
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._slot = 0
        self._pending: tuple | None = None  # (buffer, rows, scored, event)

    def push(self, tokens: torch.Tensor, scores: torch.Tensor | None = None):
        previous = self.take()
        packed = tokens.to(torch.float64)
        if scores is not None:
            packed = torch.cat((packed, scores.to(torch.float64)))
        cuda = packed.device.type == "cuda"
        buffer = self._buffers[self._slot]
        if buffer is None or buffer.numel() != packed.numel():
            buffer = torch.empty(packed.numel(), dtype=torch.float64, pin_memory=cuda)
            self._buffers[self._slot] = buffer
        self._slot ^= 1
        buffer.copy_(packed, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending = (buffer, tokens.shape[0], scores is not None, event)
        return previous

    def take(self):
        if self._pending is None:
            return None
        buffer, rows, scored, event = self._pending
        self._pending = None
        if event is not None and not event.query():
            event.synchronize()
        values = buffer.tolist()
        return [int(t) for t in values[:rows]], (values[rows:] if scored else None)

    def drop(self) -> None:
        self._pending = None


def host_to_device(values: list[list[float]], device: torch.device) -> torch.Tensor:
    """Small host lists (ids below 2**53, numbers) to ``device`` as one float64 tensor, in one copy that does
    not block the host: on an accelerator the copy leaves pinned memory with ``non_blocking=True`` (a plain
    ``torch.tensor(..., device=...)`` waits for all work queued before it, like a read). Rows of the result are
    the lists, in order.

    >>> host_to_device([[1, 2], [0.5, -3.0]], torch.device("cpu")).tolist()
    [[1.0, 2.0], [0.5, -3.0]]
    """
    packed = torch.tensor(values, dtype=torch.float64)
    if device.type == "cpu":
        return packed
    try:
        packed = packed.pin_memory()
    except RuntimeError:  # no pinned memory for this device: a plain copy, which waits
        return packed.to(device)
    return packed.to(device, non_blocking=True)


def flat_index(positions: torch.Tensor, columns: torch.Tensor, width: int) -> torch.Tensor:
    """[P, n] positions of neurons ``columns`` at token rows ``positions`` of a [tokens, width] activation."""
    return positions.unsqueeze(1) * width + columns.unsqueeze(0)


def switch_off(act: torch.Tensor, index: torch.Tensor, fill, off: torch.Tensor | None = None,
               current: torch.Tensor | None = None) -> None:
    """The one function that switches neurons off, for every adapter (transformers and vLLM hooks, the
    calibration's deactivation test).

    ``act``: a layer's activations, changed in place; ``index``: flat positions into it (``flat_index``);
    ``fill``: the value(s) written there (a number, or a tensor shaped like ``index``); ``off`` (optional,
    bool like ``index``): write only where True, keep the others; ``current``: ``act.take(index)`` if the
    caller already gathered it. The same tensor ops run on every call (safe under torch.compile).

    >>> act = torch.ones(2, 4)
    >>> switch_off(act, flat_index(torch.tensor([1]), torch.tensor([0, 3]), 4), 0.0)
    >>> act.tolist()
    [[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]]
    """
    if off is None:
        values = fill if isinstance(fill, torch.Tensor) else torch.full(index.shape, fill, dtype=act.dtype,
                                                                          device=act.device)
    else:
        cur = act.take(index) if current is None else current
        values = torch.where(off, fill, cur)
    act.put_(index, values if values.dtype == act.dtype else values.to(act.dtype))


def force_token(logits: torch.Tensor, row: int, token: int) -> None:
    """Stop: make ``token`` (the EOS) the only choice of one row (in place), keeping its own logit if finite."""
    keep = logits[row, token].clone()
    logits[row].fill_(float("-inf"))
    logits[row, token] = torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep))  # no host read


def token_id_list(*sources) -> list[int]:
    """The first of ``sources`` that is set (an id or a list of ids), as a list: how every adapter reads EOS
    and pad ids (a generation config, then the model config or tokenizer; vLLM: the request, then the model).

    >>> token_id_list(None, [2, 7], 5)
    [2, 7]
    >>> token_id_list(None, None)
    []
    """
    for value in sources:
        if value is None:
            continue
        if hasattr(value, "tolist"):  # a tensor or an array (transformers takes a tensor of EOS ids)
            value = value.tolist()
        values = value if isinstance(value, (list, tuple)) else [value]
        return [int(v) for v in values]
    return []


def model_fingerprint(spec: ArchSpec, config, model, final_norm_weight: torch.Tensor | None = None) -> Fingerprint:
    """A model's identity for ``NeuronMap.check_model``, read the same way from a transformers or vLLM model:
    ``config`` is its text config, ``model`` the module tree holding ``spec.final_norm`` (or its weight, read
    by the adapter: ``final_norm_weight``)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    weight = resolve(model, spec.final_norm).weight if final_norm_weight is None else final_norm_weight
    return Fingerprint.of(config.model_type, spec.num_layers(config), spec.intermediate_size(config), hidden,
                          config.vocab_size, weight)


__all__ = ["GuardRuntime", "LayerPlan", "NeuronSet", "Level", "flat_index", "host_read", "host_to_device", "LateRead", "force_token", "model_fingerprint",
           "switch_off", "token_id_list"]
