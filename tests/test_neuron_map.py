"""Neuron map files: round-trip, selection, and every kind of bad input a user can hand repguard."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from repguard.errors import CorruptMapError, MapMismatchError, MapVersionError, RepGuardError
from repguard.neuron_map import META_KEY, Fingerprint, NeuronMap, jaccard, map_from_scores

LAYERS, WIDTH = 3, 8


def make_map(num_selected=4, num_stored=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(LAYERS, WIDTH, generator=g)
    stats = {k: torch.rand(LAYERS, WIDTH, generator=g) for k in ("mean_before", "std_before", "mean_after", "std_after")}
    meta = dict(model_name="toy", architecture="llama", num_layers=LAYERS, intermediate_size=WIDTH,
                hook_point="model.layers.{L}.mlp.act_fn:output", quantity="act(gate)", fingerprint="abc123",
                num_selected=0, num_stored=0)
    extra = {"fingerprint_weights": torch.linspace(0.5, 1.5, 16),
             "random_layer": torch.tensor([0, 1, 2, 0], dtype=torch.int32),
             "random_neuron": torch.tensor([5, 6, 7, 1], dtype=torch.int32)}
    return map_from_scores(meta, score, stats, num_selected, num_stored, extra), score


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    nmap, _ = make_map()
    path = nmap.save(tmp_path / "m.safetensors")
    back = NeuronMap.load(path)
    assert back.meta == nmap.meta
    for name in ("layer", "neuron", "score", "mean_before", "std_before", "mean_after", "std_after"):
        assert torch.equal(getattr(back, name), getattr(nmap, name)), name
    assert set(back.extra) == set(nmap.extra)
    assert torch.equal(back.extra["score_matrix"], nmap.extra["score_matrix"])


def test_ranking_is_global_and_never_selects_a_negative_score():
    nmap, score = make_map(num_selected=1000, num_stored=1000)
    positive = int((score > 0).sum())
    assert len(nmap) == positive and nmap.meta.num_selected == positive
    assert bool((nmap.score > 0).all())
    assert nmap.score.tolist() == sorted(nmap.score.tolist(), reverse=True)
    best = int(score.flatten().argmax())
    assert (int(nmap.layer[0]), int(nmap.neuron[0])) == (best // WIDTH, best % WIDTH)
    assert float(nmap.score[0]) == pytest.approx(float(score.max()))


def test_top_fraction_by_layer_and_selected():
    nmap, _ = make_map(num_selected=4, num_stored=10)
    stored = len(nmap)
    assert len(nmap.selected()) == min(4, stored)
    assert len(nmap.top(2)) == 2 and torch.equal(nmap.top(2).layer, nmap.layer[:2])
    assert len(nmap.top(10_000)) == stored  # capped at what is stored
    assert len(nmap.fraction(0.25)) == min(round(0.25 * LAYERS * WIDTH), stored)
    with pytest.raises(ValueError):
        nmap.top(-1)
    with pytest.raises(ValueError):
        nmap.fraction(1.5)
    groups = nmap.by_layer()
    assert sum(len(v) for v in groups.values()) == stored
    for layer, neurons in groups.items():
        pairs = set(zip(nmap.layer.tolist(), nmap.neuron.tolist()))
        assert all((layer, n) in pairs for n in neurons.tolist())
    assert sum(nmap.counts_per_layer()) == stored
    rnd = nmap.random_control()
    assert len(rnd) == min(nmap.meta.num_selected, 4)
    assert jaccard(nmap, nmap) == 1.0


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CorruptMapError, match="no such"):
        NeuronMap.load(tmp_path / "absent.safetensors")


def test_truncated_file(tmp_path):
    path = make_map()[0].save(tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptMapError, match="m.safetensors"):
        NeuronMap.load(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00\x01not a map at all" * 10)
    with pytest.raises(CorruptMapError):
        NeuronMap.load(path)


def _rewrite(path, tensors=None, meta=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = dict(f.metadata())
    t = load_file(str(path))
    if tensors:
        tensors(t)
    if meta:
        raw = meta(raw)
    save_file(t, str(path), metadata=raw)


def test_unknown_format_version(tmp_path):
    path = make_map()[0].save(tmp_path / "m.safetensors")

    def bump(raw):
        d = json.loads(raw[META_KEY])
        d["format_version"] = 99
        return {META_KEY: json.dumps(d)}

    _rewrite(path, meta=bump)
    with pytest.raises(MapVersionError, match="99"):
        NeuronMap.load(path)


def test_safetensors_without_repguard_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(CorruptMapError, match="not a repguard neuron map"):
        NeuronMap.load(path)


def test_missing_tensor_is_named(tmp_path):
    path = make_map()[0].save(tmp_path / "m.safetensors")
    _rewrite(path, tensors=lambda t: t.pop("std_after"))
    with pytest.raises(CorruptMapError, match="std_after"):
        NeuronMap.load(path)


def test_shape_disagreeing_with_metadata(tmp_path):
    path = make_map()[0].save(tmp_path / "m.safetensors")
    _rewrite(path, tensors=lambda t: t.__setitem__("score", t["score"][:-1].clone()))
    with pytest.raises(CorruptMapError, match="score"):
        NeuronMap.load(path)


def test_score_matrix_shape_disagreeing_with_metadata(tmp_path):
    path = make_map()[0].save(tmp_path / "m.safetensors")
    _rewrite(path, tensors=lambda t: t.__setitem__("score_matrix", torch.zeros(LAYERS + 1, WIDTH)))
    with pytest.raises(CorruptMapError, match="score_matrix"):
        NeuronMap.load(path)


def test_layer_index_out_of_range(tmp_path):
    path = make_map()[0].save(tmp_path / "m.safetensors")

    def bad(t):
        t["layer"] = t["layer"].clone()
        t["layer"][0] = LAYERS + 5

    _rewrite(path, tensors=bad)
    with pytest.raises(CorruptMapError, match="layer index"):
        NeuronMap.load(path)


def test_invalid_metadata_field_is_named(tmp_path):
    path = make_map()[0].save(tmp_path / "m.safetensors")

    def bad(raw):
        d = json.loads(raw[META_KEY])
        d["num_layers"] = "many"
        return {META_KEY: json.dumps(d)}

    _rewrite(path, meta=bad)
    with pytest.raises(CorruptMapError, match="num_layers"):
        NeuronMap.load(path)


def test_map_for_another_model_is_refused():
    nmap, _ = make_map()
    nmap.check_model(Fingerprint("abc123", torch.linspace(0.5, 1.5, 16)))  # its own model: fine
    with pytest.raises(MapMismatchError, match="does not fit"):
        nmap.check_model(Fingerprint("other-shape", torch.linspace(0.5, 1.5, 16)))
    with pytest.raises(MapMismatchError, match="different weights"):
        nmap.check_model(Fingerprint("abc123", -torch.linspace(0.5, 1.5, 16)))


def test_every_bad_input_is_a_repguard_error():
    for cls in (CorruptMapError, MapVersionError, MapMismatchError):
        assert issubclass(cls, RepGuardError)
