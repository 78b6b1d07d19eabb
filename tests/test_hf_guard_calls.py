"""What the transformers guard watches: every ``generate`` call made while it is installed (a reused prompt
cache, ``use_cache=False``, a call's own EOS), nothing else (a scoring forward in the block), and what it
cannot follow is refused before anything runs."""

import copy

import pytest
import torch
from transformers import DynamicCache

from conftest import random_map, tiny_model
from repguard.config import GuardConfig
from repguard.errors import ConfigError
from repguard.hf import guard
from test_hf_guard_tiny import NEW, gen, looping_prompt, prompts


def _summary(reports):
    return [(r.fired, r.first_detection, r.tokens_observed) for r in reports]


def test_a_generation_on_a_reused_prompt_cache_is_watched_as_one_without_it():
    model = tiny_model()
    ids, _ = looping_prompt(model)
    prefix = ids[:, :4]
    plain = gen(model, ids)
    with guard(model, random_map(model), GuardConfig.from_preset("monitor")) as g:
        gen(model, ids)
        expected = _summary(g.reports)
        cache = DynamicCache()
        with torch.no_grad():
            model(prefix, past_key_values=cache)  # the shared system prompt, computed once
        out = gen(model, ids, past_key_values=copy.deepcopy(cache))
        assert torch.equal(out, plain)
        assert _summary(g.reports) == expected and expected[0][0]  # the loop is seen, from the same step


def test_a_forward_of_ones_own_inside_the_block_leaves_the_reports_alone():
    model = tiny_model()
    ids, _ = looping_prompt(model)
    with torch.no_grad():
        plain_logits = model(ids).logits
    with guard(model, random_map(model), GuardConfig()) as g:
        out = gen(model, ids)
        reports = _summary(g.reports)
        assert reports[0][0]
        with torch.no_grad():
            scored = model(out).logits  # scoring the generated text
            model(ids)
        assert _summary(g.reports) == reports  # not replaced by a "generation" of the scoring forward
        with torch.no_grad():
            assert torch.equal(model(ids).logits, plain_logits)  # nothing switched off or penalised there
    with torch.no_grad():
        assert torch.equal(scored, model(out).logits)


def test_generate_without_a_kv_cache_is_watched_step_by_step():
    model = tiny_model()
    ids, _ = looping_prompt(model)
    with guard(model, random_map(model), GuardConfig.from_preset("monitor")) as g:
        gen(model, ids)
        expected = _summary(g.reports)
        gen(model, ids, use_cache=False)
    assert _summary(g.reports) == expected and expected[0][0] and expected[0][2] == NEW  # every generated token


def test_a_pad_id_the_model_generates_is_an_ordinary_token():
    """A model whose pad id is a token it writes (a reserved token, a common word) keeps its rows watched
    past it: only a call with stop strings or stopping criteria pads rows it ended."""
    model = tiny_model()
    ids, _ = looping_prompt(model)
    plain = gen(model, ids)
    with guard(model, random_map(model), GuardConfig.from_preset("monitor")) as g:
        gen(model, ids)
    expected = _summary(g.reports)
    pad = int(plain[0, ids.shape[1] + 1])  # the second generated token; the loop repeats it
    model.generation_config.pad_token_id = pad
    with guard(model, random_map(model), GuardConfig.from_preset("monitor")) as g:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             pad_token_id=pad)
    assert torch.equal(out, plain)
    assert _summary(g.reports) == expected and expected[0][0]


def test_a_forced_eos_survives_final_logit_soft_capping():
    """Gemma 2 squashes its logits with tanh after the output embedding: a stop written before that would
    leave every other token at -cap, level with an EOS the model rates far below the rest."""
    model = tiny_model("gemma2")
    assert model.config.final_logit_softcapping
    ids, fired_at = looping_prompt(model)
    eos = 2

    def rarely_ends(module, inputs, output):  # a model whose EOS logit sits far below every other token's
        output[..., eos] = -1e4
        return output

    model.get_output_embeddings().register_forward_hook(rarely_ends)
    stop = GuardConfig(deactivate=False, escalate=False, stop_after=1)
    with guard(model, random_map(model), stop) as g:
        out = gen(model, ids, eos_token_id=eos)
    generated = out[0, ids.shape[1]:].tolist()
    assert g.reports[0].finish_reason == "repetition"
    assert eos in generated and generated.index(eos) <= fired_at + 3
    assert all(t == 0 for t in generated[generated.index(eos) + 1:])  # ended: padding after the EOS


def test_a_generate_call_with_its_own_eos_ends_rows_on_it():
    model = tiny_model()
    ids, _ = looping_prompt(model)
    plain = gen(model, ids)
    own = int(plain[0, ids.shape[1] + 2])
    stop = GuardConfig(deactivate=False, escalate=False, stop_after=1)
    with guard(model, random_map(model), stop) as g:
        out = gen(model, ids[:, :], eos_token_id=own, max_new_tokens=NEW)
    generated = out[0, ids.shape[1]:].tolist()
    assert generated.index(own) == 2 and g.reports[0].tokens_observed <= 3  # the row ended on the call's EOS


