"""Small-batch linear layer with the decode step's neighbours fused in: RMSNorm before, SwiGLU or the
residual add after.

``y = rmsnorm(x) * norm_weight @ W^T`` (norm optional), then either ``silu(y_gate) * y_up`` (``W`` holds gate
rows ``[0, I)`` and up rows ``[I, 2I)``) or ``residual += y`` in place. At decode batch sizes the GEMM is a
weight read: the bytes floor is ``N * K * elt`` (plus ``M * (K + N) * elt`` of activations), 1.1 MB for
SmolLM2's q/k/v at bf16 — about 0.4 µs at 3 TB/s, less than a launch. So the norm and the epilogues ride
along instead of costing their own launches (SmolLM2 decodes 30 layers; each launch saved per layer is
30 per token). Each program recomputes its rows' RMS from ``x``: ``M * K`` elements from L2, next to its
``BLOCK_N * K`` slice of the weight.

Rounding follows the unfused torch path (``Transformer.forward``): the normed row is rounded to the dtype
before the weight multiply and again after, the GEMM output is rounded before the activation or the add,
and silu is rounded before the product.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_disjoint, check_eps, check_tensors, interpreter_enabled, num_sms, round_to


@triton.jit
def tile_dot(x, w, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    # [BM, BK] x [BN, BK] -> [BM, BN] float32. Below 16 rows tl.dot cannot tile, and a broadcast
    # multiply-reduce on CUDA cores is as fast as the weight read it waits for.
    if USE_DOT == 2:
        # the CPU interpreter's tl.dot misreads bfloat16; a bf16 product is exact in float32 anyway
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    elif USE_DOT == 1:
        if IEEE:
            return tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            return tl.dot(x, tl.trans(w))
    else:
        return tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def norm_gemm_tile(x_ptr, x_stride, rm, nw_ptr, w_ptr, w_stride, rn, pair_off, M, N, K, eps, DT: tl.constexpr,
                   NORM: tl.constexpr, PAIR: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` float32 tiles of ``norm(x) @ W[rn]^T`` and, with PAIR, of ``W[rn + pair_off]``.

    Rows ``rm`` of x (``< M``), weight rows ``rn`` (``< N``); the caller rounds and stores.
    """
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * x_stride
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * w_stride
    if NORM:
        ss = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_rows + k0 + rk[None, :], mask=m_ok[:, None] & (k0 + rk < K)[None, :], other=0.0)
            ss += tl.sum(xk.to(tl.float32) * xk.to(tl.float32), axis=1)
        rstd = tl.rsqrt(ss / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_pair = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + rk < K
        x = tl.load(x_rows + k0 + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            nw = tl.load(nw_ptr + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)
            x = round_to(nw[None, :] * round_to(x.to(tl.float32) * rstd[:, None], DT).to(tl.float32), DT)
        w_mask = n_ok[:, None] & k_ok[None, :]
        acc += tile_dot(x, tl.load(w_rows + k0 + rk[None, :], mask=w_mask, other=0.0), USE_DOT, IEEE)
        if PAIR:
            w2 = tl.load(w_rows + pair_off * w_stride + k0 + rk[None, :], mask=w_mask, other=0.0)
            acc_pair += tile_dot(x, w2, USE_DOT, IEEE)
    return acc, acc_pair


@triton.jit
def _fused_linear_kernel(
    x_ptr, x_stride, nw_ptr, w_ptr, w_stride, out_ptr, out_stride,
    M, N, K, eps,
    NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    DT = out_ptr.dtype.element_ty
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, acc_up = norm_gemm_tile(x_ptr, x_stride, rm, nw_ptr, w_ptr, w_stride, rn, N, M, N, K, eps, DT,
                                 NORM, SWIGLU, USE_DOT, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    y = round_to(acc, DT)
    if SWIGLU:
        g = y.to(tl.float32)
        act = round_to(g / (1.0 + tl.exp(-g)), DT)
        y = round_to(act.to(tl.float32) * round_to(acc_up, DT).to(tl.float32), DT)
    out_at = out_ptr + rm.to(tl.int64)[:, None] * out_stride + rn[None, :]
    o_mask = (rm < M)[:, None] & (rn < N)[None, :]
    if RESIDUAL:
        y = round_to(tl.load(out_at, mask=o_mask, other=0.0).to(tl.float32) + y.to(tl.float32), DT)
    tl.store(out_at, y, mask=o_mask)


def gemm_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Tile sizes: tl.dot from 9 rows up; below, enough column blocks to cover the GPU about twice.

    ``USE_DOT``: 0 multiply-reduce, 1 tl.dot, 2 tl.dot on float32 copies (the interpreter).
    """
    bk = min(triton.next_power_of_2(K), 256 if M <= 2 else 64)
    if M > 8:   # narrow column blocks for narrow layers: SmolLM2's 576 outputs would be 9 programs at 64
        bn = max(16, min(64, triton.next_power_of_2(triton.cdiv(N, num_sms(device)))))
        return dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_N=bn, BLOCK_K=max(16, bk),
                    USE_DOT=2 if interpreter_enabled() else 1, num_warps=4)
    bm = triton.next_power_of_2(M)
    cap = max(8, 8192 // (bm * bk))
    want = max(8, triton.next_power_of_2(max(1, N // (2 * num_sms(device)))) // 2)
    return dict(BLOCK_M=bm, BLOCK_N=min(cap, want, triton.next_power_of_2(N)), BLOCK_K=bk,
                USE_DOT=0, num_warps=4)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None,
                 eps: float = 1e-5, swiglu: bool = False,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T`` with an optional RMSNorm on ``x`` and a SwiGLU or residual-add epilogue.

    Parameters
    ----------
    x : [M, K] float32/bfloat16/float16, contiguous last dim
    weight : [N, K] (``[2I, K]`` with ``swiglu``: gate rows then up rows), ``x``'s dtype, contiguous
    norm_weight : [K], ``x``'s dtype; when given, ``x`` is first replaced by ``rmsnorm(x) * norm_weight``
    eps : RMSNorm epsilon (used only with ``norm_weight``)
    swiglu : return ``silu(y[:, :I]) * y[:, I:]``, ``[M, I]``
    residual : [M, N], ``x``'s dtype, contiguous; ``residual += y`` in place and returned

    Returns
    -------
    [M, N] (``[M, I]`` with ``swiglu``) in ``x``'s dtype; ``residual`` itself when given.
    """
    check_linear(x, weight, norm_weight, swiglu, residual)
    eps = check_eps(eps)
    M, K = x.shape
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    out = residual if residual is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    cfg = gemm_config(M, N, K, x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    _fused_linear_kernel[grid](
        x, x.stride(0), norm_weight if norm_weight is not None else x, weight, weight.stride(0),
        out, out.stride(0), M, N, K, eps,
        NORM=norm_weight is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
        IEEE=x.dtype == torch.float32, **cfg)
    return out


def fused_linear_reference(x, weight, *, norm_weight=None, eps=1e-5, swiglu=False, residual=None):
    """The same in torch ops, rounded like ``Transformer.forward``; ``residual`` is not modified."""
    if norm_weight is not None:
        xf = x.float()
        x = norm_weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = F.linear(x, weight)
    if swiglu:
        g, u = y.chunk(2, dim=-1)
        y = F.silu(g) * u
    return y if residual is None else residual + y


def check_linear(x, weight, norm_weight, swiglu, residual):
    """fused_linear's argument checks (also qkv_rope's): ValueError/TypeError before any launch."""
    check_tensors(x=x, weight=weight, **{k: t for k, t in (("norm_weight", norm_weight), ("residual", residual))
                                         if t is not None})
    if not isinstance(swiglu, bool):
        raise TypeError(f"swiglu must be a bool, got {type(swiglu).__name__}")
    for name, t in (("x", x), ("weight", weight)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {tuple(t.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight must be non-empty, got {tuple(weight.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight must match x ({x.dtype} on {x.device}), got {weight.dtype} on {weight.device}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [N, {x.shape[1]}] for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if swiglu and weight.shape[0] % 2:
        raise ValueError(f"swiglu needs an even number of weight rows (gate then up), got {weight.shape[0]}")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("x needs a contiguous last dimension and weight must be contiguous")
    if norm_weight is not None and (norm_weight.shape != (x.shape[1],) or norm_weight.dtype != x.dtype
                                    or not norm_weight.is_contiguous()):
        raise ValueError(f"norm_weight must be a contiguous [{x.shape[1]}] {x.dtype} tensor, got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype}")
    if residual is not None:
        if swiglu:
            raise ValueError("swiglu and residual cannot be combined")
        n = weight.shape[0]
        if residual.shape != (x.shape[0], n) or residual.dtype != x.dtype or residual.stride(1) != 1 \
                or (x.shape[0] > 1 and residual.stride(0) < n):
            raise ValueError(f"residual must be a [{x.shape[0]}, {n}] {x.dtype} tensor with a contiguous last "
                             f"dimension and rows that do not overlap, got {tuple(residual.shape)} {residual.dtype} "
                             f"with strides {residual.stride()}")
        check_disjoint(x=x, weight=weight, norm_weight=norm_weight, residual=residual)
