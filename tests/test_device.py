"""``--device`` and ``--dtype``: device names checked before any model loads, calibration's tensors on the model's
device (checked on ``meta``, where a CPU tensor cannot pass unnoticed), and a map's recorded dtype compared when
it meets a model in another dtype (a warning, once; the guard still works)."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import tiny_model
from repguard.cli import main
from repguard.commands import checks
from repguard.config import GuardConfig
from repguard.detect import Repetition
from repguard.errors import ConfigError
from repguard.hf.calibrate import (
    CalibrationSettings, RepetitiveText, collect_onset_stats, generate_repetitive_texts, loop_rate,
)
from repguard.hf.introspect import fingerprint
from repguard.neuron_map import NeuronMap
from serve_support import make_tiny_model


class TinyTok:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("device") / "tiny")


def test_device_names_are_checked_against_the_machine(monkeypatch):
    assert checks.device("--device", "cpu") == "cpu" and checks.device("--device", "AUTO") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--device cuda: no CUDA GPU is available.*--device cpu"):
        checks.device("--device", "cuda")
    for bad in ("tpu", "cuda:x", "gpu0", ""):
        with pytest.raises(ConfigError, match="--device.*cpu, cuda, cuda:N or auto"):
            checks.device("--device", bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert checks.device("--device", "cuda:1") == "cuda:1" and checks.device("--device", "cuda") == "cuda"
    with pytest.raises(ConfigError, match=r"--device cuda:2: this machine has 2 CUDA GPU\(s\)"):
        checks.device("--device", "cuda:2")


@pytest.mark.parametrize("command", ["generate", "calibrate"])
def test_cuda_without_a_gpu_is_a_one_line_cli_error_before_the_model_loads(command, folder, tmp_path, capsys,
                                                                           monkeypatch):
    import repguard.hf.models as models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    extra = ["--out", str(tmp_path / "m.safetensors")] if command == "calibrate" else []
    assert main([command, "--model", str(folder), "--device", "cuda", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("repguard: error: --device cuda: no CUDA GPU is available")


def test_load_model_places_the_model_and_device_map_auto_loads_where_it_fits(folder):
    from repguard.hf.models import input_device, load_model

    model, _, _ = load_model(str(folder), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and input_device(model).type == "cpu"
    auto, _, _ = load_model(str(folder), device="auto")  # accelerate's device_map: all on the CPU here
    assert {p.device.type for p in auto.parameters()} == {"cpu"} and input_device(auto).type == "cpu"
    ids = torch.tensor([[1, 5, 6]])
    plain, _, _ = load_model(str(folder), device="cpu")
    assert torch.equal(auto.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
                       plain.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))


class _Seen(Exception):
    """Raised by the probe once it has seen the first forward's inputs."""


def _devices_of_first_forward(model, run) -> set[str]:
    """The devices of every tensor the first forward of ``run()`` receives."""
    seen: set[str] = set()

    def probe(_mod, args, kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                seen.add(value.device.type)
        raise _Seen

    handle = model.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        with pytest.raises(_Seen):
            run()
    finally:
        handle.remove()
    return seen


def test_every_calibration_phase_feeds_the_model_on_its_own_device():
    model = tiny_model("llama").to("meta")  # a CPU tensor reaching it would show up as "cpu"
    s = CalibrationSettings(num_texts=2, batch_size=2, heldout_texts=0)
    text = RepetitiveText(0, [1] + list(range(3, 90)), Repetition(tuple(range(7, 17)), 5, 40, 75))
    phases = {
        "generation": lambda: generate_repetitive_texts(model, TinyTok(), s, 2, progress=False),
        "activation pass": lambda: collect_onset_stats(model, TinyTok(), [text], s, progress=False),
        "deactivation test": lambda: loop_rate(model, TinyTok(), [text.ids[:30], text.ids[:20]], s),
    }
    for phase, run in phases.items():
        assert _devices_of_first_forward(model, run) == {"meta"}, phase


def test_a_bfloat16_map_records_its_dtype_and_warns_once_for_a_float32_model(folder, tmp_path, capsys, caplog):
    from repguard.hf import guard
    from repguard.hf.models import load_model

    out = tmp_path / "bf16.safetensors"
    code = main(["calibrate", "--model", str(folder), "--out", str(out), "--dtype", "bfloat16", "--num-texts", "4",
                 "--heldout", "0", "--batch-size", "8", "--select", "4", "--no-report", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    nmap = NeuronMap.load(out)
    assert nmap.meta.calibration.dtype == "bfloat16"
    assert "bfloat16" in nmap.summary()

    model, _, _ = load_model(str(folder), dtype="float32")
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(1))

    def gen():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                              pad_token_id=0)

    plain = gen()
    with caplog.at_level(logging.WARNING, logger="repguard"):
        with guard(model, nmap, GuardConfig.from_preset("monitor")):
            assert torch.equal(gen(), plain)
        with guard(model, nmap, GuardConfig.from_preset("paper")) as g:  # the guard works across dtypes
            gen()
        assert g.errors == 0 and all(r.tokens_under_intervention > 0 for r in g.reports)
    warnings = [r.getMessage() for r in caplog.records if "calibrated in bfloat16" in r.getMessage()]
    assert len(warnings) == 1 and "float32" in warnings[0]

    caplog.clear()
    bf16, _, _ = load_model(str(folder), dtype="bfloat16")
    with caplog.at_level(logging.WARNING, logger="repguard"):
        guard(bf16, nmap).remove()  # the dtype it was made in: nothing to say
    assert not [r for r in caplog.records if "calibrated in" in r.getMessage()]


# -- a model spread over devices (device_map) ---------------------------------------------------------------

def _guarded(model, nmap, cfg, ids, split):
    from repguard.hf import guard

    with guard(model, nmap, cfg) as g:
        if split:  # every layer placed on its own device (here all CPU): the spread-model code path
            g.runtime.place_layers({layer: torch.device("cpu") for layer in range(2)})
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, max_new_tokens=48,
                             do_sample=False)
    return out, g.reports


