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