@pytest.mark.parametrize("kwargs, named", [
    ({"num_beams": 2}, "beam search"),
    ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
    ({"prefill_chunk_size": 4}, "prefill_chunk_size"),
])
def test_settings_the_guard_cannot_follow_are_refused_before_anything_runs(kwargs, named):
    model = tiny_model()
    ids = prompts(2)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with guard(model, random_map(model)) as g:
        with pytest.raises(ConfigError, match=named):
            gen(model, ids, **kwargs)
        assert not calls and not g.reports
        gen(model, ids)  # the guard still works afterwards
        assert len(g.reports) == 2


def test_inputs_embeds_alone_is_refused():
    model = tiny_model()
    ids = prompts(2)
    embeds = model.get_input_embeddings()(ids).detach()
    with guard(model, random_map(model)) as g:
        with pytest.raises(ConfigError, match="inputs_embeds"):
            model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                           do_sample=False, pad_token_id=0)
        # with input_ids too: the prefill runs on the embeddings, which the guard cannot follow (it ran
        # unguarded, silently, and g.reports answered with the previous call's)
        with pytest.raises(ConfigError, match="inputs_embeds"):
            model.generate(ids, inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                           do_sample=False, pad_token_id=0)
        assert not g.reports


def test_settings_from_the_models_own_defaults_are_refused_as_the_calls_own():
    """A call that passes a GenerationConfig of its own leaves num_beams unset; generate fills it from the
    model's defaults (2 here), so beam search ran under the guard."""
    from transformers import GenerationConfig

    model = tiny_model()
    model.generation_config.num_beams = 2
    ids = prompts(2)
    with guard(model, random_map(model)):
        with pytest.raises(ConfigError, match="beam search"):
            model.generate(ids, generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_a_tensor_of_eos_ids_is_read_as_a_list():
    """generate takes eos_token_id as a tensor; the guard raised ValueError out of generate."""
    model = tiny_model()
    ids, _ = looping_prompt(model)
    eos = torch.tensor([2, 5])
    plain = gen(model, ids, eos_token_id=eos)
    with guard(model, random_map(model), GuardConfig.from_preset("monitor")) as g:
        assert torch.equal(gen(model, ids, eos_token_id=eos), plain)
        assert len(g.reports) == ids.shape[0]


@pytest.mark.parametrize("sample", [False, True])
def test_a_stop_under_min_new_tokens_waits_for_it_and_never_breaks_generate(sample):
    """A loop stopped before min_new_tokens: the guard forced its EOS, generate's min-length processor then
    masked the EOS too, and no token was left (sampling raised out of generate; greedy emitted token 0 and the
    row went on unguarded). The EOS now comes at the first token generate allows."""
    from conftest import padded_batch

    model = tiny_model("llama")
    ids, mask = padded_batch([5, 7])
    cfg = GuardConfig(min_repeat=4, ngram=2, window=8, escalate_after=2, stop_after=4)  # a quick stop
    kw = dict(attention_mask=mask, max_new_tokens=60, min_new_tokens=50, do_sample=sample, pad_token_id=0)
    if sample:
        kw["top_k"] = 1
    with guard(model, random_map(model), cfg) as g:
        torch.manual_seed(0)
        out = model.generate(ids, **kw)[:, ids.shape[1]:]
        stopped = [i for i, r in enumerate(g.reports) if r.finish_reason == "repetition"]
    assert stopped and g.errors == 0
    eos = model.generation_config.eos_token_id
    for row in stopped:
        tokens = out[row].tolist()
        assert eos in tokens and tokens.index(eos) == 50, tokens  # the first place generate lets it end


def test_a_row_padded_by_a_stopping_criterion_ends_its_watch_with_the_calls_pad_id():
    """The pad id only the call names (the model's config has none): the row a criterion ended was padded
    with it, and its padding was watched as text (a loop reported, the neurons switched off on a finished row)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class EndRowZeroAfter3(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[0] = input_ids.shape[1] >= width + 3
            return done

    model = tiny_model("llama")
    model.config.pad_token_id = model.generation_config.pad_token_id = None
    ids = prompts(2)
    width = ids.shape[1]
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([EndRowZeroAfter3()]))
    plain = model.generate(ids, **kw)
    with guard(model, random_map(model), GuardConfig.from_preset("monitor")) as g:
        out = model.generate(ids, **kw)
    assert torch.equal(out, plain)
    assert g.reports[0].tokens_observed == 3 and not g.reports[0].fired


def test_watch_prompt_reads_the_calls_mask_under_a_static_cache():
    """A static cache hands the forward a 4-D mask (or a dict of them): the guard read it as 2-D and failed open
    at every prefill."""
    from conftest import padded_batch

    model = tiny_model("llama")
    ids, mask = padded_batch([4, 6])
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    plain = model.generate(ids, **kw)
    with guard(model, random_map(model), GuardConfig.from_preset("monitor", watch_prompt=True)) as g:
        out = model.generate(ids, **kw)
    assert torch.equal(out, plain) and g.errors == 0
    assert [r.tokens_observed for r in g.reports] == [6, 6]


def test_a_guard_removed_under_another_wrapper_leaves_generate_as_it_was():
    """Two guards removed out of order: the outer one's generate wrapper stayed on the model and went on refusing
    beam search on a model no guard watches."""
    model = tiny_model()
    ids = prompts(2)
    outer = guard(model, random_map(model)).install()
    inner = guard(model, random_map(model)).install()
    outer.remove()
    inner.remove()
    out = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 4)


def test_per_row_settings_for_another_batch_size_are_refused():
    model = tiny_model()
    ids = prompts(2)
    with guard(model, random_map(model)) as g:
        g.configure_rows([None, None, None])
        with pytest.raises(ConfigError, match="3 configs for a batch of 2 rows"):
            gen(model, ids)
        with pytest.raises(ConfigError, match="3 configs for a batch of 4 rows"):
            gen(model, ids, do_sample=True, num_return_sequences=2)
        g.configure_rows([None] * 4)
        torch.manual_seed(0)
        gen(model, ids, do_sample=True, num_return_sequences=2)
        assert len(g.reports) == 4


def test_per_row_settings_are_checked_against_the_model_and_map():
    model = tiny_model()
    nmap = random_map(model, num_stored=48)
    with guard(model, nmap) as g:
        with pytest.raises(ConfigError, match="k: 49 exceeds the 48 neurons"):
            g.configure_rows([None, {"k": 49}])
        with pytest.raises(ConfigError, match="layers: the model has 2 layers"):
            g.configure_rows([{"layers": [0, 5]}])
        with pytest.raises(ConfigError, match="k: 100"):
            g.reserve([GuardConfig(k=100)])
    with guard(model, False, GuardConfig(deactivate=False)) as g:  # no map: the token-level guard
        with pytest.raises(ConfigError, match="monitor_gate"):
            g.configure_rows([{"monitor_gate": 2.0}])


def test_the_guard_gives_generate_back_on_exit():
    model = tiny_model()
    with guard(model, random_map(model)):
        assert "generate" in vars(model)
    assert "generate" not in vars(model)
    with pytest.raises(RuntimeError):
        with guard(model, random_map(model)):
            raise RuntimeError("boom")
    assert "generate" not in vars(model)


@pytest.mark.parametrize("settings, named", [
    ({"ngram": 10, "window": 11}, "window"),
    ({"min_repeat": 600}, "min_repeat"),
    ({"min_repeat": 1200, "max_period": 200}, "min_repeat"),
])
def test_settings_that_could_never_fire_are_refused(settings, named):
    with pytest.raises(ConfigError, match=named):
        GuardConfig.from_dict(settings)


def test_settings_at_the_bounds_are_accepted():
    cfg = GuardConfig.from_dict({"ngram": 10, "window": 12})
    assert (cfg.ngram, cfg.window) == (10, 12)
    assert GuardConfig.from_dict({"min_repeat": 512}).min_repeat == 512
    cfg = GuardConfig.from_dict({"min_repeat": 800, "max_period": 200})
    assert (cfg.min_repeat, cfg.max_period) == (800, 200)
    cfg = GuardConfig.from_dict({"min_repeat": 600, "suffix_trigger": False})
    assert cfg.min_repeat == 600 and cfg.suffix_trigger is False


def test_the_overhead_histogram_observes_each_generation_on_its_own(monkeypatch):
    """``repguard_guard_overhead_seconds`` takes one observation per generation: that generation's guard time
    per step, not a running average over every generation the block ran."""
    from repguard import metrics

    seen: list[tuple[float, int]] = []
    model = tiny_model()
    ids = prompts()
    with guard(model, random_map(model), GuardConfig.from_preset("monitor")) as g:
        histogram = metrics.OVERHEAD.labels(g.model_name)
        original = type(histogram).observe

        def observe(self, value):
            if self is histogram:
                seen.append((value, g.steps))
            return original(self, value)

        monkeypatch.setattr(type(histogram), "observe", observe)
        gen(model, ids, max_new_tokens=30)
        gen(model, ids, max_new_tokens=5)
    assert [steps for _, steps in seen] == [30, 5], "each generation's own steps, one per generated token"


def test_custom_generate_reads_the_last_token_as_the_wrapped_generate_does():
    from repguard.hf.generate import custom_generate

    model = tiny_model()
    ids = prompts()
    with guard(model, random_map(model), GuardConfig.from_preset("monitor")) as g:
        gen(model, ids, max_new_tokens=10)
        wrapped = [r.tokens_observed for r in g.reports]
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0, repguard={"preset": "monitor"},
                           repguard_map=random_map(model))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                         custom_generate=custom_generate)
    assert wrapped == [10, 10] and [r.tokens_observed for r in out.repguard_reports] == wrapped


def test_a_generation_config_passed_positionally_is_read_as_one_passed_by_name():
    """``model.generate(ids, GenerationConfig(...))``: the guard reads the config there too, so a setting it
    cannot follow is refused and the config's own EOS ends rows."""
    from transformers import GenerationConfig

    model = tiny_model()
    ids, _ = looping_prompt(model)
    with guard(model, random_map(model)) as g:
        with pytest.raises(ConfigError, match="beam search"):
            model.generate(ids, GenerationConfig(num_beams=2, max_new_tokens=8, pad_token_id=0))
        assert not g.reports
    own = int(gen(model, ids)[0, ids.shape[1] + 2])
    stop = GuardConfig(deactivate=False, escalate=False, stop_after=1)
    with guard(model, random_map(model), stop) as g:
        out = model.generate(ids, GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                                   eos_token_id=own), attention_mask=torch.ones_like(ids))
    generated = out[0, ids.shape[1]:].tolist()
    assert generated.index(own) == 2 and g.reports[0].tokens_observed <= 3 and not g.reports[0].fired


