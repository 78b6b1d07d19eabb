"""The runtime guard for transformers: ``with repguard.guard(model, neuron_map, config) as g:``.

Everything happens in forward hooks, so plain ``model.generate`` (greedy or sampling, batched with
left padding) is guarded without touching transformers. The guard watches the ``generate`` calls made while
it is installed (it wraps ``model.generate``; each call's first forward is its prefill, a reused prompt cache
included); other forwards of the model in the block (scoring a text, say) are left alone, and settings it
cannot follow (beam search, speculative decoding, chunked prefill, ``inputs_embeds`` alone) are refused
with a ``ConfigError`` before anything runs:

* a forward pre-hook on the causal LM sees each row's newest token and advances that row's policy;
* a hook on the activation module of each layer whose neurons the rows' settings read (the monitor's
  best-ranked neurons) or write (their chosen neurons) records those neurons and writes the
  deactivation value for rows whose policy says so, at the newest position only; other layers carry
  no hook;
* a hook on the causal LM's output logits (after any final soft-capping, which would squash a forced
  EOS back into reach of other tokens), present only when some row may escalate or stop, applies the
  escalation penalty to exactly the token that would extend the loop, or forces EOS for a row the policy
  stops; it returns at once while no row asks for either.

Per decoding step the guard allocates nothing (buffers and indexes are made at the prefill), each
hooked layer does one gather (plus one write while a row is switched off), and the host reads the
newest tokens and the neuron scores once. A model spread over devices (``device_map``) is hooked on each
layer's own device (``GuardRuntime.place_layers``).

A row whose policy never leaves MONITOR is never written to, so its output is byte-identical to an
unguarded run. Any exception inside a hook is logged once, counted, and turns the guard off for the
rest of that generation: generation itself continues, unguarded.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Sequence

import torch

from .. import metrics
from ..config import GuardConfig
from ..errors import ConfigError, MapMismatchError, RepGuardError
from ..maps import find_map
from ..neuron_map import NeuronMap
from ..policy import SequenceReport
from ..runtime import GuardRuntime, LateRead, host_read, token_id_list
from .introspect import act_modules, arch_of, fingerprint, home_device, layer_devices, shape_of, weight_digest

log = logging.getLogger("repguard")


def named_call(generate, args: tuple, kwargs: dict) -> dict:
    """A ``generate`` call's arguments by name: ``model.generate(ids, GenerationConfig(...))`` passes its
    config positionally, and the guard must read it there too. The call as given where it does not bind
    (``generate`` then raises its own error)."""
    if not args:
        return kwargs
    try:
        bound = inspect.signature(generate).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return kwargs
    named: dict = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


def call_setting(model, kwargs: dict, key: str, default=None):
    """A ``generate`` setting as the call runs with it: its own argument, else its ``generation_config``'s,
    else the model's generation config's; ``default`` where none is set (None). A value the call's config
    leaves unset (None, or transformers' global default) is the model's where the model sets another, as
    ``generate`` merges them (unless the call passes ``use_model_defaults=False``)."""
    if key in kwargs:
        value = kwargs[key]
    else:
        model_gen = getattr(model, "generation_config", None)
        own = kwargs.get("generation_config")
        value = getattr(own if own is not None else model_gen, key, None)
        if own is not None and own is not model_gen and model_gen is not None \
                and kwargs.get("use_model_defaults") is not False:
            base = getattr(_global_generation_defaults(), key, None)
            mine = getattr(model_gen, key, None)
            if (value is None or value == base) and mine is not None and mine != base:
                value = mine
    return default if value is None else value


@functools.lru_cache(maxsize=1)
def _global_generation_defaults():
    from transformers import GenerationConfig

    return GenerationConfig()


def check_map_weights(neuron_map: NeuronMap, model, model_name: str) -> None:
    """A map that records the digest of its model's weights (``weight_digest``; maps calibrated before it do
    not) fits only that checkpoint: another of the same shape and final norm (a LoRA merge, another fine-tune)
    is refused. Compared in the map's own dtype only, since the digest reads the weights as they are."""
    cal = neuron_map.meta.calibration
    recorded = getattr(cal, "weight_digest", None)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if not recorded or cal.dtype != dtype or any(p.device.type == "meta" for p in model.parameters()):
        return  # no digest; another dtype; or offloaded weights, which the digest cannot read
    if weight_digest(model) != recorded:
        raise MapMismatchError(
            f"neuron map for '{neuron_map.meta.model_name}' does not fit model '{model_name}': it was calibrated on "
            "another checkpoint of this shape (the digest of its weights differs); calibrate a map for this model "
            "(repguard calibrate), or pass check_model=False to use it anyway"
        )


