"""Training kernels (RMSNorm and SwiGLU forward/backward) against torch autograd, and a tiny model trained
on them against the same model on torch ops."""
import pytest
import torch
import torch.nn.functional as F

from rtkern.kernels._common import num_sms
from rtkern.kernels.rmsnorm import rms_norm
from rtkern.kernels.swiglu import silu_mul
from rtkern.model import ModelArgs, Transformer
from rtkern.train.config import TrainConfig
from rtkern.train.trainer import SFTModule, build_optimizer, use_triton_kernels

from conftest import DEVICE, ON_GPU

# float32: summation order only. bfloat16 gradients are rounded once here and several times in torch.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
SHAPES = [(3, 64), (2, 5, 100), (7, 1000)] + ([(4, 1024, 4096)] if ON_GPU else [])


def _leaf(shape, dtype, seed, scale=1.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEVICE) * scale).to(dtype).requires_grad_()


def _grads(fn, *inputs, dy):
    out = fn(*inputs)
    out.backward(dy)
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    return out.detach(), grads


def _rms_torch(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_forward_and_backward_match_torch(dtype, shape):
    x, w = _leaf(shape, dtype, 1, scale=3.0), _leaf(shape[-1:], dtype, 2)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    y, (dx, dw) = _grads(lambda a, b: rms_norm(a, b, 1e-5), x, w, dy=dy)
    y_ref, (dx_ref, dw_ref) = _grads(lambda a, b: _rms_torch(a, b, 1e-5), x, w, dy=dy)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(dx, dx_ref, **TOL[dtype])
    # dw sums over every row: compare relative to its scale
    torch.testing.assert_close(dw.float(), dw_ref.float(), rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * dw_ref.float().abs().max().item())


def test_rms_norm_backward_with_a_short_last_program():
    # the backward gives each program a run of rows; with M not a multiple of the run the last program is
    # short and must stop at M (no program count on CPU or GPU divides 8 * SMs + 5 evenly here)
    M = 8 * num_sms(DEVICE) + 5
    per = -(-M // min(M, 4 * num_sms(DEVICE)))
    assert M % per, "the shape must leave the last program short"
    x, w = _leaf((M, 64), torch.float32, 5, scale=3.0), _leaf((64,), torch.float32, 6)
    dy = torch.randn(M, 64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    _, (dx, dw) = _grads(lambda a, b: rms_norm(a, b, 1e-5), x, w, dy=dy)
    _, (dx_ref, dw_ref) = _grads(lambda a, b: _rms_torch(a, b, 1e-5), x, w, dy=dy)
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float32])
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5 * dw_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 50), (2, 2500)] + ([(8, 1024, 1536)] if ON_GPU else []))
def test_silu_mul_forward_and_backward_match_torch(dtype, shape):
    g, u = _leaf(shape, dtype, 3, scale=3.0), _leaf(shape, dtype, 4)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    out, (dg, du) = _grads(silu_mul, g, u, dy=dy)
    out_ref, (dg_ref, du_ref) = _grads(lambda a, b: F.silu(a) * b, g, u, dy=dy)
    for got, want in ((out, out_ref), (dg, dg_ref), (du, du_ref)):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("op", ["rms_norm", "silu_mul"])
def test_kernels_take_transposed_inputs_and_gradients(op):
    # The kernels index rows by one stride and columns with unit stride. A transposed input, and the
    # transposed gradient autograd hands back through a .t() (strides (1, M)), must be made contiguous
    # first, or the kernels read the wrong elements of valid memory.
    M, D = 6, 40
    fn, ref = ((lambda a, b: rms_norm(a, b, 1e-5)), (lambda a, b: _rms_torch(a, b, 1e-5))) if op == "rms_norm" \
        else (silu_mul, lambda a, b: F.silu(a) * b)
    a = _leaf((D, M), torch.float32, 8, scale=3.0)
    b = _leaf((D,) if op == "rms_norm" else (D, M), torch.float32, 9)
    dyt = torch.randn(D, M, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    second = (lambda t: t) if op == "rms_norm" else (lambda t: t.t())
    results = []
    for f in (fn, ref):
        out = f(a.t(), second(b))
        (out.t() * dyt).sum().backward()          # d out = dyt.t(): not contiguous
        results.append((out.detach(), a.grad.clone(), b.grad.clone()))
        a.grad = b.grad = None
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_rms_norm_backward_rounds_dx_to_nearest():
    # dx is computed in float32 and rounded once to bfloat16, to nearest even like torch (the interpreter's
    # plain conversion truncates): it agrees with the float64 gradient rounded to bfloat16 except near ties
    x, w = _leaf((4, 300), torch.bfloat16, 14, scale=3.0), _leaf((300,), torch.bfloat16, 15)
    dy = torch.randn(4, 300, generator=torch.Generator().manual_seed(16)).to(DEVICE).to(torch.bfloat16)
    _, (dx, _) = _grads(lambda a, b: rms_norm(a, b, 1e-5), x, w, dy=dy)
    x64 = x.detach().double().requires_grad_()
    (w.detach().double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(dy.double())
    assert (dx != x64.grad.to(torch.bfloat16)).float().mean().item() < 0.02


def test_silu_mul_backward_rounds_like_torch():
    # du = dy * silu(g) with silu(g) rounded to bfloat16 first, as torch's unfused silu(g) * u saves it;
    # both round at the same points, so du agrees to the bit (dg is rounded once here, several times in torch)
    g, u = _leaf((4, 300), torch.bfloat16, 11, scale=3.0), _leaf((4, 300), torch.bfloat16, 12)
    dy = torch.randn(4, 300, generator=torch.Generator().manual_seed(13)).to(DEVICE).to(torch.bfloat16)
    _, (_, du) = _grads(silu_mul, g, u, dy=dy)
    _, (_, du_ref) = _grads(lambda a, b: F.silu(a) * b, g, u, dy=dy)
    assert (du != du_ref).float().mean().item() < 0.01


def test_silu_mul_rejects_mismatched_inputs():
    a = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        silu_mul(a, torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        silu_mul(a, a.double())
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        silu_mul(a.long(), a.long())


def _train(kernels: bool, steps: int = 10) -> list[float]:
    """Overfit a tiny model on one batch with rtkern's SFT loss; the loss sequence."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, intermediate_size=96,
                     max_position_embeddings=64)
    model = Transformer(args).to(DEVICE).train()
    if kernels:
        use_triton_kernels(model)
    module, opt = SFTModule(model), build_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.0))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 16), generator=g).to(DEVICE)   # the interpreter runs every program
    index = (torch.arange(2)[:, None] * 16 + torch.arange(4, 15)).reshape(-1).to(DEVICE)
    targets = tokens[:, 5:16].reshape(-1)
    losses = []
    for _ in range(steps):
        loss = module(tokens, None, None, index, targets) / targets.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_tiny_model_converges_the_same_on_triton_kernels():
    ref, got = _train(False), _train(True)
    assert got[-1] < 0.5 * got[0]                      # it learns
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-4)


def test_train_config_kernel_choices():
    assert TrainConfig(kernels="triton").kernels == "triton"
    with pytest.raises(ValueError, match="'torch' or 'triton'"):
        TrainConfig(kernels="cuda")
    with pytest.raises(ValueError, match="pick one"):
        TrainConfig(kernels="triton", compile=True)
