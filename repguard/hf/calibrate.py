"""Offline calibration: find a model's repetition neurons with the procedure of Hiraoka & Inui (2024).

1. Texts: BOS, then ``prompt_tokens`` sampled tokens (temperature 1.0, the model's generation-config
   top-k/top-p as transformers' ``generate(do_sample=True)`` applies them), then ``greedy_tokens``
   greedy tokens; a text ends early at EOS. A text is kept iff the paper's detector (n=10, r=100,
   k=3, equal spacing) finds a repeat whose second occurrence p2 lies after position
   ``min_second_occurrence`` (positions count from the BOS at 0).
2. Onset s = p2 - 1; windows ``[s - 30, s)`` (before) and ``[s, s + 30)`` (after), clipped to the text.
3. One teacher-forced pass per batch of kept texts records the activation module's output
   (``act(gate_proj(x))`` for gated MLPs) with forward hooks.
4. score = pooled mean over all ``after`` positions - pooled mean over all ``before`` positions,
   ranked globally across layers; negative scores are never selected.

Generation stops early for a text whose decision is final, which changes no decision: the detector's
first hit on a prefix is its first hit on the whole text (a hit at start i depends on tokens up to
i + n only), so a text is dropped as soon as its first hit has p2 <= 50, and a kept text stops once it
holds the 30 tokens after its onset (activations are causal: later tokens change none of them).

Each text's sampled prefix uses its own random stream, seeded from (seed, text index), so the same seed
and dtype give the same texts and the same map; the batch size can only matter through floating-point
differences between batched matrix products. That also makes a stopped run resumable: every text's
decision goes to a journal (``repguard.calibration.TextJournal``) as soon as it is final, and a resumed
run generates only the texts the journal lacks.

This module drives the model (generation, the activation pass, the deactivation test, their hooks);
the settings, the records, the journal and the score's arithmetic are framework-free, in
``repguard.calibration``.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ..calibration import (
    HELDOUT_OFFSET, CalibrationError, CalibrationSettings, GenerationStats, OnsetWindowStats, PassLog, ProgressLog,
    RepetitiveText, TextDecision, TextJournal, check_scores, parse_select, random_control, selection_counts,
    split_half_jaccard, top_set,
)
from ..detect import LoopDetector, Repetition
from ..neuron_map import CalibrationInfo, NeuronMap, map_from_scores
from ..runtime import flat_index, switch_off, token_id_list
from .introspect import act_modules, arch_of, fingerprint, shape_of, weight_digest
from .models import input_device

log = logging.getLogger("repguard")


# -- repetitive texts ------------------------------------------------------------------------------


def _text_generator(seed: int, index: int) -> torch.Generator:
    # the CPU generator (mt19937) keeps 32 bits of its seed: mix seed and index within them
    return torch.Generator().manual_seed((int(index) + int(seed) * 0x9E3779B1) % (1 << 32))


def _sampling_params(model) -> tuple[int, float]:
    cfg = getattr(model, "generation_config", None)
    top_k = getattr(cfg, "top_k", None)
    top_p = getattr(cfg, "top_p", None)
    return (50 if top_k is None else int(top_k)), (1.0 if top_p is None else float(top_p))


def _eos_ids(model, tok) -> set[int]:
    return set(token_id_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                             tok.eos_token_id))


# Why calibration decodes by hand instead of calling ``model.generate``: every text's sampled prefix must
# come from its own random stream (seeded by the text's index), so that the same seed gives the same texts
# whatever the batch size and whichever texts a resumed run still has to generate; ``generate`` draws from
# one global stream for the whole batch. And a row is dropped from the batch (``batch_select_indices``)
# the moment its decision is final, which ``generate`` cannot do: it keeps finished rows decoding padding.
def _sample(logits: torch.Tensor, uniforms: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature-1 sampling with top-k/top-p as ``generate(do_sample=True)`` filters, driven by one given
    uniform per row (inverse CDF) so each row's draw comes from that text's own stream."""
    logits = logits.double()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def _progress(total: int | None, desc: str, enabled: bool, unit: str = "text"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)


