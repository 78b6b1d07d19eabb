"""Drop-in use through ``generate``: guard settings travel in the generation config.

    from transformers import GenerationConfig
    from repguard.hf import custom_generate

    out = model.generate(
        **inputs,
        generation_config=GenerationConfig(max_new_tokens=200, do_sample=False, repguard={"preset": "default"}),
        custom_generate=custom_generate,
    )
    out.repguard_reports  # one SequenceReport per row

``repguard`` may be a dict of ``GuardConfig`` fields, a ``GuardConfig``, or a list of them (one per row).
``repguard_map`` (optional) is a ``NeuronMap`` or a path; by default the shipped map of the model's name.
The decoding itself is transformers' own sampling/greedy loop; only the guard's hooks are added. Calls from
several threads on one model run one after another (``repguard.hf.guard.model_lock``). Decoding it
does not run (beam search, contrastive, DoLa, prompt lookup) is refused by name; an ``assistant_model`` is not
handed to a ``custom_generate`` by transformers, so the call decodes without it (the same text under greedy
decoding, without the speed-up).
"""

from __future__ import annotations

from ..config import GuardConfig
from ..errors import ConfigError
from .guard import Guard, model_lock


# Criteria every ``generate`` call holds; any other one (stop strings, the caller's own) ends rows early.
_OWN_CRITERIA = ("MaxLengthCriteria", "EosTokenCriteria", "MaxTimeCriteria")


def custom_generate(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
    """A ``custom_generate`` callable for ``model.generate`` (transformers >= 4.57)."""
    from transformers.generation.utils import GenerationMixin

    mode = generation_config.get_generation_mode(model_kwargs.get("assistant_model"))
    if mode.name not in ("GREEDY_SEARCH", "SAMPLE"):
        raise ConfigError(f"repguard: custom_generate runs greedy or sampled decoding only, and this call asks for "
                          f"{mode.name.lower().replace('_', ' ')} (rows reordered or several tokens per step); "
                          "use num_beams=1 and no assistant, penalty_alpha or dola_layers")
    settings = getattr(generation_config, "repguard", None)
    nmap = getattr(generation_config, "repguard_map", None)
    rows = None
    if isinstance(settings, (list, tuple)):
        rows, settings = list(settings), None
    config = settings if isinstance(settings, GuardConfig) else GuardConfig.from_dict(settings)
    own_stops = [c for c in stopping_criteria or () if type(c).__name__ not in _OWN_CRITERIA]
    # One guarded generation per model at a time (``model_lock``): this call's guard is installed, run and
    # removed before another thread's.
    with model_lock(model), Guard(model, nmap, config) as g:
        if rows is not None:
            g.configure_rows(rows)
        # The rows are expanded for num_return_sequences already; beam search was refused above. The call's
        # config gives the guard its end tokens; criteria of the caller's end rows, which are padded from there.
        call = {"input_ids": input_ids, "num_return_sequences": 1, "generation_config": generation_config,
                "stopping_criteria": own_stops or None}
        with g.generation((), call):
            out = GenerationMixin._sample(
                model, input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                generation_config=generation_config, **model_kwargs,
            )
            g._observe_last(out)  # as the wrapped ``generate`` does: the last token has no forward of its own
    try:
        out.repguard_reports = g.reports
    except AttributeError:  # pragma: no cover - tensors and ModelOutputs both accept attributes
        pass
    return out
