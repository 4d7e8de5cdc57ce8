"""rtkern.train.prepare: control tokens as special tokens, vocabulary growth (tied/untied), row init."""
import pytest
import torch

from rtkern.loader import load_model
from rtkern.spec import CATEGORIES
from rtkern.train.prepare import add_control_tokens, resize_vocab, round_up
from train_utils import make_base


@pytest.mark.parametrize("tie", [True, False])
def test_add_control_tokens_resizes_and_inits_from_mean(tmp_path, tie):
    model, tok = load_model(make_base(tmp_path, tie=tie, vocab=300), device="cpu", dtype=torch.float32)
    n_trained = len(tok)
    emb0 = model.embed_tokens.weight.detach().clone()
    head0 = model.lm_head.weight.detach().clone()
    ctrl = add_control_tokens(model, tok, "category")
    V = model.embed_tokens.num_embeddings
    assert V == round_up(n_trained + 6) == 320 and V % 64 == 0
    assert model.args.vocab_size == V and model.lm_head.weight.shape[0] == V
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    assert list(ctrl.names) == list(CATEGORIES) and len(ctrl.refusal_ids) == 5
    assert ctrl.refusal_ids == tuple(range(n_trained, n_trained + 5)) and ctrl.respond_id == n_trained + 5
    torch.testing.assert_close(model.embed_tokens.weight[:n_trained], emb0[:n_trained], rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight[:n_trained], head0[:n_trained], rtol=0, atol=0)
    for w, w0 in ((model.embed_tokens.weight, emb0), (model.lm_head.weight, head0)):
        mean = w0[:n_trained].mean(0)
        for r in list(ctrl.refusal_ids) + [ctrl.respond_id] + list(range(n_trained + 6, V)):
            torch.testing.assert_close(w[r], mean)
    # text never produces the new ids; the model runs with the new vocabulary
    assert not set(tok.encode("[refuse] [respond] [Incomplete requests]")) & set(tok.control_ids)
    logits = model(torch.tensor([[1, ctrl.respond_id]]))
    assert logits.shape == (1, 2, V)
    # the new rows train: a loss on the control tokens reaches them through the input and the output side
    (logits[..., list(ctrl.refusal_ids)].sum() + logits[..., ctrl.respond_id].sum()).backward()
    for w in (model.embed_tokens.weight, model.lm_head.weight):
        assert w.grad is not None and w.grad[ctrl.respond_id].abs().sum() > 0
    assert all(model.lm_head.weight.grad[r].abs().sum() > 0 for r in ctrl.refusal_ids)


def test_single_scheme_and_idempotent(tmp_path):
    model, tok = load_model(make_base(tmp_path), device="cpu", dtype=torch.float32)
    ctrl = add_control_tokens(model, tok, "single")
    assert [tok.decode([i]) for i in ctrl.refusal_ids] == ["[refuse]"] and tok.decode([ctrl.respond_id]) == "[respond]"
    assert ctrl.id_for("Humanizing requests") == ctrl.id_for("refuse") == ctrl.refusal_ids[0]
    with torch.no_grad():
        model.embed_tokens.weight[ctrl.respond_id] += 1.0        # "trained" row
    trained = model.embed_tokens.weight[ctrl.respond_id].clone()
    again = add_control_tokens(model, tok, "single")             # e.g. our checkpoint used as a base
    assert again == ctrl and model.embed_tokens.num_embeddings == 320
    torch.testing.assert_close(model.embed_tokens.weight[ctrl.respond_id], trained)


def test_resize_errors(tmp_path):
    model, tok = load_model(make_base(tmp_path), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="shrink"):
        resize_vocab(model, 10)
    with pytest.raises(ValueError, match="init_rows"):
        resize_vocab(model, 320, init_rows=[400])
    with pytest.raises(ValueError, match="scheme"):
        add_control_tokens(model, tok, "both")


@pytest.mark.parametrize("tie", [True, False])
def test_padding_rows_keep_their_values_and_the_mean_is_over_the_tokens_rows(tmp_path, tie):
    """What the docstring says: a base with 384 rows and fewer tokens. The new ids (taken from the padding)
    get the mean of rows [0, n), n = the tokenizer's size; the other padding rows stay the base's."""
    model, tok = load_model(make_base(tmp_path, tie=tie, vocab=384), device="cpu", dtype=torch.float32)
    n = len(tok)
    assert n + 6 < 384
    before = [w.detach().clone() for w in (model.embed_tokens.weight, model.lm_head.weight)]
    ctrl = add_control_tokens(model, tok, "category")
    assert model.embed_tokens.num_embeddings == 384          # already a multiple of 64: no growth
    new = list(ctrl.refusal_ids) + [ctrl.respond_id]
    assert new == list(range(n, n + 6))
    for w, w0 in zip((model.embed_tokens.weight, model.lm_head.weight), before):
        assert torch.equal(w[:n], w0[:n]) and torch.equal(w[n + 6:], w0[n + 6:])
        for r in new:
            torch.testing.assert_close(w[r], w0[:n].mean(0))
        assert not torch.allclose(w0[:n].mean(0), w0.mean(0))   # the mean over all rows would differ


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    """A base whose tokenizer has more ids (300) than embedding rows (200) is not silently padded."""
    model, tok = load_model(make_base(tmp_path, vocab=200), device="cpu", dtype=torch.float32)
    assert len(tok) == 300
    with pytest.raises(ValueError, match="tokenizer has 300 ids but the model only 200 embedding rows"):
        add_control_tokens(model, tok, "single")
    assert model.embed_tokens.num_embeddings == 200 and len(tok) == 300    # nothing changed


