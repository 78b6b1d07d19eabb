"""GuardConfig validation, presets and serialisation."""

import pytest

from repguard.config import GuardConfig
from repguard.errors import ConfigError


def test_defaults_validate_and_round_trip():
    cfg = GuardConfig()
    assert GuardConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad, field",
    [({"k": 0}, r"\bk: "), ({"ngram": "ten"}, "ngram"), ({"unknown_knob": 1}, "unknown_knob"),
     ({"deactivate_value": "half"}, "deactivate_value"), ({"window": 5}, "window"), ({"layers": []}, "layers"),
     ({"penalty_base": 0.5}, "penalty_base"), ({"preset": "fast"}, "preset")],
)
def test_bad_values_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        GuardConfig.from_dict(bad)


def test_presets():
    assert not GuardConfig.from_preset("monitor").deactivate
    assert GuardConfig.from_preset("paper").always_on
    assert not GuardConfig.from_preset("off").enabled
    cfg = GuardConfig.from_dict({"preset": "monitor", "k": 5})
    assert cfg.k == 5 and not cfg.deactivate and cfg.preset == "custom"


def test_non_object_is_rejected():
    with pytest.raises(ConfigError):
        GuardConfig.from_dict(["k", 1])


@pytest.mark.parametrize("field", ["monitor_gate", "penalty_max", "min_copies", "penalty_multiplier", "penalty_base"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        GuardConfig.from_dict({field: value})


@pytest.mark.parametrize("bad, field", [({"k": "64"}, r"\bk: "), ({"enabled": "false"}, "enabled"),
                                        ({"layers": [True]}, "layers"), ({"ngram": 10.0}, "ngram")])
def test_strict_mode_refuses_coercion(bad, field):
    with pytest.raises(ConfigError, match=field):
        GuardConfig.from_dict(bad, strict=True)


def test_strict_mode_accepts_json_shapes():
    cfg = GuardConfig.from_dict({"preset": "monitor", "layers": [0, 1], "k": 3, "min_copies": 2}, strict=True)
    assert cfg.layers == (0, 1) and cfg.k == 3 and cfg.min_copies == 2.0 and not cfg.deactivate


@pytest.mark.parametrize("bad, field", [({"k": 0}, r"\bk: "), ({"unknown_knob": 1}, "unknown_knob"),
                                        ({"window": 5}, "window"), ({"penalty_base": float("nan")}, "penalty_base")])
def test_direct_construction_raises_config_error_naming_the_field(bad, field):
    # what a user of the Python API writes first; it raises the same error as every other way in
    with pytest.raises(ConfigError, match=field):
        GuardConfig(**bad)
    assert GuardConfig(k=7).k == 7


def test_strict_mode_does_not_leak_into_later_constructions():
    with pytest.raises(ConfigError, match=r"\bk: "):
        GuardConfig.from_dict({"k": "64"}, strict=True)
    assert GuardConfig(k="64").k == 64  # the Python API coerces, as pydantic does


def test_a_bad_value_is_shown_even_where_its_digits_appear_in_the_message():
    """``min_copies=1`` is refused with "greater than or equal to 1.5": the value is still named."""
    with pytest.raises(ConfigError, match=r"min_copies: .*1\.5 \(got 1\)"):
        GuardConfig(min_copies=1)
