"""Rollback on the embedded default model (smollm2-135m): what a tiny random model does not show."""

from conftest import left_padded
from repguard.hf.rollback import generate_with_rollback


def test_the_loops_next_token_is_banned_even_where_the_repair_also_penalises_it(smollm):
    """The first re-decoded token of a rewound row may not be the loop's next token. On this list prompt the
    repair penalises that token too (it extends an earlier repeat), and the two amounts once went to one logit
    as two writes, of which only the repair's landed: in place, the row re-decoded the very token that started
    the loop's second copy, two tokens later than the passes one after another."""
    model, tok, _ = smollm
    chats = ["Write a detailed essay about the history of the Roman Empire.",
             "List all the countries in Africa, one per line."]
    rows = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
            for c in chats]
    ids, mask = left_padded([tok(r, add_special_tokens=False).input_ids for r in rows])
    width = ids.shape[1]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    kw = dict(max_new_tokens=50, do_sample=False, pad_token_id=pad)
    plain = model.generate(ids, attention_mask=mask, **kw)[:, width:].tolist()
    in_place = generate_with_rollback(model, ids, mask, overlap=True, **kw)
    passes = generate_with_rollback(model, ids, mask, overlap=False, **kw)
    assert in_place.rollbacks == passes.rollbacks == [0, 1]
    onset = next(a.position + 1 for a in in_place.reports[1].actions if a.level == "rollback")
    assert in_place.sequences[1][:onset] == plain[1][:onset]
    assert in_place.sequences[1][onset] != plain[1][onset], "the loop's next token was re-decoded"
    assert in_place.sequences == passes.sequences