@pytest.mark.parametrize("tie", [True, False])
def test_growth_covers_the_new_ids_and_sets_every_row_past_the_old_matrix(tmp_path, tie):
    """A base with 310 rows and 300 tokens: the new ids 300..305 take base padding rows, rows 306..309 keep
    the base's values, and the rows the growth to 320 creates (310..319, the first one included) get the
    mean of rows [0, 300). With multiple=4 a base with exactly its tokenizer's rows grows to
    round_up(300 + 6, 4) = 308 rows: the size follows the tokenizer, not the old matrix."""
    model, tok = load_model(make_base(tmp_path / "a", tie=tie, vocab=310), device="cpu", dtype=torch.float32)
    n = len(tok)
    assert n == 300
    before = [w.detach().clone() for w in (model.embed_tokens.weight, model.lm_head.weight)]
    ctrl = add_control_tokens(model, tok, "category")
    assert model.embed_tokens.num_embeddings == model.lm_head.weight.shape[0] == 320
    assert model.lm_head.out_features == 320 and model.args.vocab_size == 320
    assert list(ctrl.refusal_ids) + [ctrl.respond_id] == list(range(300, 306))
    for w, w0 in zip((model.embed_tokens.weight, model.lm_head.weight), before):
        mean = w0[:n].mean(0)
        assert torch.equal(w[:n], w0[:n]) and torch.equal(w[306:310], w0[306:310])
        for r in list(range(300, 306)) + list(range(310, 320)):
            torch.testing.assert_close(w[r], mean, rtol=0, atol=1e-7)

    model, tok = load_model(make_base(tmp_path / "b", tie=tie, vocab=300), device="cpu", dtype=torch.float32)
    ctrl = add_control_tokens(model, tok, "single", multiple=4)
    assert model.embed_tokens.num_embeddings == model.lm_head.weight.shape[0] == model.args.vocab_size == 304
    assert model.lm_head.out_features == 304
    assert ctrl.refusal_ids == (300,) and ctrl.respond_id == 301


def test_resize_rejects_init_rows_outside_the_new_size(tmp_path):
    model, _ = load_model(make_base(tmp_path), device="cpu", dtype=torch.float32)
    emb0 = model.embed_tokens.weight.detach().clone()
    for rows in ([320], [-1], [5, 320], [-1, 5], [5, -1, 7], [5, 400, 7]):   # past the end; negative; unsorted
        with pytest.raises(ValueError, match=r"init_rows must lie in \[0, 320\)"):
            resize_vocab(model, 320, init_rows=rows)
        assert model.embed_tokens.num_embeddings == 300 and torch.equal(model.embed_tokens.weight, emb0)
    resize_vocab(model, 320, init_rows=[319, 0, 319])   # the edges, unsorted, repeated: fine
    torch.testing.assert_close(model.embed_tokens.weight[0], emb0.mean(0))
    torch.testing.assert_close(model.embed_tokens.weight[319], emb0.mean(0))
    assert torch.equal(model.embed_tokens.weight[1:300], emb0[1:300])


def test_control_tokens_json_and_labels():
    from rtkern.train.prepare import ControlTokens
    ct = ControlTokens("category", ("[a]", "[b]"), ("A", "B"), (10, 11), "[respond]", 12)
    assert ct.id_for("respond") == 12 and ct.id_for("A") == 10 and ct.id_for("B") == 11
    with pytest.raises(ValueError, match=r"label 'refuse' has no token in the category scheme \(categories: \['A', 'B'\]\)"):
        ct.id_for("refuse")
    d = ct.to_json()
    assert d["refusal_ids"] == [10, 11] and d["respond_id"] == 12 and d["categories"] == ["A", "B"]
    assert ControlTokens.from_json(d) == ct
    for broken in ({k: v for k, v in d.items() if k != "respond_id"}, {**d, "refusal_ids": None},
                   {**d, "respond_id": "x"}):
        with pytest.raises(ValueError, match="malformed rtkern.json"):
            ControlTokens.from_json(broken)
