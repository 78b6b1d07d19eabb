"""``generate_with_rollback`` takes what ``generate`` takes: a padded batch without a mask is read as
``generate`` reads it, rows ended by stopping criteria come back without padding, and inputs it cannot run
are refused by name before anything is decoded."""

import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from conftest import padded_batch, random_map, tiny_model
from repguard.errors import ConfigError
from repguard.hf.rollback import generate_with_rollback

NEW = 30
EOS = 2


def _cut(row: list[int]) -> list[int]:
    return row[: row.index(EOS) + 1] if EOS in row else row


def test_a_padded_batch_without_a_mask_is_read_as_generate_reads_it():
    model = tiny_model()
    ids, mask = padded_batch([4, 6, 5, 6, 3, 6, 2, 6])
    width = ids.shape[1]
    plain = [_cut(r) for r in model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[:, width:].tolist()]
    as_text = [_cut(r) for r in model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                               do_sample=False, pad_token_id=0)[:, width:].tolist()]
    for overlap in (None, False):
        out = generate_with_rollback(model, ids, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                     do_sample=False, pad_token_id=0, overlap=overlap)
        calm = [i for i in range(len(plain)) if out.rollbacks[i] == 0 and not out.reports[i].fired]
        assert calm and [out.sequences[i] for i in calm] == [plain[i] for i in calm]
        # the padding read as prompt text would have given other text on some of these rows
        assert any(plain[i] != as_text[i] for i in calm)


class _StopAfter(StoppingCriteria):
    """Ends row 0 after its third new token (a stop string would, in text)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[0] = input_ids.shape[1] - self.start >= 3
        return done


def test_rows_ended_by_stopping_criteria_come_back_without_padding():
    model = tiny_model()
    ids, mask = padded_batch([4, 6, 5, 6])
    width = ids.shape[1]
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                           stopping_criteria=StoppingCriteriaList([_StopAfter(width)]))[:, width:].tolist()
    assert plain[0][3:] and set(plain[0][3:]) == {0}  # generate pads the row it ended
    streamed: dict[int, list[int]] = {}
    out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0,
                                 stopping_criteria=StoppingCriteriaList([_StopAfter(width)]),
                                 on_tokens=lambda row, tokens: streamed.setdefault(row, []).extend(tokens), holdback=0)
    assert out.sequences[0] == plain[0][:3]
    for i, row in enumerate(out.sequences):
        assert streamed.get(i, []) == row  # what was handed out is the returned text, no padding in either
        if out.rollbacks[i] == 0 and not out.reports[i].fired:
            assert row == _cut(plain[i]) or row == plain[i][:3]


@pytest.mark.parametrize("args, kwargs, named", [
    ((torch.tensor([5, 6, 7]),), {}, "input_ids must be a 2-D tensor"),
    ((torch.ones(2, 4).long(), torch.ones(2, 5).long()), {}, r"attention_mask must have input_ids' shape \(2, 4\)"),
    ((torch.ones(2, 4).long(), torch.ones(3, 4).long()), {}, r"attention_mask must have input_ids' shape"),
    ((torch.ones(2, 4).long(), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])), {}, "no prompt token"),
    ((torch.ones(2, 4).long(),), {"max_new_tokens": "5"}, "max_new_tokens must be an integer"),
    ((torch.ones(2, 4).long(),), {"max_new_tokens": 5.5}, "max_new_tokens must be an integer"),
    ((torch.ones(2, 4).long(),), {"num_return_sequences": 3, "do_sample": True}, "num_return_sequences"),
    ((torch.ones(2, 4).long(),), {"return_dict_in_generate": True}, "return_dict_in_generate"),
    ((torch.ones(2, 4).long(),), {"output_scores": True, "overlap": False}, "output_scores"),
    ((torch.ones(2, 4).long(),), {"max_length": 4}, "max_length: 4 leaves no new token"),
    ((torch.ones(2, 4).long(),), {"streamer": object()}, "streamer: a transformers streamer takes one row"),
    ((torch.ones(2, 4).long(),), {"past_key_values": object()}, "past_key_values: rollback decodes each pass"),
    ((torch.ones(2, 4).long(),), {"guidance_scale": 1.5}, "guidance_scale: classifier-free guidance"),
    ((torch.ones(2, 4).long(),), {"guidance_scale": 0.0}, "guidance_scale: classifier-free guidance"),
])
def test_inputs_it_cannot_run_are_refused_by_name(args, kwargs, named):
    model = tiny_model()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match=named):
        generate_with_rollback(model, *args, neuron_map=random_map(model), **kwargs)
    assert not calls


@pytest.mark.parametrize("case", ["nothing", "max_length", "call config", "model config"])
def test_the_length_is_read_as_generate_reads_it(case):
    """Without ``max_new_tokens`` every row gets what ``generate`` would give the same call: its ``max_length``
    (prompt included), its config's ``max_new_tokens``, the model's, or generate's default 20."""
    model = tiny_model()
    ids, mask = padded_batch([4, 6, 5, 6])
    kwargs = {"max_length": 12} if case == "max_length" else {}
    if case == "call config":
        kwargs["generation_config"] = GenerationConfig(max_new_tokens=7, do_sample=False, pad_token_id=0, eos_token_id=EOS)
    else:
        kwargs.update(do_sample=False, pad_token_id=0)
    if case == "model config":
        model.generation_config.max_new_tokens = 9
    plain = model.generate(ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:].tolist()
    want = {"nothing": 20, "max_length": 12 - ids.shape[1], "call config": 7, "model config": 9}[case]
    assert max(len(r) for r in plain) == want
    out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), **kwargs)
    # Too short for the paper's criterion to confirm a loop: every row is the plain text, at its length.
    assert out.sequences == [_cut(r) for r in plain] and not any(out.rollbacks)