def _custom(model, ids, mask=None, stopping_criteria=None, **config):
    from transformers import GenerationConfig

    from repguard.hf.generate import custom_generate

    cfg = GenerationConfig(**{"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, **config},
                           repguard={"preset": "default"}, repguard_map=random_map(model))
    return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, generation_config=cfg,
                          custom_generate=custom_generate, stopping_criteria=stopping_criteria)


def test_custom_generate_ends_rows_where_the_call_ends_them():
    """A row ended by the call's own EOS, or by the caller's stopping criteria, is padded from there while the
    other rows go on: the guard does not read that padding as a loop (it did: a report of a loop, and the
    neuron step, on a row that had ended)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from conftest import padded_batch

    class RowZeroAfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[0] = input_ids.shape[1] - width >= 3
            return done

    model = tiny_model()
    ids, mask = padded_batch([4, 6, 5, 6])
    width = ids.shape[1]
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    own = int(plain[0, width + 2])
    assert own not in plain[1:, width:].flatten().tolist()[:10], "precondition: only row 0 ends early"
    for out in (_custom(model, ids, mask, eos_token_id=own),
                _custom(model, ids, mask, stopping_criteria=StoppingCriteriaList([RowZeroAfterThree()]))):
        generated = out[0, width:].tolist()
        assert len(generated) > 10 and set(generated[3:]) == {0}  # row 0 ended, the others went on
        report = out.repguard_reports[0]
        assert not report.fired and report.tokens_observed <= 3 and not report.actions


@pytest.mark.parametrize("config, named", [
    ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive search"),
    ({"num_beams": 2}, "beam search"),
    ({"prompt_lookup_num_tokens": 3}, "assisted generation"),
])
def test_custom_generate_refuses_decoding_it_does_not_run(config, named):
    model = tiny_model()
    with pytest.raises(ConfigError, match=named):
        _custom(model, prompts(), **config)


def test_metrics_that_cannot_be_written_do_not_take_generation_down(monkeypatch, caplog):
    """A metrics store that fails (a multiprocess folder removed under a running server, say): the guarded
    generation returns as it would have, and the failure is logged once."""
    from repguard import metrics
    from repguard.hf.rollback import generate_with_rollback

    def broken(*args, **kwargs):
        raise FileNotFoundError("counter_1.db")

    model = tiny_model()
    ids = prompts()
    with guard(model, random_map(model)) as g:
        want = gen(model, ids)
        reports = [r.to_dict() for r in g.reports]
    want_rb = generate_with_rollback(model, ids, torch.ones_like(ids), neuron_map=random_map(model),
                                     max_new_tokens=NEW, do_sample=False, pad_token_id=0).sequences
    monkeypatch.setattr(metrics, "_write_failed", False)
    for metric in metrics.ALL:
        monkeypatch.setattr(metric, "labels", broken)
    with caplog.at_level("ERROR", logger="repguard"):
        with guard(model, random_map(model)) as g:
            assert torch.equal(gen(model, ids), want)
        assert [r.to_dict() for r in g.reports] == reports
        out = generate_with_rollback(model, ids, torch.ones_like(ids), neuron_map=random_map(model),
                                     max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        assert out.sequences == want_rb
    assert sum("could not write a metric" in r.getMessage() for r in caplog.records) == 1
