"""``GuardRuntime``: the framework-neutral part of a live guard, shared by the HF and vLLM adapters.

It owns the per-sequence ``SequenceGuard`` objects and the tensors that the adapters' hooks read:
which neurons to watch and switch off (``LayerPlan``), per-row masks, the monitor buffer, and the
per-row penalty/stop requests. Hooks do tensor math on these buffers only (graph-safe); all Python
decisions happen once per token in ``observe``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .config import GuardConfig
from .neuron_map import NeuronMap
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
            self.plans[int(layer)] = LayerPlan(int(layer), neurons, sl, torch.zeros_like(means), means, monitored)
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
        self.any_off = False
        self._flat_index: torch.Tensor | None = None
        self.seqs = [None] * rows
        self.row_k = [0] * rows
        self._chosen: dict[int, torch.Tensor] = {}

    def ensure_rows(self, rows: int) -> None:
        if rows > self.rows:
            old, chosen, off, use_mean, fill = self.seqs, self._chosen, self.off, self.use_mean, self.fill
            n = len(old)
            self._alloc(rows)
            self.seqs[:n] = old
            self._chosen.update(chosen)
            self.off[:n], self.use_mean[:n], self.fill[:n] = off, use_mean, fill
            self.any_off = bool(self.off.any())

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
        return seq

    def close(self, row: int) -> SequenceReport | None:
        seq = self.seqs[row]
        self.seqs[row] = None
        self.off[row] = False
        self.any_off = bool(self.off.any())
        return seq.report if seq is not None else None

    def reset(self) -> None:
        self.seqs = [None] * self.rows
        self.off.zero_()
        self.any_off = False

    def reports(self) -> list[SequenceReport | None]:
        return [s.report if s is not None else None for s in self.seqs]

    # -- the per-token step ------------------------------------------------------------------------------
    def neuron_scores(self) -> torch.Tensor:
        """Mean z-score (against pre-onset statistics) of each row's monitored neurons, from the last forward."""
        z = (self.acts - self.neurons.mean_before) / self.neurons.std_before
        return z @ self.watch

    def observe(self, tokens: dict[int, int], scores: torch.Tensor | None = None) -> None:
        """Feed each row's newest token; updates masks for the next forward."""
        score_list = scores.tolist() if scores is not None else None
        changed = False
        for row, token in tokens.items():
            seq = self.seqs[row]
            if seq is None or seq.stopped:
                continue
            before = seq.level
            was_off = seq.deactivated
            n_det = len(seq.report.detections)
            seq.observe(token, score_list[row] if score_list is not None else None)
            if seq.deactivated != was_off:
                self._refresh(row)
                changed = True
            if self.on_event is not None:
                if len(seq.report.detections) != n_det:
                    self.on_event("detect", {"row": row, "detection": seq.report.detections[-1]})
                if seq.level != before:
                    self.on_event("level", {"row": row, "level": seq.level, "from": before})
        if changed:
            self.any_off = bool(self.off.any())

    def _refresh(self, row: int) -> None:
        seq = self.seqs[row]
        if seq is not None and seq.deactivated:
            self.off[row] = self._chosen[row]
        else:
            self.off[row] = False
        self.any_off = bool(self.off.any())

    def penalties(self) -> list[tuple[int, int, float]]:
        """(row, token id, amount) for every row whose loop should be penalised at this step."""
        out = []
        for row, seq in enumerate(self.seqs):
            if seq is not None and seq._penalty is not None:
                token, amount = seq._penalty
                out.append((row, token, amount))
        return out

    def stops(self) -> list[int]:
        return [row for row, seq in enumerate(self.seqs) if seq is not None and seq.stopped]

    # -- tensor math used inside hooks (graph-safe: no Python branching on tensor values) -----------------
    def begin_step(self, rows: torch.Tensor) -> None:
        """Precompute, once per forward, the flat positions of every mapped neuron at each row's newest
        token, so each layer hook is one gather (and one scatter when a row is switched off)."""
        self._flat_index = rows.unsqueeze(1) * self.width + self.neurons.neuron_of_slot.unsqueeze(0)

    def apply_layer(self, plan: LayerPlan, act: torch.Tensor, rows: torch.Tensor, graph_safe: bool = False) -> torch.Tensor:
        """Monitor and deactivate one layer. ``act`` is [tokens, d_ff]; ``rows`` indexes the newest
        token of each batch row. Modifies ``act`` in place where a row is switched off.

        With ``graph_safe`` the same tensor ops run on every call (no branching on Python state that
        a compiled graph would freeze); otherwise layers with nothing to do return at once.
        """
        if not graph_safe and not (plan.monitored or self.any_off):
            return act
        flat_index = self._flat_index
        if flat_index is not None and act.is_contiguous() and act.shape[-1] == self.width and flat_index.shape[0] == rows.shape[0]:
            flat = act.view(-1)
            index = flat_index[:, plan.slots]
            cur = flat.take(index)  # [B, n]
            b = cur.shape[0]
            if graph_safe or plan.monitored:
                self.acts[:b, plan.slots] = cur
            if graph_safe or self.any_off:
                flat.put_(index, torch.where(self.off[:b, plan.slots], self.fill[:b, plan.slots], cur))
            return act
        index = (rows.unsqueeze(1), plan.neurons.unsqueeze(0))
        cur = act[index]  # [B, n]
        b = cur.shape[0]
        if graph_safe or plan.monitored:
            self.acts[:b, plan.slots] = cur
        if graph_safe or self.any_off:
            act[index] = torch.where(self.off[:b, plan.slots], self.fill[:b, plan.slots], cur)
        return act


def penalise(logits: torch.Tensor, row: int, token: int, amount: float) -> None:
    """Escalation: lower one token's logit in one row (in place), where the token exists."""
    if 0 <= token < logits.shape[-1]:
        logits[row, token] -= amount


def force_token(logits: torch.Tensor, row: int, token: int) -> None:
    """Stop: make ``token`` (the EOS) the only choice of one row (in place), keeping its own logit if finite."""
    keep = logits[row, token].clone()
    logits[row].fill_(float("-inf"))
    logits[row, token] = keep if torch.isfinite(keep) else 0.0


__all__ = ["GuardRuntime", "LayerPlan", "NeuronSet", "Level", "force_token", "penalise"]