class _Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended += 1


def test_a_transformers_streamer_gets_the_final_tokens_only():
    """``streamer=`` works as with ``generate``: the prompt first, then the text as it is released, which is
    the returned text (a rolled-back copy is never streamed), and ``end()`` once."""
    model = tiny_model()
    ids = torch.randint(3, 256, (6, 6), generator=torch.Generator().manual_seed(3))
    for i in range(len(ids)):
        row = ids[i : i + 1]
        streamer = _Recorder()
        out = generate_with_rollback(model, row, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                     do_sample=False, pad_token_id=0, streamer=streamer, holdback=12)
        assert streamer.puts[0] == row[0].tolist() and streamer.ended == 1
        assert sum(streamer.puts[1:], []) == out.sequences[0] and len(streamer.puts) > 2
        if out.rollbacks[0]:
            return
    pytest.fail("no row of the batch rolled back")


@pytest.mark.parametrize("model_settings, call", [
    ({"max_new_tokens": 30}, {"max_length": 15}),  # a configured max_new_tokens wins over max_length
    (None, {"generation_config": GenerationConfig(max_new_tokens=9, pad_token_id=0), "max_length": 12}),
    ({"max_length": 50}, {"generation_config": GenerationConfig(pad_token_id=0)}),  # the call's config takes the model's
    ({"max_length": 17}, {"generation_config": GenerationConfig(max_new_tokens=5, pad_token_id=0)}),
    (None, {"max_length": 20}),
])
def test_length_settings_from_several_places_are_resolved_as_generate_resolves_them(model_settings, call):
    model = tiny_model()
    for key, value in (model_settings or {}).items():
        setattr(model.generation_config, key, value)
    ids, mask = padded_batch([4, 6])
    extra = {} if "generation_config" in call else {"do_sample": False, "pad_token_id": 0}
    want = model.generate(ids, attention_mask=mask, eos_token_id=None, **extra, **call).shape[1] - ids.shape[1]
    out = generate_with_rollback(model, ids, mask, neuron_map=random_map(model, 32, 64), eos_token_id=None, **extra,
                                 **call)
    assert [len(s) for s in out.sequences] == [want, want]


def test_a_tensor_of_eos_ids_and_no_mask_is_read_as_generate_reads_it():
    """``eos_token_id`` as a tensor of several ids, as generate takes it, with no attention mask (it raised:
    a tensor's truth value)."""
    model = tiny_model()
    ids, _ = padded_batch([4, 6, 5])
    eos = torch.tensor([EOS, 7])
    plain = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=eos)
    out = generate_with_rollback(model, ids, neuron_map=random_map(model, 32, 64), max_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0, eos_token_id=eos)
    for i, row in enumerate(plain[:, ids.shape[1]:].tolist()):
        if out.rollbacks[i] == 0 and not out.reports[i].fired:
            end = next((j + 1 for j, t in enumerate(row) if t in (EOS, 7)), len(row))
            assert out.sequences[i] == row[:end]


def test_the_guard_refuses_classifier_free_guidance_before_any_work():
    """Its second forward at every step would be counted as a decoding step: reports counted twice and a stop
    held for min_new_tokens let go early (a pad id mid-text)."""
    from repguard.hf.guard import guard

    model = tiny_model()
    ids, mask = padded_batch([4, 6])
    calls = []
    with guard(model, random_map(model)):
        model.register_forward_pre_hook(lambda *a: calls.append(1))
        with pytest.raises(ConfigError, match="guidance_scale"):
            model.generate(ids, attention_mask=mask, max_new_tokens=5, guidance_scale=1.5)
    assert not calls
