"""Property: a neuron map file mutated at random either loads as a valid map or is refused with a
``RepGuardError``; it never raises anything else, and a map that loads is safe for the runtime to use."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from repguard.errors import RepGuardError
from repguard.neuron_map import META_KEY, NeuronMap
from test_neuron_map import make_map

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def valid_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return make_map(num_selected=3, num_stored=6)[0].save(Path(tmp) / "m.safetensors").read_bytes()


def _load(data: bytes) -> NeuronMap | RepGuardError:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        path.write_bytes(data)
        try:
            return NeuronMap.load(path)
        except RepGuardError as exc:
            return exc


def _assert_usable(nmap: NeuronMap) -> None:
    """What the runtime relies on: indexes in range and unique, finite statistics, a non-empty selection."""
    m = nmap.meta
    assert 0 < m.num_selected <= len(nmap) == m.num_stored
    assert int(nmap.layer.min()) >= 0 and int(nmap.layer.max()) < m.num_layers
    assert int(nmap.neuron.min()) >= 0 and int(nmap.neuron.max()) < m.intermediate_size
    assert len(set(zip(nmap.layer.tolist(), nmap.neuron.tolist()))) == len(nmap)
    for name in ("score", "mean_before", "std_before", "mean_after", "std_after"):
        assert bool(torch.isfinite(getattr(nmap, name)).all()), name
    assert bool((nmap.std_before >= 0).all()) and bool((nmap.std_after >= 0).all())
    assert m.split_half_jaccard is None or math.isfinite(m.split_half_jaccard)
    nmap.summary()
    nmap.selected().by_layer()
    control = nmap.random_control()
    if control is not None:
        assert all(0 <= x < m.num_layers for x in control.layer.tolist())
        assert all(0 <= x < m.intermediate_size for x in control.neuron.tolist())


byte_edits = st.lists(
    st.tuples(st.sampled_from(["set", "insert", "delete", "truncate"]), st.floats(0, 1, exclude_max=True),
              st.integers(0, 255)),
    min_size=1, max_size=6,
)


@FUZZ
@given(edits=byte_edits)
def test_random_byte_edits_never_escape_as_another_exception(valid_bytes, edits):
    data = bytearray(valid_bytes)
    for kind, where, value in edits:
        if not data:
            break
        i = int(where * len(data))
        if kind == "set":
            data[i] = value
        elif kind == "insert":
            data.insert(i, value)
        elif kind == "delete":
            del data[i]
        else:
            del data[i:]
    result = _load(bytes(data))
    if isinstance(result, NeuronMap):
        _assert_usable(result)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
META_FIELDS = ["format_version", "model_name", "architecture", "num_layers", "intermediate_size", "hook_point",
               "quantity", "fingerprint", "score_kind", "num_selected", "num_stored", "split_half_jaccard",
               "calibration", "repguard_version", "created", "unknown_field"]
TENSOR_NAMES = ["layer", "neuron", "score", "mean_before", "std_before", "mean_after", "std_after",
                "random_layer", "random_neuron", "score_matrix", "fingerprint_weights", "payload"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]
SPECIAL = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e30, 999.0, 3.0, -999.0]

tensor_edits = st.lists(
    st.one_of(
        st.tuples(st.just("meta"), st.sampled_from(META_FIELDS), json_values),
        st.tuples(st.just("drop_meta"), st.sampled_from(META_FIELDS), st.none()),
        st.tuples(st.just("dtype"), st.sampled_from(TENSOR_NAMES), st.sampled_from(DTYPES)),
        st.tuples(st.just("value"), st.sampled_from(TENSOR_NAMES), st.tuples(st.integers(0, 30), st.sampled_from(SPECIAL))),
        st.tuples(st.just("shape"), st.sampled_from(TENSOR_NAMES), st.integers(-3, 3)),
        st.tuples(st.just("drop"), st.sampled_from(TENSOR_NAMES), st.none()),
    ),
    min_size=1, max_size=4,
)


def _apply(tensors: dict[str, torch.Tensor], meta: dict, edit) -> None:
    kind, name, arg = edit
    if kind == "meta":
        meta[name] = arg
    elif kind == "drop_meta":
        meta.pop(name, None)
    elif kind == "drop":
        tensors.pop(name, None)
    else:
        t = tensors.get(name, torch.zeros(4))
        if kind == "dtype":
            t = t.to(arg)
        elif kind == "value" and t.numel():
            t = t.clone().flatten()
            t[arg[0] % t.numel()] = arg[1] if t.dtype.is_floating_point else int(max(-100, min(100, arg[1])))
        elif kind == "shape":
            t = t.flatten()
            t = t[: max(0, t.numel() + arg)] if arg < 0 else torch.cat([t, t[:arg]])
        tensors[name] = t.contiguous()


@FUZZ
@given(edits=tensor_edits)
def test_random_metadata_and_tensor_edits_never_escape_as_another_exception(valid_bytes, edits):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        path.write_bytes(valid_bytes)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()[META_KEY])
        tensors = load_file(str(path))
        for edit in edits:
            _apply(tensors, meta, edit)
        save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
        data = path.read_bytes()
    result = _load(data)
    if isinstance(result, NeuronMap):
        _assert_usable(result)
