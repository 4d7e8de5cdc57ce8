"""rtkern.train.loss: chunked cross-entropy against F.cross_entropy (loss and gradients)."""
import pytest
import torch
import torch.nn.functional as F

from rtkern.train.loss import chunked_cross_entropy


def _inputs(n=37, d=16, v=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_matches_reference_loss_and_grads(chunk):
    h, w, y = _inputs()
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    gh_ref, gw_ref = torch.autograd.grad(ref * 0.7, (h, w))
    got = chunked_cross_entropy(h, w, y, chunk=chunk)
    gh, gw = torch.autograd.grad(got * 0.7, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [5, 1000])
def test_token_weights_match_weighted_reference(chunk):
    h, w, y = _inputs()
    tw = torch.rand(len(y), generator=torch.Generator().manual_seed(1)) * 4
    ref = (F.cross_entropy(h @ w.t(), y, reduction="none") * tw).sum()
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    got = chunked_cross_entropy(h, w, y, chunk=chunk, token_weight=tw)
    gh, gw = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=5e-6)     # weights up to 4 scale the fp32 error
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=5e-6)
    # unit weights are the unweighted loss
    torch.testing.assert_close(chunked_cross_entropy(h, w, y, token_weight=torch.ones(len(y))),
                               chunked_cross_entropy(h, w, y))


def test_float64_gradcheck():
    h, w, y = _inputs(n=6, d=4, v=7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: chunked_cross_entropy(a, b, y, chunk=4), (h, w))


def test_bf16_autocast_close_to_fp32():
    h, w, y = _inputs(n=64, d=32, v=300)
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy(h, w, y, chunk=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)
    got.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_empty_and_tied_weight_grads():
    h, w, y = _inputs(n=0)
    loss = chunked_cross_entropy(h, w, y)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(w.grad) == 0
    # a weight used twice (tied embedding + head) accumulates both gradients
    emb = torch.nn.Embedding(11, 8)
    tok = torch.tensor([1, 2, 3])
    hid = emb(tok) * 2
    chunked_cross_entropy(hid, emb.weight, torch.tensor([4, 5, 6]), chunk=2).backward()
    g1 = emb.weight.grad.clone()
    emb.weight.grad = None
    F.cross_entropy(emb(tok) * 2 @ emb.weight.t(), torch.tensor([4, 5, 6]), reduction="sum").backward()
    torch.testing.assert_close(g1, emb.weight.grad)


def test_bad_input():
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="hidden must be"):
        chunked_cross_entropy(h, w[:, :3], y)
    with pytest.raises(ValueError, match="targets must be"):
        chunked_cross_entropy(h, w, y[:3])
    with pytest.raises(TypeError, match="targets must be int64"):
        chunked_cross_entropy(h, w, y.int())
    with pytest.raises(ValueError, match="chunk"):
        chunked_cross_entropy(h, w, y, chunk=0)
    with pytest.raises(ValueError, match="token_weight"):
        chunked_cross_entropy(h, w, y, token_weight=torch.ones(3))
    with pytest.raises(TypeError, match="token_weight"):
        chunked_cross_entropy(h, w, y, token_weight=torch.ones(len(y), dtype=torch.int64))