def model_token_ids(model, attr: str) -> list[int]:
    """``eos_token_id`` / ``pad_token_id`` of a transformers model: its generation config, else its config."""
    return token_id_list(getattr(getattr(model, "generation_config", None), attr, None),
                         getattr(model.config, attr, None))


class Guard:
    """Hooks plus per-row state for one model. Use through ``guard(...)`` as a context manager."""

    def __init__(
        self,
        model,
        neuron_map: NeuronMap | str | None = None,
        config: GuardConfig | dict | None = None,
        *,
        model_name: str | None = None,
        check_model: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> None:
        arch_of(model)  # raises UnsupportedModelError with the supported list
        self.model = model
        self.model_name = model_name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        num_layers, width = shape_of(model)
        if neuron_map is False:  # token-level guard: no map, no neuron step
            neuron_map = None
        elif neuron_map is None or isinstance(neuron_map, str):
            neuron_map = find_map(neuron_map or self.model_name)
        if neuron_map is not None and not isinstance(neuron_map, NeuronMap):
            raise ConfigError(f"neuron_map: expected a NeuronMap, a path or map name, None (the shipped map) or False "
                              f"(no map), got {type(neuron_map).__name__}")
        if neuron_map is None:
            pass
        elif check_model:
            neuron_map.check_model(fingerprint(model), where=f"model '{self.model_name}'")
            check_map_weights(neuron_map, model, self.model_name)
        elif (neuron_map.meta.num_layers, neuron_map.meta.intermediate_size) != (num_layers, width):
            raise RepGuardError(
                f"neuron map shape {neuron_map.meta.num_layers}x{neuron_map.meta.intermediate_size} does not fit "
                f"the model ({num_layers}x{width})"
            )
        self.neuron_map = neuron_map
        self._num_layers = num_layers
        self.config = self._checked(config if isinstance(config, GuardConfig) else GuardConfig.from_dict(config))
        home = home_device(model)
        self.runtime = GuardRuntime(neuron_map, self.config, max_rows=1, device=home,
                                    dtype=next(model.parameters()).dtype)
        # device_map: each hooked layer gathers and writes on its own device
        self.runtime.place_layers(layer_devices(model, home))
        # The end tokens rows end on: those given here, else the model's; a generate call that names its own
        # (eos_token_id, or a generation_config that has one) uses those for that call.
        self.eos = token_id_list(eos_token_id) or model_token_ids(model, "eos_token_id")
        self._call_eos = self.eos
        # A row's first EOS ends its watch (generate feeds finished rows padding). A call with stop strings or
        # stopping criteria ends rows without an EOS, padding them from then on: there a pad token ends it too
        # (elsewhere a pad id the model generates is an ordinary token, and the row goes on).
        self._pad = model_token_ids(model, "pad_token_id")
        self._terminal = frozenset(self.eos)
        self._min_new = self._min_length = 0  # the call's minimum length: a stop waits for it (``_logits_hook``)
        self._first_end = 0  # the first new token, counted from 0, that may be an EOS in this generation
        self._step_index = 0  # the new token this generation's current forward computes the logits of
        self._call_mask: torch.Tensor | None = None  # the call's 2-D attention mask (``_begin``)
        self._depth = 0  # ``generate`` calls in progress (``generation``)
        self._owner: int | None = None  # the thread running them: forwards of other threads are not this guard's
        self._installer: int | None = None  # the thread that installed the guard (``_guard_of_call``)
        self._nested = 0  # ``generate`` calls made inside this guard's generation on its thread: left unguarded
        self._pending_begin = False  # the next forward is a generation's prefill
        self._row_configs: list[GuardConfig] | None = None
        self._row_histories: list | None = None
        self._reserved: list[GuardConfig] = []  # settings rows may be switched to mid-generation (rewind_row)
        self._refed: set[int] = set()  # rows whose next token is one their history already ends with
        self._handles: list = []
        self._layer_hooks: dict[int, object] = {}  # layer -> handle of its activation hook
        self._head_hook = None
        self._scored = False  # some hooked layer feeds the neuron monitor
        self._rows_index: torch.Tensor | None = None
        self._done: list[bool] = []
        self._active = False  # hooks act only between a prefill and the end of that generation
        self._broken = False
        self._failed_once = False
        self._reports: list[SequenceReport] = []
        self._recorded = True
        # Settings that never act on a detection read each step's tokens one step late (no wait per step).
        self._late = LateRead()
        self._read_late = False
        # The newest token of each row as read this step (None when not read this step, or read late):
        # ``generate``'s logits processors may use it instead of reading the tokens from the device again.
        self.newest: list[int] | None = None
        # False: the caller records the reports itself (the server, whose requests span several generations)
        self.record_metrics = True
        # Each ``generate`` call's last token is read when it returns (``_observe_last``); rollback, which reads
        # each pass's tokens itself, turns it off.
        self.observe_last = True
        self.errors = 0
        self.steps = 0
        self.overhead_seconds = 0.0
        self._acts = act_modules(model)

    # -- public API ------------------------------------------------------------------------------------
    @property
    def form(self) -> str:
        """Which repair runs: token-level only (no map) or with the neuron step."""
        return "tokens+neurons" if self.neuron_map is not None else "tokens"

    @property
    def watching(self) -> bool:
        """A generation is running and the guard has not failed open in it."""
        return self._active and not self._broken

    @property
    def reports(self) -> list[SequenceReport]:
        """One report per row of the most recent ``generate`` call (from another thread: once the call running
        now ends; each call's own are on its output, ``out.repguard_reports``)."""
        with model_lock(self.model):
            self._drain()
            return self._reports

    def _checked(self, cfg: GuardConfig) -> GuardConfig:
        """``cfg`` if this model and map can run it, else ``ConfigError`` naming the setting."""
        nmap = self.neuron_map
        if nmap is not None and cfg.k is not None and cfg.k > len(nmap):
            raise ConfigError(f"k: {cfg.k} exceeds the {len(nmap)} neurons stored in the map")
        if cfg.layers is not None and max(cfg.layers) >= self._num_layers:
            raise ConfigError(f"layers: the model has {self._num_layers} layers (0..{self._num_layers - 1})")
        if nmap is None and cfg.enabled and cfg.monitor_gate is not None:
            raise ConfigError("monitor_gate: needs the neuron monitor, and this guard has no neuron map (every "
                              "trigger would be vetoed); drop monitor_gate or give a map")
        return cfg

    def configure_rows(
        self,
        configs: Sequence[GuardConfig | dict | None] | None,
        histories: Sequence[Sequence[int] | None] | None = None,
    ) -> None:
        """Per-row settings for the next generations (None entries use the guard's config).

        ``histories`` (optional) are generated tokens kept from an earlier pass that the prompts end
        with (a rollback): they prime each row's detector and report positions continue after them.
        """
        self._row_histories = list(histories) if histories is not None else None
        if configs is None:
            self._row_configs = None
            return
        self._row_configs = [
            self.config if c is None else self._checked(c if isinstance(c, GuardConfig) else GuardConfig.from_dict(c))
            for c in configs
        ]

    def reserve(self, configs: Sequence[GuardConfig]) -> None:
        """Settings that ``rewind_row`` may switch a row to during a generation: their layers are hooked
        from the prefill on (a hooked layer that no row writes only gathers, or does nothing)."""
        self._reserved = [self._checked(c) for c in configs]

    def rewind_row(self, row: int, config: GuardConfig, history: Sequence[int], prompt: Sequence[int] | None = None) -> None:
        """Restart one row's watch in the middle of a generation (an in-place rollback): the row continues
        under ``config`` from ``history`` (its kept generated tokens); the next token it is fed is
        ``history[-1]`` again (re-fed to recompute the logits after it), which is not observed twice.
        ``config``'s layers must be hooked already (``reserve``)."""
        if not self.watching:
            return
        seq = self.runtime.open(row, config, prompt if config.watch_prompt else None, history=list(history))
        self._done[row] = False
        self._reports[row] = seq.report
        self._refed.add(row)

    def flush(self) -> None:
        """Record the last generation's reports in the metrics now (otherwise done when the next
        generation starts, or on exit). Idempotent. Waits for a generation another thread is running."""
        with model_lock(self.model):
            self._finish()

    def install(self) -> "Guard":
        # Under the model's lock: a guarded generation of another thread never sees hooks half registered.
        with model_lock(self.model):
            return self._install()

    def _install(self) -> "Guard":
        if self._handles:
            return self
        self._installer = threading.get_ident()
        _INSTALLED.setdefault(self.model, []).append(weakref.ref(self))
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            if self.model.get_output_embeddings() is None:
                raise RepGuardError(f"{type(self.model).__name__} has no output embedding to apply penalties on")
            configs = self._row_configs or [self.config]
            self._place_hooks(configs)
            self._wrap_generate()
        except Exception:
            self.remove()
            raise
        metrics.set_info(self.model_name, self.neuron_map.meta.model_name if self.neuron_map is not None else "none")
        return self

    def remove(self) -> None:
        with model_lock(self.model):
            self._remove()

    def _remove(self) -> None:
        installed = _INSTALLED.get(self.model)
        if installed is not None:
            installed[:] = [ref for ref in installed if ref() is not None and ref() is not self]
        for handle in [*self._handles, *self._layer_hooks.values(), self._head_hook]:
            if handle is not None:
                handle.remove()
        self._handles.clear()
        self._layer_hooks.clear()
        self._head_hook = None
        self._unwrap_generate()
        self._finish()

    def _wrap_generate(self) -> None:
        """``model.generate`` marks each call as one generation (``generation``) of the guard that runs it
        (``_guard_of_call``), checked before it runs. One wrapper per model, whatever the guards installed on it:
        it stays while one is, and passes calls through once none is. It holds the model weakly (a guard never
        removed does not keep a dropped model alive)."""
        model = self.model
        if model in _WRAPPERS and "generate" in model.__dict__:
            return  # repguard's wrapper, or another's on top of it (one taken off the instance is made again)
        own = model.__dict__.get("generate")  # another wrapper on the instance, or None: the class's method
        method = type(model).generate
        ref = weakref.ref(model)

        @functools.wraps(own if own is not None else method)
        def generate(*args, **kwargs):
            model = ref()
            inner = own if own is not None else method.__get__(model)
            if _guard_of_call(model) is None:
                return inner(*args, **kwargs)
            with model_lock(model):  # another thread's guarded generation first; the guards may have changed since
                guard = _guard_of_call(model)
                if guard is None or _own_custom_generate(kwargs):
                    return inner(*args, **kwargs)  # no guard (any more), or repguard's drop-in: a guard of its own
                if guard._depth:  # called inside this guard's generation, on its thread (a streamer, a processor)
                    guard._nested += 1
                    try:
                        return inner(*args, **kwargs)
                    finally:
                        guard._nested -= 1
                with guard.generation((), named_call(inner, args, kwargs)):
                    out = inner(*args, **kwargs)
                    guard._observe_last(out)
                    with contextlib.suppress(AttributeError):  # this call's reports, whatever thread calls next
                        out.repguard_reports = guard.reports
                    return out

        _WRAPPERS[model] = (generate, own)
        model.generate = generate

    def _unwrap_generate(self) -> None:
        """The last guard of the model removed: its ``generate`` is the model's own again. Where another wrapper
        went on top of repguard's since, repguard's stays (the model's one, passing calls through while no guard
        is installed, and used again by the next guard)."""
        model = self.model
        if _INSTALLED.get(model) or model not in _WRAPPERS:
            return
        wrapper, own = _WRAPPERS[model]
        if model.__dict__.get("generate") is wrapper:
            del _WRAPPERS[model]
            if own is None:
                del model.generate
            else:
                model.generate = own

    @contextmanager
    def generation(self, args: tuple = (), kwargs: dict | None = None):
        """One generation: the first forward inside is its prefill (rows open, reports start), the others its
        decoding steps. ``model.generate`` runs in one while the guard is installed; a decoding loop of one's
        own (``custom_generate``) opens one around it. ``args`` / ``kwargs``: the ``generate`` call's, checked
        first (``ConfigError`` for settings the guard cannot follow). Holds the model's lock (``model_lock``):
        one guarded generation per model at a time; the hooks act on forwards of this thread only."""
        with model_lock(self.model):
            if kwargs is not None:
                self._check_call(args, kwargs)
            else:  # a loop of one's own: nothing known of its minimum length or mask
                self._min_new = self._min_length = 0
                self._call_mask = None
            if not self._depth:
                self._owner = threading.get_ident()
            # A guarded generation started inside another guard's on this thread (a streamer that generates
            # with rollback, say): the outer guard's hooks sit this one out.
            outer = [g for g in _installed(self.model) if g is not self and g._depth and g._owner == self._owner]
            for g in outer:
                g._nested += 1
            self._depth += 1
            self._pending_begin = True
            try:
                yield self
            finally:
                self._depth -= 1
                self._pending_begin = False
                for g in outer:
                    g._nested -= 1
                if not self._depth:
                    self._owner = None

    def _check_call(self, args: tuple, kwargs: dict) -> None:
        """Refuse what the hooks cannot follow, before anything runs; note how this call ends rows."""
        def setting(key, default=None):
            return call_setting(self.model, kwargs, key, default)

        if (setting("num_beams", 1) or 1) > 1:
            raise ConfigError("repguard: beam search is not supported (beams are reordered between steps, under "
                              "each row's guard state); use num_beams=1")
        for key in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
            if setting(key) is not None:
                raise ConfigError(f"repguard: {key}: speculative decoding is not supported (the guard sees one new "
                                  "token per row and step)")
        if setting("prefill_chunk_size") is not None:
            raise ConfigError("repguard: prefill_chunk_size: a chunked prefill is not supported (the guard takes "
                              "a generation's first forward for its whole prefill)")
        if setting("guidance_scale") not in (None, 1):  # generate runs a second forward for any other
            raise ConfigError("repguard: guidance_scale: classifier-free guidance is not supported (its second "
                              "forward at every step would count as a decoding step of its own)")
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if kwargs.get("inputs_embeds") is not None:
            raise ConfigError("repguard: generate with inputs_embeds cannot be guarded (the guard reads each row's "
                              "tokens, and the prefill would run on the embeddings); pass input_ids alone")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            rows = ids.shape[0] * int(setting("num_return_sequences", 1) or 1)
            if self._row_configs is not None and len(self._row_configs) != rows:
                raise ConfigError(f"configure_rows got {len(self._row_configs)} configs for a batch of {rows} rows")
            if self._row_histories is not None and len(self._row_histories) != rows:
                raise ConfigError(f"configure_rows got {len(self._row_histories)} histories for a batch of {rows} rows")
        own = kwargs.get("eos_token_id")
        if own is None and kwargs.get("generation_config") is not None:
            own = getattr(kwargs["generation_config"], "eos_token_id", None)
        self._call_eos = token_id_list(own) or self.eos
        stops = kwargs.get("stopping_criteria") or setting("stop_strings")
        # The id a row ended by the criteria is padded with: the call's, else the model's, else its first EOS
        # (as generate picks it).
        pad = token_id_list(setting("pad_token_id")) or self._pad or self._call_eos[:1]
        self._terminal = frozenset(self._call_eos + (pad if stops else []))
        # No EOS before these many new tokens (min_new_tokens, min_length): a stop waits for them.
        self._min_new = int(setting("min_new_tokens", 0) or 0)
        self._min_length = int(setting("min_length", 0) or 0)
        mask = kwargs.get("attention_mask")
        self._call_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _place_hooks(self, configs: Sequence[GuardConfig]) -> None:
        """Hook exactly the layers these settings read or write, and the logits only where a row may
        escalate or stop; called at install and at each prefill (``configure_rows`` may change them)."""
        configs = list({id(c): c for c in configs}.values())
        rt = self.runtime
        needed = rt.layers_needed(configs)
        for layer in [layer for layer in self._layer_hooks if layer not in needed]:
            self._layer_hooks.pop(layer).remove()
        for layer in sorted(needed - set(self._layer_hooks)):
            plan = rt.neurons.plans[layer]
            self._layer_hooks[layer] = self._acts[layer].register_forward_hook(self._make_act_hook(plan))
        self._scored = any(rt.neurons.plans[layer].monitored for layer in self._layer_hooks)
        steers = any(c.enabled and (c.escalate or c.stop) for c in configs)
        if steers and self._head_hook is None:
            self._head_hook = self.model.register_forward_hook(self._logits_hook)
        elif not steers and self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None

    def __enter__(self) -> "Guard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- hooks -----------------------------------------------------------------------------------------
    def _mine(self) -> bool:
        """This forward runs on the thread of this guard's generation. Not asked inside a compiled forward
        (torch.compile cannot trace the thread's id, and would break its graph at every hook): guarded
        generations are one at a time per model (``model_lock``) there too, but another thread's plain forward
        during one is not told apart."""
        return torch.compiler.is_compiling() or self._owner == threading.get_ident()

    def _fail(self, where: str, exc: BaseException) -> None:
        self.errors += 1
        self._broken = True
        first, self._failed_once = not self._failed_once, True
        self.runtime.fail_open(self.model_name, where, self._reports, first, "this generation continues unguarded")

    def _pre_hook(self, module, args, kwargs=None):
        if not self._depth or self._nested or not self._mine():
            return None  # a forward outside this guard's generation (another thread's, a nested call's): left alone
        self.newest = None
        kwargs = kwargs or {}
        prefill, self._pending_begin = self._pending_begin, False
        if self._broken and not prefill:
            return None
        t0 = time.perf_counter()
        try:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                self._active = False  # inputs_embeds only: nothing to watch
                return None
            batch, length = ids.shape
            if prefill:
                self._begin(ids, kwargs.get("attention_mask"))
            else:
                self._step_index += 1
                if self._active:
                    self._observe(ids)
            if self._active and self._layer_hooks:
                key = (batch, length)
                if self.runtime._step_key != key:  # the prefill, then the first decoding step: nothing after
                    self._rows_index = torch.arange(batch, device=ids.device) * length + (length - 1)
                self.runtime.begin_step(self._rows_index, key)
        except Exception as exc:  # fail open
            self._fail("observe", exc)
        self.overhead_seconds += time.perf_counter() - t0
        return None

    def _begin(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        self._finish()  # count the previous generation's reports
        self._step_index = 0
        self._first_end = max(self._min_new, self._min_length - ids.shape[1])
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            # a static cache's 4-D mask, or a dict of them: the call's own 2-D mask says which tokens are padding
            attention_mask = self._call_mask if self._call_mask is not None and \
                self._call_mask.shape == ids.shape else None
        self._call_mask = None  # read once, at the prefill: not kept alive past it
        self.steps, self.overhead_seconds = 0, 0.0  # the overhead histogram observes each generation's own
        batch = ids.shape[0]
        # One report per row before anything here can fail: a guard that fails open at the prefill still
        # answers for every row of this generation (its rows go on unguarded).
        self._reports = [SequenceReport() for _ in range(batch)]
        self._done = [False] * batch
        self._broken = False
        self._failed_once = False
        rt = self.runtime
        rt.ensure_rows(batch)
        rt.reset()
        configs = self._row_configs
        self._place_hooks([*(configs or [self.config]), *self._reserved])
        self._read_late = not any(c.acts_on_detection for c in [*(configs or [self.config]), *self._reserved])
        self._refed.clear()
        self._late.drop()
        rt._step_key = None  # new prefill: new row positions
        if configs is not None and len(configs) != batch:
            raise ConfigError(f"configure_rows got {len(configs)} configs for a batch of {batch}")
        if self._row_histories is not None and len(self._row_histories) != batch:
            raise ConfigError(f"configure_rows got {len(self._row_histories)} histories for a batch of {batch}")
        for row in range(batch):
            cfg = configs[row] if configs is not None else self.config
            prompt = None
            if cfg.watch_prompt:
                row_ids = ids[row] if attention_mask is None else ids[row][attention_mask[row].bool()]
                prompt = row_ids.tolist()
            history = self._row_histories[row] if self._row_histories is not None else None
            rt.open(row, cfg, prompt, history=history)
        self._done = [False] * batch
        self._reports = [seq.report for seq in rt.seqs[:batch]]
        self._recorded = False
        self._active = True

    def _observe_last(self, out) -> None:
        """``generate`` returns without a forward that would show the guard each row's last token: it is read
        here, once per call, so a report counts every generated token and sees a loop completed by the last
        one (no neuron score: a score-gated detection needs one, so it cannot fire on it)."""
        if not self.observe_last or not self._active or self._broken:
            return
        ids = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != len(self._reports):
            return
        try:
            if self._read_late:  # through the late-read buffers, as every step's tokens
                previous = self._late.push(ids[:, -1], None)
                if previous is not None:
                    self._consume(*previous)
                self._drain()
            else:
                self._consume(host_read(ids[:, -1])[0], None)
        except Exception as exc:  # fail open
            self._fail("observe", exc)

    def _observe(self, ids: torch.Tensor) -> None:
        scores = self.runtime.neuron_scores() if self._scored else None
        if not self._read_late:
            newest, scores = host_read(ids[:, -1], scores)
            self._consume(newest, scores)
            self.newest = newest
            return
        previous = self._late.push(ids[:, -1], scores)  # nothing this step depends on the read
        if previous is not None:
            self._consume(*previous)

    def _drain(self) -> None:
        """Take the step read still pending (settings that read one step late), before anyone reads a report."""
        if not self._active or self._broken:
            self._late.drop()
            return
        try:
            pending = self._late.take()
            if pending is not None:
                self._consume(*pending)
        except Exception as exc:  # fail open
            self._fail("observe", exc)

    def _consume(self, newest: list[int], scores: list[float] | None) -> None:
        rt = self.runtime
        tokens = {}
        terminal = self._terminal
        refed = self._refed
        for row, token in enumerate(newest):
            if self._done[row]:
                continue
            if refed and row in refed:
                refed.discard(row)  # a rewound row's re-fed last kept token: already in its history
                continue
            if token in terminal:
                self._done[row] = True  # the row has finished; later tokens are padding
                continue
            tokens[row] = token
        rt.observe(tokens, scores)
        self.steps += 1

    def _make_act_hook(self, plan):
        rt = self.runtime

        def hook(module, inputs, output):
            if not self._active or self._broken or not self._depth or self._nested or not self._mine():
                return None
            try:
                rt.apply_layer(plan, output)
            except Exception as exc:
                self._fail("deactivate", exc)
            return None

        return hook

    def _logits_hook(self, module, inputs, output):
        rt = self.runtime
        if (not rt.steering or not self._active or self._broken or not self._depth or self._nested
                or not self._mine()):  # nothing to do, or another thread's (or a nested call's) forward
            return None
        t0 = time.perf_counter()
        try:
            logits = getattr(output, "logits", None)
            if logits is None:
                logits = output[0] if isinstance(output, (tuple, list)) else output
            logits = logits[:, -1, :] if logits.dim() == 3 else logits
            done = self._done
            eos = self._call_eos[0] if self._call_eos else None
            if self._step_index < self._first_end:  # generate masks every EOS here (min_new_tokens, min_length):
                eos = None  # a stopped row goes on until it may end, then its EOS is forced
            for row in rt.steer_logits(logits, [r for r in sorted(rt.steering) if not done[r]], lambda row: eos):
                if eos is not None:
                    done[row] = True
        except Exception as exc:
            self._fail("penalty", exc)
        self.overhead_seconds += time.perf_counter() - t0
        return None

    def _finish(self) -> None:
        self._drain()
        if self._recorded:
            return
        self._recorded = True
        self._active = False
        for report in self._reports if self.record_metrics else ():
            metrics.record_report(self.model_name, report)
        if self.steps:
            metrics.record_overhead(self.model_name, self.overhead_seconds / max(1, self.steps))


_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_LOCK = threading.Lock()
# The guards installed on each model, in the order installed (``Guard.install``; changed under the model's lock).
_INSTALLED: "weakref.WeakKeyDictionary[torch.nn.Module, list[weakref.ref]]" = weakref.WeakKeyDictionary()
# Each model's ``generate`` wrapper and the instance attribute it replaced (``Guard._wrap_generate``).
_WRAPPERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _installed(model) -> "list[Guard]":
    """The guards installed on ``model``, in the order installed."""
    return [g for g in (ref() for ref in _INSTALLED.get(model) or ()) if g is not None]


def _guard_of_call(model) -> "Guard | None":
    """The guard that runs a ``generate`` call of this thread on ``model``: the last one this thread installed,
    else the last one installed (a guard installed once and called from a thread pool). One guard per call:
    the others' hooks stay out of it."""
    installed = _installed(model)
    me = threading.get_ident()
    own = [g for g in installed if g._installer == me]
    return (own or installed or [None])[-1]


def model_lock(model) -> threading.RLock:
    """The lock of ``model``'s guarded generations: one at a time per model, whichever thread or guard runs it.

    A guard's state (its rows, reports, the step's newest tokens) belongs to one generation, and its hooks fire
    on every forward of the model: a second thread's guarded generation would read and steer the first's rows.
    ``generate`` through a guard, ``custom_generate`` and ``generate_with_rollback`` hold it for the call (a
    thread that comes second waits); installing and removing hooks take it too. Re-entrant: code on a guarded
    call's own thread (a streamer, a logits processor) may call ``generate`` again; that call runs unguarded."""
    with _MODEL_LOCKS_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def _own_custom_generate(kwargs: dict) -> bool:
    """The call runs repguard's ``custom_generate``, which installs and runs a guard of its own."""
    fn = kwargs.get("custom_generate")
    return callable(fn) and getattr(fn, "__module__", None) == "repguard.hf.generate"


def guard(model, neuron_map: NeuronMap | str | None = None, config: GuardConfig | dict | None = None, **kwargs) -> Guard:
    """Install the guard's hooks on ``model``; use as ``with guard(model, nmap, cfg) as g: model.generate(...)``.

    ``neuron_map`` is a ``NeuronMap``, a path, None to use the shipped map of the model's name, or False for
    the token-level guard (no map: detection, penalties, stop and rollback, without the neuron step).
    Hooks are removed on exit, exceptions included; ``g.reports`` holds one report per row.
    """
    return Guard(model, neuron_map, config, **kwargs)
