"""GuardConfig validation, presets and serialisation."""

import pytest

from repguard.config import GuardConfig
from repguard.errors import ConfigError


def test_defaults_validate_and_round_trip():
    cfg = GuardConfig()
    assert GuardConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad, field",
    [({"k": 0}, "k"), ({"ngram": "ten"}, "ngram"), ({"unknown_knob": 1}, "unknown_knob"),
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
