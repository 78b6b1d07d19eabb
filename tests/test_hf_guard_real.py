"""The transformers guard on the embedded default model with its shipped neuron map."""

import pytest
import torch

from repguard.config import GuardConfig
from repguard.hf import guard

pytestmark = pytest.mark.real_model

LOOPING = "Once upon a time"  # greedy SmolLM2 falls into a 26-token loop after ~60 tokens
CALM = "Here is a list of the planets in the solar system:\n1."
NEW = 130


@pytest.fixture(scope="module")
def batch(smollm):
    model, tok, _ = smollm
    enc = tok([LOOPING, CALM], return_tensors="pt", padding=True)
    plain = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    return enc, plain


def test_looping_prompt_changes_after_detection_and_calm_prompt_is_identical(smollm, smollm_map, batch):
    model, tok, name = smollm
    enc, plain = batch
    with guard(model, smollm_map, GuardConfig(), model_name=name) as g:
        out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    loop, calm = g.reports
    assert loop.fired and loop.first_action is not None
    start = enc.input_ids.shape[1]
    acted = loop.first_action
    # Tokens up to and including the one that fired the detector are the unguarded ones...
    assert torch.equal(out[0, : start + acted + 1], plain[0, : start + acted + 1])
    # ...and the loop is changed after it.
    assert not torch.equal(out[0], plain[0])
    # The calm neighbour never fired and is byte-identical.
    assert not calm.fired
    assert torch.equal(out[1], plain[1])
    assert tok.decode(out[1]) == tok.decode(plain[1])


def test_monitor_mode_is_byte_identical_on_a_looping_prompt(smollm, smollm_map, batch):
    model, tok, name = smollm
    enc, plain = batch
    with guard(model, smollm_map, GuardConfig.from_preset("monitor"), model_name=name) as g:
        out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, plain)
    assert g.reports[0].fired and g.reports[0].tokens_under_intervention == 0


@pytest.fixture(scope="module")
def long_loop(smollm):
    """The looping prompt alone, decoded long enough for the paper's criterion (3 copies) to hold."""
    from repguard.detect import find_repetition

    model, tok, _ = smollm
    enc = tok([LOOPING], return_tensors="pt")
    plain = model.generate(**enc, max_new_tokens=LONG, do_sample=False, pad_token_id=tok.pad_token_id)
    cont = plain[0, enc.input_ids.shape[1]:].tolist()
    assert find_repetition(cont) is not None  # the unguarded text loops, by the paper's detector
    return enc, cont


LONG = 200


def test_guard_ends_the_loop(smollm, smollm_map, long_loop):
    """With the default policy, the paper's detector no longer finds a loop in the continuation."""
    from repguard.detect import find_repetition

    model, tok, name = smollm
    enc, plain = long_loop
    with guard(model, smollm_map, GuardConfig(), model_name=name) as g:
        out = model.generate(**enc, max_new_tokens=LONG, do_sample=False, pad_token_id=tok.pad_token_id)
    cont = out[0, enc.input_ids.shape[1]:].tolist()
    assert g.reports[0].fired
    assert find_repetition(cont) is None


def test_rollback_removes_the_repeated_copy(smollm, smollm_map, long_loop):
    """Rollback keeps the text before the loop's second copy and re-decodes from there."""
    from repguard.detect import find_repetition
    from repguard.hf.rollback import generate_with_rollback

    model, tok, name = smollm
    enc, plain = long_loop
    onset = find_repetition(plain).p2
    out = generate_with_rollback(model, enc.input_ids, enc.attention_mask, neuron_map=smollm_map,
                                 max_new_tokens=LONG, max_rollbacks=2, model_name=name, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    cont = out.sequences[0]
    assert out.rollbacks[0] >= 1
    # cut at the loop's second copy, or earlier where the kept text already repeated (cut_back)
    cut = [a.position for a in out.reports[0].actions if a.level == "rollback"][0] + 1
    assert 0 < cut <= onset
    assert cont[:cut] == plain[:cut] and cont[cut] != plain[cut], "kept as it was up to the cut, re-decoded after"
    assert find_repetition(cont) is None


def test_cli_generate_compare(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "repguard.cli", "generate", "--prompt", LOOPING, "--compare", "--max-new-tokens", "110",
         "--threads", "1", "--no-rollback"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "UNGUARDED" in proc.stdout and "GUARDED" in proc.stdout
    assert "loop detected at token" in proc.stdout and "⟦DEACTIVATE⟧" in proc.stdout
    assert "outputs first differ at generated token" in proc.stdout


def test_cli_generate_rollback_is_the_default():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "repguard.cli", "generate", "--prompt", LOOPING, "--compare", "--max-new-tokens",
         str(LONG), "--threads", "1", "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not row["identical"]
    assert "rollback" in [a["level"] for a in row["report"]["actions"]]
    # The guarded text keeps everything before the loop's second copy.
    assert row["guarded"][:150] == row["unguarded"][:150]
