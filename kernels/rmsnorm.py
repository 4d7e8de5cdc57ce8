"""RMSNorm: fused residual add + norm for the decode path, and forward/backward for training.

One program per row: ``s = residual + x`` (rounded to the model dtype, as the unfused torch path rounds
it), then ``weight * (s * rsqrt(mean(s^2) + eps))`` with the statistics in float32.
Bytes moved per row: read x, residual, weight, write s and the normed row: ``5 * D * elt``
(``4 * D * elt`` without a residual) — at D=4096, bf16, B=1 that is 41 KB, far below a microsecond;
the kernel exists to replace the ~8 launches torch needs for the same arithmetic.

Training (`rms_norm`, an autograd Function): the forward also stores each row's ``rstd`` (4 bytes); the
backward reads dy, x, w, rstd and writes dx — ``3 * M * D * elt`` — plus one float32 ``[G, D]`` partial of
dw per program, summed by torch (G ~ 4 per SM), instead of torch's ~15 kernels and their intermediates.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_eps, check_tensors, num_sms, round_to


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, x_stride, res_ptr, res_stride, w_ptr, out_ptr, out_stride, sum_ptr, sum_stride, rstd_ptr,
    D, eps,
    HAS_RES: tl.constexpr, STORE_RSTD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inb = offs < D
    x = tl.load(x_ptr + row * x_stride + offs, mask=inb, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * res_stride + offs, mask=inb, other=0.0)
        s = round_to(x.to(tl.float32) + r.to(tl.float32), x.dtype)
        tl.store(sum_ptr + row * sum_stride + offs, s, mask=inb)
    else:
        s = x
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / D + eps)
    if STORE_RSTD:
        tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    y = w.to(tl.float32) * round_to(sf * rstd, x.dtype).to(tl.float32)
    tl.store(out_ptr + row * out_stride + offs, round_to(y, x.dtype), mask=inb)


@triton.jit
def _rmsnorm_bwd_kernel(
    dy_ptr, dy_stride, x_ptr, x_stride, w_ptr, rstd_ptr, dx_ptr, dx_stride, dw_ptr,
    M, D, ROWS_PER_PROG, BLOCK: tl.constexpr,
):
    # y = w * n with n = x * rstd:  dx = rstd * (g - n * mean(g * n)), g = dy * w;  dw = sum_rows dy * n
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    inb = offs < D
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    r0 = pid.to(tl.int64) * ROWS_PER_PROG
    for i in range(0, tl.minimum(ROWS_PER_PROG, M - r0)):
        row = r0 + i
        x = tl.load(x_ptr + row * x_stride + offs, mask=inb, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_stride + offs, mask=inb, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        g = dy * w
        dx = rstd * (g - n * (tl.sum(g * n, axis=0) / D))
        tl.store(dx_ptr + row * dx_stride + offs, round_to(dx, dx_ptr.dtype.element_ty), mask=inb)
        dw += dy * n
    tl.store(dw_ptr + pid * D + offs, dw, mask=inb)


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 256))


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(residual + x) * weight, residual + x)``; without ``residual``, ``(rmsnorm(x) * weight, x)``.

    Parameters
    ----------
    x : [M, D] float32/bfloat16/float16, last dim contiguous
    weight : [D], same dtype as ``x``
    eps : the norm's epsilon
    residual : [M, D] like ``x``, or None

    Returns
    -------
    (normed [M, D], sum [M, D]) in ``x``'s dtype; ``sum`` is the new residual stream.
    """
    _check(x, weight, residual)
    eps = check_eps(eps)
    M, D = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else x
    if M == 0:
        return out, total
    res = residual if residual is not None else x
    BLOCK = triton.next_power_of_2(D)
    _add_rmsnorm_kernel[(M,)](
        x, x.stride(0), res, res.stride(0), weight, out, out.stride(0), total, total.stride(0), out,
        D, eps, HAS_RES=residual is not None, STORE_RSTD=False, BLOCK=BLOCK, num_warps=_num_warps(BLOCK))
    return out, total


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * rmsnorm(x), rstd)`` for ``x`` [M, D]; ``rstd`` [M] float32 is what the backward needs."""
    _check(x, weight, None)
    eps = check_eps(eps)
    M, D = x.shape
    out = torch.empty_like(x)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return out, rstd
    BLOCK = triton.next_power_of_2(D)
    _add_rmsnorm_kernel[(M,)](x, x.stride(0), x, 0, weight, out, out.stride(0), x, 0, rstd, D, eps,
                              HAS_RES=False, STORE_RSTD=True, BLOCK=BLOCK, num_warps=_num_warps(BLOCK))
    return out, rstd


def rmsnorm_backward(dy, x, weight, rstd) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx [M, D], dweight [D])`` of ``rmsnorm_forward``."""
    M, D = x.shape
    dx = torch.empty_like(x)
    if M == 0:
        return dx, torch.zeros_like(weight)
    progs = max(1, min(M, 4 * num_sms(x.device)))
    per = triton.cdiv(M, progs)
    progs = triton.cdiv(M, per)
    dw = torch.empty(progs, D, dtype=torch.float32, device=x.device)
    BLOCK = triton.next_power_of_2(D)
    _rmsnorm_bwd_kernel[(progs,)](dy, dy.stride(0), x, x.stride(0), weight, rstd, dx, dx.stride(0), dw, M, D, per,
                                  BLOCK=BLOCK, num_warps=_num_warps(BLOCK))
    return dx, dw.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """``weight * x * rsqrt(mean(x^2, -1) + eps)`` over the last dim, with the Triton forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = rmsnorm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy.reshape(x2.shape).contiguous(), x2, weight, rstd)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Differentiable RMSNorm on the Triton kernels; ``x`` [..., D] and ``weight`` [D] of one float dtype."""
    check_tensors(x=x, weight=weight)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalized one), got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (normalized) dimension, got shape {tuple(x.shape)}")
    return RMSNormFunction.apply(x, weight, eps)


def add_rmsnorm_reference(x, weight, eps, residual=None):
    """The unfused torch computation the kernel must match (rtkern.model.RMSNorm after an add)."""
    s = x if residual is None else residual + x
    sf = s.float()
    return weight * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype), s


def _check(x, weight, residual):
    check_tensors(x=x, weight=weight, **({} if residual is None else {"residual": residual}))
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"x must be a 2-D [M, D] tensor with D > 0, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError("x must have a contiguous last dimension")
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{x.shape[1]}] {x.dtype} tensor, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(-1) != 1):
        raise ValueError(f"residual must be [{x.shape[0]}, {x.shape[1]}] {x.dtype} with a contiguous last "
                         f"dim, got {tuple(residual.shape)} {residual.dtype}")