@torch.inference_mode()
def _generate_batch(model, bos: int, eos: set[int], indexes: Sequence[int], s: CalibrationSettings,
                    need_after: int, on_decision: Callable[[TextDecision], None]) -> None:
    """Generate the texts of ``indexes`` together; ``on_decision`` gets each text's decision once it is final."""
    from transformers import DynamicCache

    b = len(indexes)
    dev = input_device(model)
    top_k, top_p = _sampling_params(model)
    uniforms = torch.stack([torch.rand(max(1, s.prompt_tokens), generator=_text_generator(s.seed, i), dtype=torch.float64)
                            for i in indexes])  # drawn on the CPU: the same texts on every device
    seqs = [[bos] for _ in range(b)]
    detectors = [LoopDetector(s.ngram, s.window, s.min_count, use_suffix=False) for _ in range(b)]
    for det in detectors:
        det.update(bos)
    hits: list[Repetition | None] = [None] * b
    repeated = [False] * b
    active = list(range(b))
    cache = DynamicCache()
    inp = torch.full((b, 1), bos, dtype=torch.long, device=dev)

    def decide(r: int) -> None:
        text = RepetitiveText(indexes[r], seqs[r], hits[r]) if hits[r] is not None else None
        on_decision(TextDecision(indexes[r], repeated[r], len(seqs[r]) - 1, text))

    for step in range(s.prompt_tokens + s.greedy_tokens):
        logits = model(input_ids=inp, past_key_values=cache, use_cache=True).logits[:, -1, :]
        if step < s.prompt_tokens:
            nxt = _sample(logits, uniforms[active, step], top_k, top_p)
        else:
            nxt = logits.argmax(-1)
        nxt = nxt.to(dev)  # under device_map="auto" the logits come from the last GPU, the inputs go to the first
        keep_rows: list[int] = []
        for row, (r, token) in enumerate(zip(active, nxt.tolist())):
            seqs[r].append(token)
            done = token in eos
            event = detectors[r].update(token)
            if event is not None and hits[r] is None and not repeated[r]:
                repeated[r] = True
                p2 = event.onset
                p3 = event.position - s.ngram + 1
                hits[r] = Repetition(tuple(seqs[r][p3 : p3 + s.ngram]), p2 - event.period, p2, p3)
                if p2 <= s.min_second_occurrence:
                    hits[r] = None  # first hit too early: the text can never qualify
                    done = True
            if s.early_stop and hits[r] is not None and len(seqs[r]) >= hits[r].p2 + need_after:
                done = True
            if done:
                decide(r)
            else:
                keep_rows.append(row)
        if not keep_rows:
            return
        if len(keep_rows) < len(active):
            sel = torch.tensor(keep_rows, dtype=torch.long, device=dev)
            cache.batch_select_indices(sel)
            nxt = nxt[sel]
            active = [active[row] for row in keep_rows]
        inp = nxt.unsqueeze(-1)
    for r in active:  # the token budget is spent
        decide(r)