def test_a_spread_model_is_guarded_exactly_as_a_model_on_one_device():
    """The per-device path (own gather buffers, mirrored row masks, scores copied back per run of layers)
    gives the same tokens and the same reports as the one-device path, for rows that switch off mid-way
    (the default preset on loops of a tiny random model) and for rows off from the start (paper)."""
    from conftest import random_map

    model = tiny_model()
    nmap = random_map(model, num_selected=64, num_stored=64)
    ids = torch.randint(3, 256, (4, 6), generator=torch.Generator().manual_seed(5))
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, max_new_tokens=48,
                           do_sample=False)
    acted = 0
    for preset in ("default", "paper"):
        cfg = GuardConfig.from_preset(preset)
        one, reports_one = _guarded(model, nmap, cfg, ids, split=False)
        spread, reports_spread = _guarded(model, nmap, cfg, ids, split=True)
        assert torch.equal(one, spread), preset
        assert [r.to_dict() for r in reports_one] == [r.to_dict() for r in reports_spread], preset
        acted += sum(r.tokens_under_intervention > 0 for r in reports_spread)
        if preset == "paper":
            assert not torch.equal(spread, plain)  # the spread path does write the neurons
    assert acted > 4  # precondition: some default-preset row switched off on its own, not only paper's


def test_each_layer_of_a_spread_model_gathers_and_writes_on_its_own_device():
    """Layer 1 on a second device (``meta``: a buffer left on the CPU could not pass unnoticed): its
    indexes, gather buffer and row masks live there, the hook runs there, and the guard reads the devices
    from accelerate's hooks the way ``device_map`` places them."""
    from types import SimpleNamespace

    from conftest import random_map
    from repguard.hf.introspect import layer_devices
    from repguard.runtime import GuardRuntime

    model = tiny_model()
    assert layer_devices(model, "cpu") is None  # one device: the shared buffers, no copies
    model.model.layers[1]._hf_hook = SimpleNamespace(execution_device="meta")
    try:
        devices = layer_devices(model, "cpu")
    finally:
        del model.model.layers[1]._hf_hook
    assert devices == {0: torch.device("cpu"), 1: torch.device("meta")}
    nmap = random_map(model, num_selected=64, num_stored=64)
    rt = GuardRuntime(nmap, GuardConfig.from_preset("paper"), max_rows=2, device=torch.device("cpu"))
    rt.place_layers(devices)
    for row in range(2):
        rt.open(row)
    rt.begin_step(torch.tensor([5, 11]), key=(2, 6))
    index, _, gathered, _, _, off, fill = rt._step[1]
    assert {index.device.type, gathered.device.type, off.device.type, fill.device.type} == {"meta"}
    assert rt._step[0][2].device.type == "cpu" and rt._step[0][5].device.type == "cpu"
    assert [len(parts) for _, _, parts in rt._runs] == [1, 1]  # one copy back per device
    act = torch.empty(2, 6, 128, device="meta")
    assert rt.apply_layer(rt.neurons.plans[1], act) is act  # gathers and writes on meta without a device error


def _offload_case(folder, tmp_path, how: str):
    import transformers

    accelerate = pytest.importorskip("accelerate")
    if how == "final norm on disk":  # what device_map="auto" does first when a model does not fit
        device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.rotary_emb": "cpu",
                      "model.norm": "disk", "lm_head": "cpu"}
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), device_map=device_map, offload_folder=str(tmp_path / "offload")).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    return accelerate.cpu_offload(model, execution_device="cpu")  # every weight on meta until its layer runs


@pytest.mark.parametrize("how", ["final norm on disk", "whole model offloaded"])
def test_a_model_with_offloaded_weights_is_guarded_as_the_same_model_in_memory(folder, tmp_path, how):
    """accelerate's offload keeps weights on ``meta`` until their module runs: the map is checked against the
    offloaded final norm's real weight, the row buffers live where the model runs, and the guarded tokens are
    those of the same model in memory, with no fault."""
    import transformers

    from conftest import random_map
    from repguard.hf import guard

    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    nmap = random_map(base, num_selected=64, num_stored=64)
    nmap.meta = nmap.meta.model_copy(update={"fingerprint": fingerprint(base).config})
    nmap.extra["fingerprint_weights"] = fingerprint(base).weights
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    kw = dict(attention_mask=torch.ones_like(ids), pad_token_id=0, max_new_tokens=24, do_sample=False)
    cfg = GuardConfig.from_preset("paper")
    with guard(base, nmap, cfg) as g:
        reference = base.generate(ids, **kw)
    model = _offload_case(folder, tmp_path, how)
    with guard(model, nmap, cfg) as g:
        out = model.generate(ids, **kw)
    assert g.errors == 0 and torch.equal(out, reference)
    assert not torch.equal(out, base.generate(ids, **kw)), "the neurons were switched off, as in memory"
