"""Neuron map files: round-trip, selection, and every kind of bad input a user can hand repguard."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from repguard.errors import CorruptMapError, MapMismatchError, MapVersionError
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


def test_a_saved_map_gets_the_permissions_of_any_file_the_user_writes(tmp_path):
    """A map is shared (shipped in neuron_maps/, read by a server under another user): it is written with the
    umask's permissions, not the 0600 of a private temporary file."""
    import os
    import stat

    nmap, _ = make_map()
    old = os.umask(0o022)
    try:
        path = nmap.save(tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


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


def test_a_map_whose_metadata_was_edited_to_another_shape_is_refused_though_its_fingerprint_matches(tmp_path):
    """Layers or width edited in the metadata (the tensors made to agree) keep the shape fingerprint, so the
    map passed the fingerprint check and indexed outside the model (an IndexError from inside the guard)."""
    path = make_map()[0].save(tmp_path / "m.safetensors")

    def more_layers(raw):
        d = json.loads(raw[META_KEY])
        d["num_layers"] = LAYERS + 2
        return {META_KEY: json.dumps(d)}

    _rewrite(path, meta=more_layers, tensors=lambda t: t.pop("score_matrix", None))
    edited = NeuronMap.load(path)  # consistent in itself
    model = Fingerprint.of("llama", LAYERS, WIDTH, 4, 10, torch.linspace(0.5, 1.5, 16))
    edited.meta = edited.meta.model_copy(update={"fingerprint": model.config})
    with pytest.raises(MapMismatchError, match=f"metadata says {LAYERS + 2} layers x {WIDTH} neurons, the model has "
                                                f"{LAYERS} x {WIDTH}"):
        edited.check_model(model)


def test_a_map_records_its_dtype_and_a_model_in_another_dtype_gets_one_warning(tmp_path, caplog):
    import logging

    nmap, _ = make_map()
    nmap.meta = nmap.meta.model_copy(update={"calibration": nmap.meta.calibration.model_copy(
        update={"dtype": "bfloat16"})})
    back = NeuronMap.load(nmap.save(tmp_path / "bf16.safetensors"))
    assert back.meta.calibration.dtype == "bfloat16"
    weights = torch.linspace(0.5, 1.5, 16)
    fp32 = Fingerprint.of("llama", 1, 1, 1, 1, weights)
    assert fp32.dtype == "float32"  # the model's dtype, read from the weights the fingerprint takes
    with caplog.at_level(logging.WARNING, logger="repguard"):
        for _ in range(3):
            back.check_model(Fingerprint("abc123", weights, fp32.dtype), where="model 'toy'")
        back.check_model(Fingerprint("abc123", weights, "bfloat16"))  # its own dtype: silent
        back.check_model(Fingerprint("abc123", weights))  # dtype unknown (a shape-only check): silent
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "calibrated in bfloat16" in said[0] and "float32" in said[0]
    assert "the guard works" in said[0]


def test_a_map_written_before_maps_recorded_their_dtype_still_loads_and_never_warns(tmp_path, caplog):
    import logging

    nmap, _ = make_map()
    path = nmap.save(tmp_path / "old.safetensors")

    def without_dtype(raw):
        d = json.loads(raw[META_KEY])
        d["calibration"].pop("dtype", None)
        return {META_KEY: json.dumps(d)}

    _rewrite(path, meta=without_dtype)
    old = NeuronMap.load(path)
    assert old.meta.calibration.dtype is None and "dtype not recorded" in old.summary()
    with caplog.at_level(logging.WARNING, logger="repguard"):
        old.check_model(Fingerprint("abc123", torch.linspace(0.5, 1.5, 16), "bfloat16"))
    assert not caplog.records


# -- every corrupt map a user can hand repguard, as a file: each is refused with a message naming what ----------
def _set(name, value):
    return lambda t, m: t.__setitem__(name, value(t) if callable(value) else value)


def _edit(name, index, value):
    def edit(t, m):
        t[name] = t[name].clone()
        t[name][index] = value
    return edit


def _meta(**changes):
    return lambda t, m: m.update(changes)


def _empty(t, m):
    for name in ("layer", "neuron", "score", "mean_before", "std_before", "mean_after", "std_after"):
        t[name] = t[name][:0].clone()
    m.update(num_selected=0, num_stored=0)


def _duplicate(t, m):
    for name in ("layer", "neuron"):
        t[name] = t[name].clone()
        t[name][1] = t[name][0]


def _drop(name):
    return lambda t, m: t.pop(name)


BAD_MAPS = [
    ("duplicate_entry", _duplicate, "duplicate"),
    ("layer_float", _set("layer", lambda t: t["layer"].float() + 0.7), "'layer' must hold signed integers"),
    ("layer_bool", _set("layer", lambda t: t["layer"] > 0), "'layer' must hold signed integers"),
    ("layer_uint8", _set("layer", lambda t: t["layer"].to(torch.uint8)), "'layer' must hold signed integers"),
    ("neuron_float64", _set("neuron", lambda t: t["neuron"].double()), "'neuron' must hold signed integers"),
    ("neuron_uint8", _set("neuron", lambda t: t["neuron"].to(torch.uint8)), "'neuron' must hold signed integers"),
    ("layer_negative", _edit("layer", 0, -1), "layer index out of range"),
    ("layer_too_big", _edit("layer", 0, LAYERS + 5), "layer index out of range"),
    ("neuron_too_big", _edit("neuron", 2, WIDTH), "neuron index out of range"),
    ("layer_2d", _set("layer", lambda t: t["layer"][None]), "'layer' has shape"),
    ("score_int", _set("score", lambda t: (t["score"] * 10).to(torch.int32)), "'score' must hold floats"),
    ("score_bool", _set("score", lambda t: t["score"] > 0), "'score' must hold floats"),
    ("mean_before_int", _set("mean_before", lambda t: t["mean_before"].to(torch.int64)), "'mean_before' must hold floats"),
    ("score_float8", _set("score", lambda t: t["score"].to(torch.float8_e4m3fn)), "'score' must hold floats"),
    ("std_before_float8", _set("std_before", lambda t: t["std_before"].to(torch.float8_e5m2)), "'std_before' must hold"),
    ("score_nan", _edit("score", 0, float("nan")), "'score' contains NaN"),
    ("score_inf", _edit("score", 1, float("inf")), "'score' contains NaN or infinite"),
    ("mean_before_nan", _edit("mean_before", 0, float("nan")), "'mean_before' contains NaN"),
    ("std_before_inf", _edit("std_before", 0, float("inf")), "'std_before' contains NaN"),
    ("mean_after_neg_inf", _edit("mean_after", 3, float("-inf")), "'mean_after' contains NaN"),
    ("std_after_nan", _edit("std_after", 2, float("nan")), "'std_after' contains NaN"),
    ("std_before_negative", _edit("std_before", 0, -0.5), "'std_before' has negative standard deviations"),
    ("std_after_negative", _edit("std_after", 1, -1e-3), "'std_after' has negative standard deviations"),
    ("empty_map", _empty, "empty"),
    ("num_selected_zero", _meta(num_selected=0), "num_selected is 0"),
    ("num_selected_over_stored", _meta(num_selected=11), "num_selected 11 > stored"),
    ("num_stored_disagrees", _meta(num_stored=9, num_selected=4), "has shape"),
    ("random_layer_999", _edit("random_layer", 0, 999), "random_layer index out of range"),
    ("random_layer_negative", _edit("random_layer", 1, -3), "random_layer index out of range"),
    ("random_neuron_too_big", _edit("random_neuron", 0, WIDTH + 1), "random_neuron index out of range"),
    ("random_neuron_wrong_length", _set("random_neuron", lambda t: t["random_neuron"][:-1].clone()), "one length"),
    ("random_layer_float", _set("random_layer", lambda t: t["random_layer"].float()), "'random_layer' must hold"),
    ("random_layer_alone", _drop("random_neuron"), "stored together"),
    ("fingerprint_weights_2d", _set("fingerprint_weights", lambda t: t["fingerprint_weights"].view(4, 4)), "fingerprint_weights has shape"),
    ("fingerprint_weights_empty", _set("fingerprint_weights", torch.zeros(0)), "fingerprint_weights has shape"),
    ("fingerprint_weights_too_long", _set("fingerprint_weights", torch.ones(65)), "fingerprint_weights has shape"),
    ("fingerprint_weights_nan", _edit("fingerprint_weights", 3, float("nan")), "'fingerprint_weights' contains NaN"),
    ("fingerprint_weights_int", _set("fingerprint_weights", torch.ones(16, dtype=torch.int32)), "'fingerprint_weights' must hold floats"),
    ("score_matrix_nan", _edit("score_matrix", (0, 0), float("nan")), "'score_matrix' contains NaN"),
    ("score_matrix_int", _set("score_matrix", torch.zeros(LAYERS, WIDTH, dtype=torch.int32)), "'score_matrix' must hold floats"),
    ("score_matrix_shape", _set("score_matrix", torch.zeros(LAYERS + 1, WIDTH)), "score_matrix has shape"),
    ("unknown_tensor", _set("payload", torch.zeros(3)), "unknown tensors: payload"),
    ("unknown_architecture", _meta(architecture="transformer9000"), "architecture 'transformer9000' is not known"),
    ("unknown_hook_point", _meta(hook_point="x"), "hook_point 'x'"),
    ("hook_point_of_another_architecture", _meta(hook_point="transformer.h.{L}.mlp.act:output"), "not the llama hook point"),
    ("split_half_jaccard_nan", _meta(split_half_jaccard=float("nan")), "split_half_jaccard"),
    ("split_half_jaccard_above_one", _meta(split_half_jaccard=1.5), "split_half_jaccard"),
    ("calibration_seconds_inf", _meta(calibration={"seconds": float("inf")}), "calibration.seconds"),
    ("num_layers_zero", _meta(num_layers=0), "num_layers"),
    ("num_layers_string", _meta(num_layers="many"), "num_layers"),
    ("missing_tensor", _drop("std_after"), "missing tensors: std_after"),
]


@pytest.fixture(scope="module")
def valid_map_file(tmp_path_factory):
    return make_map()[0].save(tmp_path_factory.mktemp("maps") / "valid.safetensors")


def test_the_base_of_the_corrupt_cases_is_valid(valid_map_file):
    assert len(NeuronMap.load(valid_map_file)) == 10


@pytest.mark.parametrize("mutate,message", [c[1:] for c in BAD_MAPS], ids=[c[0] for c in BAD_MAPS])
def test_corrupt_map_file_is_refused_naming_the_problem(valid_map_file, tmp_path, mutate, message):
    from safetensors import safe_open

    with safe_open(str(valid_map_file), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    tensors = load_file(str(valid_map_file))
    mutate(tensors, meta)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={META_KEY: json.dumps(meta)})
    with pytest.raises(CorruptMapError) as err:
        NeuronMap.load(path)
    assert message in str(err.value) and str(path) in str(err.value), str(err.value)


def test_shipped_maps_pass_every_check():
    from repguard.maps import SHIPPED

    files = sorted(SHIPPED.glob("*.safetensors"))
    assert {p.stem for p in files} >= {"smollm2-135m", "gemma3-270m"}
    for path in files:
        assert len(NeuronMap.load(path).selected()) > 0, path


def test_a_model_found_by_shape_gets_the_map_of_its_own_weights_among_maps_of_that_shape(tmp_path, monkeypatch,
                                                                                          capsys):
    """Two fine-tunes of one shape, a map for each in the map path, the model in a renamed folder: the lookup by
    shape picks the map its weights fit (it took the first in name order, which the weight check then refused)."""
    from conftest import tiny_folder
    from repguard.cli import main
    from repguard.hf.introspect import fingerprint
    from repguard.hf.models import load_model
    from repguard.maps import find_map
    from serve_support import make_random_map

    maps = tmp_path / "maps"
    maps.mkdir()
    a = tiny_folder(tmp_path / "checkpoint-a", seed=0)
    b = tiny_folder(tmp_path / "checkpoint-b", seed=0, edit=lambda m: m.model.norm.weight.mul_(3))
    for folder in (a, b):
        model, _, name = load_model(str(folder))
        make_random_map(model, name, maps / f"{name}-map.safetensors")
    monkeypatch.setenv("REPGUARD_MAP_PATH", str(maps))
    renamed = b.rename(tmp_path / "run2-final")
    model, _, _ = load_model(str(renamed))
    fp = fingerprint(model)
    assert find_map("run2-final", shape_key=fp.config).meta.model_name == "checkpoint-a", "name order, no weights"
    assert find_map("run2-final", shape_key=fp.config, fits=lambda m: m.fits_weights(fp)).meta.model_name == \
        "checkpoint-b"
    capsys.readouterr()
    rc = main(["generate", "--model", str(renamed), "--prompt", "t5 t6", "--max-new-tokens", "3", "--no-rollback",
               "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["report"] is not None