def journal_header(model, tok, name: str, settings: CalibrationSettings, source: str | None = None) -> dict:
    """What decides the texts: a journal is resumed only by a run that would generate the same ones.

    The model is identified by ``source`` (the resolved folder or file it was loaded from, or its embedded
    name; default ``name``), its shape and ``weight_digest``: two checkpoints in folders of one name, or of
    one shape that differ only outside the final norm, never share a journal."""
    s = settings
    fp = fingerprint(model)
    return {
        "model": name, "source": source if source is not None else name, "shape": fp.config,
        "weight_digest": weight_digest(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "bos": start_token_id(model, tok), "eos": sorted(_eos_ids(model, tok)), "sampling": list(_sampling_params(model)),
        **{k: getattr(s, k) for k in ("seed", "prompt_tokens", "greedy_tokens", "min_second_occurrence", "context",
                                      "ngram", "window", "min_count", "early_stop")},
    }


def start_token_id(model, tok) -> int:
    """The token that starts every calibration prompt (the paper's: BOS alone): the tokenizer's BOS, else the
    model's (Qwen's tokenizers have none, its configs do)."""
    for source in (tok, getattr(model, "generation_config", None), model.config):
        bos = getattr(source, "bos_token_id", None)
        if isinstance(bos, (list, tuple)):
            bos = bos[0] if bos else None
        if bos is not None:
            return int(bos)
    raise CalibrationError(f"{type(model.config).__name__}: neither the tokenizer nor the model names a BOS token, "
                           "and calibration prompts start from it (the paper's prompt is BOS alone); set "
                           "bos_token_id in the model folder's config.json")


def generate_repetitive_texts(model, tok, settings: CalibrationSettings, count: int, first_index: int = 0,
                              need_after: int | None = None, progress: bool = True,
                              desc: str = "repetitive texts", journal: TextJournal | None = None,
                              stream: str = "calibration", log_every: float = 30.0,
                              count_setting: str = "num_texts, --num-texts",
                              ) -> tuple[list[RepetitiveText], GenerationStats]:
    """The first ``count`` qualifying texts in index order (generating at most ``settings.generation_cap``).

    With a ``journal``, each text's decision is appended as soon as it is final, and decisions already in
    it are read back instead of generated: a resumed run returns what an uninterrupted one would."""
    bos = start_token_id(model, tok)
    eos = _eos_ids(model, tok)
    need = settings.context + 1 if need_after is None else need_after  # tokens from p2 on: up to s + context
    cap = settings.generation_cap
    done: dict[int, TextDecision] = journal.done(stream) if journal is not None else {}
    t0 = time.perf_counter()

    limit = first_index + cap  # texts first_index .. limit - 1 may be generated (a kept journal may hold more)

    def frontier() -> int:  # the lowest index not decided yet (at most ``limit``): every text below it is decided
        i = first_index
        while i in done and i < limit:
            i += 1
        return i

    def summary(upto: int) -> tuple[list[RepetitiveText], GenerationStats]:
        """The kept texts and counts over the decided texts below ``upto``, cut after the ``count``-th kept."""
        st, kept = GenerationStats(), []
        for i in range(first_index, upto):
            d = done[i]
            st.generated += 1
            st.with_repeat += d.with_repeat
            st.tokens_decoded += d.tokens_decoded
            if d.text is not None:
                kept.append(d.text)
                if len(kept) == count:
                    break
        st.kept = len(kept)
        return kept, st

    first_stats = summary(frontier())[1]
    first_stats.resumed = sum(first_index <= i < limit for i in done)
    if done:
        log.warning("%s: resuming from %s: %d texts already decided (%d kept); start over with --no-resume",
                    desc, journal.path, len(done), sum(d.text is not None for d in done.values()))
    plog = ProgressLog(desc, count, cap, log_every, done, count_setting)
    bar = _progress(count, desc, progress)
    bar.update(min(first_stats.kept, count))

    def on_decision(d: TextDecision) -> None:
        if journal is not None:
            journal.record(stream, d)
        else:
            done[d.index] = d
        plog.add(d)

    try:
        while True:
            kept, st = summary(frontier())
            bar.update(max(0, min(st.kept, count) - bar.n))
            if st.kept >= count or frontier() >= limit:
                break
            indexes, i = [], frontier()
            while len(indexes) < settings.batch_size and i < limit:
                if i not in done:
                    indexes.append(i)
                i += 1
            _generate_batch(model, bos, eos, indexes, settings, need, on_decision)
            bar.set_postfix(generated=len(done))
    finally:
        bar.close()
    kept, stats = summary(frontier())
    stats.resumed = first_stats.resumed
    stats.seconds = time.perf_counter() - t0
    plog.log(final=stats)
    return kept, stats


# -- activations around the onset -------------------------------------------------------------------


@contextmanager
def recording(model, stats: OnsetWindowStats, batch: dict) -> Iterator[None]:
    """Forward hooks that feed each layer's act output into ``stats`` (``batch`` holds onsets/lengths/halves)."""
    handles = []
    for layer, module in enumerate(act_modules(model)):
        def hook(_mod, _inp, out, layer=layer):
            stats.add(layer, out, batch["onsets"], batch["lengths"], batch["halves"])
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def collect_onset_stats(model, tok, texts: Sequence[RepetitiveText], settings: CalibrationSettings,
                        progress: bool = True, log_every: float = 30.0) -> OnsetWindowStats:
    """One teacher-forced pass per batch of texts (right-padded: causal attention never sees the pads); progress
    logged at INFO every ``log_every`` seconds."""
    num_layers, width = shape_of(model)
    stats = OnsetWindowStats(num_layers, width, settings.context)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bar = _progress(len(texts), "activations", progress)
    plog = PassLog("activation pass", len(texts), log_every)
    try:
        for start in range(0, len(texts), settings.activation_batch_size):
            chunk = list(range(start, min(start + settings.activation_batch_size, len(texts))))
            seqs = [texts[i].ids[: texts[i].onset + settings.context + 1] for i in chunk]
            longest = max(len(q) for q in seqs)
            ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), longest), dtype=torch.long)
            for row, q in enumerate(seqs):
                ids[row, : len(q)] = torch.tensor(q)
                mask[row, : len(q)] = 1
            batch = {"onsets": [texts[i].onset for i in chunk], "lengths": [len(q) for q in seqs],
                     "halves": [i % 2 for i in chunk]}
            dev = input_device(model)
            with recording(model, stats, batch):  # no full-vocab logits:
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False, logits_to_keep=1)
            bar.update(len(chunk))
            plog.add(len(chunk))
    finally:
        bar.close()
    plog.end()
    return stats


