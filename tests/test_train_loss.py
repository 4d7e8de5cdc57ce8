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


@pytest.mark.parametrize("chunk", [16, 1000])
def test_bf16_autocast_runs_the_head_matmul_in_bf16(chunk):
    """Under autocast the head matmul runs in the autocast dtype (bf16), not in hidden's float32: the
    loss and gradients equal a reference computed from bf16-cast inputs, and differ from float32's by
    bf16 rounding."""
    h, w, y = _inputs(n=64, d=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy(h, w, y, chunk=chunk)
    gh, gw = torch.autograd.grad(got, (h, w))
    ref16 = F.cross_entropy((h.bfloat16() @ w.bfloat16().t()).float(), y, reduction="sum")
    rh, rw = torch.autograd.grad(ref16, (h, w))
    ref32 = F.cross_entropy(h @ w.t(), y, reduction="sum")
    fh, fw = torch.autograd.grad(ref32, (h, w))
    assert abs(ref16.item() - ref32.item()) > 0.05             # bf16 rounding is visible at this size
    torch.testing.assert_close(got, ref16, rtol=0, atol=2e-3)  # (chunked log-sum-exp order: ~1e-4)
    # gradients: bf16 too (allowing for an odd flipped bf16 rounding of softmax - onehot); grad_w only
    # in one chunk, since across chunks it sums bf16 partial products in float32 (closer than ref16)
    for g, r, f in ((gh, rh, fh), (gw, rw, fw))[:1 if chunk < len(y) else 2]:
        assert (g - r).abs().mean() < 0.1 * (g - f).abs().mean()
    # an explicit compute_dtype wins over autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = chunked_cross_entropy(h, w, y, chunk=chunk, compute_dtype=torch.float32)
    torch.testing.assert_close(fp32, ref32, rtol=1e-6, atol=1e-4)

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
