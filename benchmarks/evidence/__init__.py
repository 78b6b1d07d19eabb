"""Evidence benchmark: repguard against the decoding-time remedies users have today.

Modules: ``prompts`` (WikiText-2 openings, tuning/held-out split), ``dry`` (the DRY baseline as a
transformers logits processor), ``measures`` (loop rate, seq-rep-4, distinct-2, distortion, identity),
``methods`` (what each compared method passes to ``generate``), ``run`` (generation + scoring),
``ppl`` (WikiText-2 perplexity with neurons always off), ``judge`` (perplexity under the other model),
``report`` (tables and plot for ``benchmarks/RESULTS.md``).
"""