# -- the paper's deactivation test ------------------------------------------------------------------


@contextmanager
def zeroed(model, layers: torch.Tensor, neurons: torch.Tensor) -> Iterator[None]:
    """Set the given neurons' act output to 0 at the newest position of every forward pass (paper §1.6)."""
    groups: dict[int, list[int]] = {}
    for layer, neuron in zip(layers.tolist(), neurons.tolist()):
        groups.setdefault(int(layer), []).append(int(neuron))
    modules = act_modules(model)
    handles = []
    for layer, idx in groups.items():
        index = {torch.device("cpu"): torch.tensor(idx, dtype=torch.long)}

        def hook(_mod, _inp, out, index=index):
            on = index.get(out.device)
            if on is None:  # once per device (a layer of a sharded model may live on any GPU)
                on = index[out.device] = index[torch.device("cpu")].to(out.device)
            batch, length, width = out.shape
            newest = torch.arange(batch, device=out.device) * length + length - 1
            switch_off(out, flat_index(newest, on, width), 0.0)
            return out

        handles.append(modules[layer].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def loop_rate(model, tok, prompts: Sequence[Sequence[int]], settings: CalibrationSettings,
              layers: torch.Tensor | None = None, neurons: torch.Tensor | None = None,
              progress: bool = False, desc: str = "deactivation", log_every: float = 30.0) -> float:
    """Share of prompts whose greedy continuation (``deactivation_tokens`` new tokens) makes the paper's
    detector fire on prompt + continuation, with the given neurons zeroed (or none); progress logged at INFO
    every ``log_every`` seconds."""
    from transformers import DynamicCache

    if not prompts:
        return float("nan")
    eos = _eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    looped = 0
    bar = _progress(len(prompts), desc, progress)
    plog = PassLog(desc, len(prompts), log_every, unit="prompts")
    ctx = zeroed(model, layers, neurons) if layers is not None and len(layers) else _nothing()
    with ctx:
        for start in range(0, len(prompts), settings.batch_size):
            chunk = [list(p) for p in prompts[start : start + settings.batch_size]]
            b, longest = len(chunk), max(len(p) for p in chunk)
            ids = torch.full((b, longest), pad, dtype=torch.long)
            mask = torch.zeros((b, longest), dtype=torch.long)
            detectors = []
            for row, p in enumerate(chunk):  # left padding: the newest position is last for every row
                ids[row, longest - len(p):] = torch.tensor(p)
                mask[row, longest - len(p):] = 1
                det = LoopDetector(settings.ngram, settings.window, settings.min_count, use_suffix=False)
                fired = False
                for t in p:
                    fired = det.update(t) is not None or fired
                detectors.append(det)
                if fired:
                    raise CalibrationError("a deactivation prompt already repeats; cut it before its second copy")
            dev = input_device(model)
            ids, mask = ids.to(dev), mask.to(dev)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()
            active = list(range(b))
            inp = ids
            # Decoded by hand, like the texts above, rather than with ``model.generate``: a row leaves the batch
            # (and its KV cache) the step the paper's detector fires on it or it ends, where ``generate`` would
            # keep decoding it with padding, under the zeroing hook, until the slowest row is done; and the
            # detector must see prompt + continuation token by token anyway, which ``generate`` offers only
            # through a stopping criterion doing this same bookkeeping.
            for _ in range(settings.deactivation_tokens):
                logits = model(input_ids=inp, attention_mask=mask, position_ids=positions, past_key_values=cache,
                               use_cache=True, logits_to_keep=1).logits[:, -1, :]
                nxt = logits.argmax(-1).to(dev)
                keep = []
                for row, (r, token) in enumerate(zip(active, nxt.tolist())):
                    if detectors[r].update(token) is not None:
                        looped += 1
                    elif token not in eos:
                        keep.append(row)
                if not keep:
                    break
                sel = torch.tensor(keep, dtype=torch.long, device=dev)
                if len(keep) < len(active):
                    cache.batch_select_indices(sel)
                    active = [active[row] for row in keep]
                mask = torch.cat([mask[sel], torch.ones((len(keep), 1), dtype=torch.long, device=dev)], dim=1)
                positions = positions[sel, -1:] + 1
                inp = nxt[sel].unsqueeze(-1)
            bar.update(b)
            plog.add(b)
    bar.close()
    plog.end()
    return looped / len(prompts)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def deactivation_test(model, tok, nmap: NeuronMap, texts: Sequence[RepetitiveText], settings: CalibrationSettings,
                      progress: bool = True, log_every: float = 30.0) -> list[dict]:
    """Loop rate with none, top-K and random-K neurons zeroed, for each K in ``deactivation_fractions``."""
    prompts = [t.ids[: t.repetition.p2] for t in texts]  # holds the first copy; the model must not write the second
    total = nmap.meta.num_layers * nmap.meta.intermediate_size
    rand_l, rand_n = nmap.extra["random_layer"], nmap.extra["random_neuron"]
    rows = [{"setting": "none", "k": 0, "fraction": 0.0,
             "loop_rate": loop_rate(model, tok, prompts, settings, progress=progress, desc="deactivation: none",
                                    log_every=log_every)}]
    for frac in settings.deactivation_fractions:
        k = min(max(1, round(frac * total)), len(nmap), int(rand_l.numel()))
        top = nmap.top(k)
        for name, layers, neurons in (("top", top.layer, top.neuron), ("random", rand_l[:k], rand_n[:k])):
            rate = loop_rate(model, tok, prompts, settings, layers, neurons, progress=progress,
                             desc=f"deactivation: {name}-{k}", log_every=log_every)
            rows.append({"setting": name, "k": k, "fraction": frac, "loop_rate": rate})
    return rows


# -- the whole procedure --------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    map: NeuronMap
    stats: OnsetWindowStats
    generation: GenerationStats
    heldout: GenerationStats | None = None
    deactivation: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    profile_top: torch.Tensor | None = None  # [2c + 1] mean over the selected neurons
    profile_random: torch.Tensor | None = None
    profile_best: torch.Tensor | None = None  # the top-ranked neuron alone


def calibrate(model, tok, name: str, settings: CalibrationSettings | None = None, progress: bool = True,
              dtype: str | None = None, journal: str | os.PathLike | None = None, resume: bool = True,
              log_every: float = 30.0, source: str | None = None) -> CalibrationResult:
    """Run the paper's calibration on ``model`` and return the neuron map with what the report needs.

    ``journal``: a JSON-lines file that receives every generated text's decision as soon as it is final;
    with ``resume`` (the default) the decisions already in it are read back, so a stopped run continues
    where it stopped and ends with the map an uninterrupted run makes; a journal of another model (by
    ``source``, the resolved path or embedded name the model came from, and a digest of its weights) or of
    other settings is refused. Progress is logged at INFO every ``log_every`` seconds while texts are
    generated. A ``CalibrationError`` says what to change when the statistics cannot make a loadable map
    (no positive score; NaN or infinite activations)."""
    s = settings or CalibrationSettings()
    texts_journal = (TextJournal(journal, journal_header(model, tok, name, s, source), resume)
                     if journal is not None else None)
    try:
        return _calibrate(model, tok, name, s, progress, dtype, texts_journal, log_every)
    finally:
        if texts_journal is not None:
            texts_journal.close()


def _calibrate(model, tok, name: str, s: CalibrationSettings, progress: bool, dtype: str | None,
               journal: TextJournal | None, log_every: float) -> CalibrationResult:
    spec = arch_of(model)
    num_layers, width = shape_of(model)
    total = num_layers * width
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    texts, gen = generate_repetitive_texts(model, tok, s, s.num_texts, progress=progress,
                                           desc="calibration texts", journal=journal, stream="calibration",
                                           log_every=log_every)
    timings["generate"] = gen.seconds
    log.info("kept %d of %d generated texts (%d with a repeat; %d read back from the journal) in %.1f s", gen.kept,
             gen.generated, gen.with_repeat, gen.resumed, gen.seconds)
    if len(texts) < 2:
        raise CalibrationError(
            f"only {len(texts)} of {gen.generated} generated texts repeat with a second occurrence after position "
            f"{s.min_second_occurrence}; raise max_generated (--max-generated) or check that the model loops under greedy decoding"
        )

    t0 = time.perf_counter()
    log.info("activation pass over %d kept texts", len(texts))
    stats = collect_onset_stats(model, tok, texts, s, progress=progress, log_every=log_every)
    timings["activations"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pooled = stats.pooled()
    model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    check_scores(pooled, len(texts), model_dtype)
    num_selected, num_stored = selection_counts(s, total)
    split_half = split_half_jaccard(stats, num_selected)
    random_layer, random_neuron = random_control(s.seed, total, num_stored, width)
    fp = fingerprint(model)
    info = CalibrationInfo(
        ngram=s.ngram, window=s.window, min_count=s.min_count, context=s.context, prompt_tokens=s.prompt_tokens,
        greedy_tokens=s.greedy_tokens, min_second_occurrence=s.min_second_occurrence, seed=s.seed,
        dtype=dtype or model_dtype,
        texts_generated=gen.generated, texts_kept=gen.kept,
        texts_with_repeat=gen.with_repeat, batch_size=s.batch_size, sampling_top_k=_sampling_params(model)[0],
        sampling_top_p=_sampling_params(model)[1], select=s.select, positions="BOS is position 0",
        weight_digest=weight_digest(model),  # the guard checks it against a model in the map's dtype
    )
    meta = {
        "model_name": name, "architecture": spec.family, "hook_point": spec.hook_point, "quantity": spec.computes,
        "fingerprint": fp.config, "split_half_jaccard": split_half, "calibration": info.model_dump(),
    }
    extra = {"random_layer": random_layer, "random_neuron": random_neuron, "fingerprint_weights": fp.weights.float()}
    stat_mats = {k: v.float() for k, v in pooled.items() if k != "score"}
    nmap = map_from_scores(meta, pooled["score"].float(), stat_mats, num_selected, num_stored, extra)
    if nmap.meta.num_selected < num_selected:  # a neuron whose activation does not rise is never selected
        log.warning("select asked for %d neurons, but only %d have a positive score (activation higher after the "
                    "repetition onset than before it): the map selects those %d", num_selected,
                    nmap.meta.num_selected, nmap.meta.num_selected)
    timings["score"] = time.perf_counter() - t0

    sel = nmap.selected()
    rnd = nmap.random_control()
    result = CalibrationResult(
        nmap, stats, gen, timings=timings,
        profile_top=stats.profile(sel.layer, sel.neuron).mean(0) if len(sel) else None,
        profile_random=stats.profile(rnd.layer, rnd.neuron).mean(0) if rnd is not None and len(rnd) else None,
        profile_best=stats.profile(sel.layer[:1], sel.neuron[:1])[0] if len(sel) else None,
    )

    if s.heldout_texts > 0:
        heldout, hstats = generate_repetitive_texts(
            model, tok, s, s.heldout_texts, first_index=HELDOUT_OFFSET, need_after=0, progress=progress,
            desc="held-out texts", journal=journal, stream="heldout", log_every=log_every,
            count_setting="heldout_texts, --heldout",
        )
        timings["heldout_generate"] = hstats.seconds
        result.heldout = hstats
        if heldout:
            t0 = time.perf_counter()
            log.info("deactivation test on %d held-out texts", len(heldout))
            result.deactivation = deactivation_test(model, tok, nmap, heldout, s, progress=progress,
                                                    log_every=log_every)
            timings["deactivation"] = time.perf_counter() - t0
        else:
            log.warning("no held-out text qualified (of %d generated): the deactivation test is skipped; raise "
                        "--max-generated to test the map", hstats.generated)

    timings["total"] = time.perf_counter() - t_all
    calib = nmap.meta.calibration.model_copy(update={
        "seconds": round(timings["total"], 1),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "tokens_decoded": gen.tokens_decoded,
        "texts_resumed": gen.resumed,
        "heldout_kept": result.heldout.kept if result.heldout else 0,
        "heldout_generated": result.heldout.generated if result.heldout else 0,
        "deactivation": result.deactivation,
    })
    nmap.meta = nmap.meta.model_copy(update={"calibration": calib})
    return result


def settings_dict(s: CalibrationSettings) -> dict:
    return asdict(s)


__all__ = [  # the framework-free names are re-exported from repguard.calibration, where they live
    "HELDOUT_OFFSET", "CalibrationError", "CalibrationResult", "CalibrationSettings", "GenerationStats",
    "OnsetWindowStats", "RepetitiveText", "TextDecision", "TextJournal", "calibrate", "collect_onset_stats",
    "deactivation_test", "generate_repetitive_texts", "journal_header", "loop_rate", "parse_select", "top_set",
    "weight_digest", "zeroed",
]
