"""Attention's output projection with the split-sequence merge as its prologue and the residual add as
its epilogue: ``residual += merge(m, l, acc) @ W_o^T``, where ``merge`` is ``decode_attention``'s stage 2.

This saves the merge's launch (one per layer; 30 of SmolLM2's ~180 per token). Each program rebuilds
the whole attention output of its rows from the float32 partials instead of reading a merged row: it
reads ``M * H * SPLITS * (Dh + 2) * 4`` bytes from L2 (28 KB per row for SmolLM2 with 12 chunks) next to
its ``BLOCK_N * H * Dh`` slice of ``W_o``. That redundancy is cheap only while the partials are small,
so ``rtkern.fused_decode`` uses this for small models with the chunk count capped. For an 8B model (512
programs, 266 KB of partials per row each) the separate merge kernel is cheaper.
Bytes from HBM: ``W_o`` (``N * H * Dh * elt``) and the residual read and write, as ``fused_linear``.
Rounding: the merged row is rounded to the dtype before the GEMM, as ``decode_attention`` stores it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_disjoint, check_tensors, round_to
from .fused_linear import gemm_config, tile_dot


@triton.jit
def _attn_out_proj_kernel(
    m_ptr, l_ptr, acc_ptr, w_ptr, w_stride, res_ptr, res_stride,
    M, N, H, DH, SPLITS,
    SPLITS_P2: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    DT = res_ptr.dtype.element_ty
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    sp = tl.arange(0, SPLITS_P2)
    m_ok, n_ok = rm < M, rn < N
    K = H * DH
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * w_stride
    y = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        # partial (row, head, split) of column kk: ((row * H + kk // DH) * SPLITS + split)
        part = (rm.to(tl.int64)[:, None, None] * H + (kk // DH)[None, :, None]) * SPLITS + sp[None, None, :]
        ok = m_ok[:, None, None] & k_ok[None, :, None] & (sp < SPLITS)[None, None, :]
        m = tl.load(m_ptr + part, mask=ok, other=float("-inf"))
        l = tl.load(l_ptr + part, mask=ok, other=0.0)
        a = tl.load(acc_ptr + part * DH + (kk % DH)[None, :, None], mask=ok, other=0.0)
        # a live row's chunk 0 holds slot 0, so its max is finite; masked rows and columns get weight 0 and
        # are divided by 1, not 0, or a NaN would reach the live outputs through the dot
        mx = tl.max(m, axis=2)
        wgt = tl.exp(m - tl.where(mx > float("-inf"), mx, 0.0)[:, :, None])
        den = tl.where(m_ok[:, None] & k_ok[None, :], tl.sum(wgt * l, axis=2), 1.0)
        x = round_to(tl.sum(wgt * a, axis=2) / den, DT)
        y += tile_dot(x, tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0),
                       USE_DOT, IEEE)
    at = res_ptr + rm.to(tl.int64)[:, None] * res_stride + rn[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    out = round_to(tl.load(at, mask=o_mask, other=0.0).to(tl.float32) + round_to(y, DT).to(tl.float32), DT)
    tl.store(at, out, mask=o_mask)


def attention_out_proj(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, weight: torch.Tensor,
                       residual: torch.Tensor) -> torch.Tensor:
    """``residual += decode_attention_merge(m, l, acc) @ weight.T`` in one launch; returns ``residual``.

    Parameters
    ----------
    m, l : [M, H, SPLITS] float32; acc : [M, H, SPLITS, Dh] float32, contiguous, from
        ``decode_attention_partials``
    weight : [N, H * Dh], ``residual``'s dtype, contiguous (the o-projection)
    residual : [M, N] float32/bfloat16/float16, contiguous last dim; updated in place
    """
    check_tensors(m=m, l=l, acc=acc, weight=weight, residual=residual)
    if acc.dim() != 4 or 0 in acc.shape[1:] or m.shape != acc.shape[:3] or l.shape != m.shape \
            or any(t.dtype != torch.float32 or not t.is_contiguous() for t in (m, l, acc)):
        raise ValueError(f"m, l must be contiguous float32 [M, H, SPLITS] and acc [M, H, SPLITS, Dh] (H, SPLITS, "
                         f"Dh > 0), got {[(tuple(t.shape), t.dtype) for t in (m, l, acc)]}")
    M, H, splits, Dh = acc.shape
    if residual.dim() != 2 or residual.shape[0] != M or residual.shape[1] == 0 \
            or residual.dtype not in (torch.float32, torch.bfloat16, torch.float16) or residual.stride(1) != 1 \
            or (M > 1 and residual.stride(0) < residual.shape[1]):
        raise ValueError(f"residual must be a [{M}, N] float tensor with a contiguous last dimension and rows that "
                         f"do not overlap, got {tuple(residual.shape)} {residual.dtype} with strides "
                         f"{residual.stride() if residual.dim() else ()}")
    if weight.shape != (residual.shape[1], H * Dh) \
            or weight.dtype != residual.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{residual.shape[1]}, {H * Dh}] {residual.dtype} tensor, "
                         f"got {tuple(weight.shape)} {weight.dtype}")
    # residual is written tile by tile while the others are read: no shared memory
    check_disjoint(m=m, l=l, acc=acc, weight=weight, residual=residual)
    if M == 0:
        return residual
    N = weight.shape[0]
    sp2 = triton.next_power_of_2(splits)
    cfg = gemm_config(M, N, H * Dh, residual.device)
    # The three [BLOCK_M, BLOCK_K, SPLITS] partial tiles share the register budget with the weight tile.
    # With tl.dot (more than 8 rows) 4096-element tiles spilled on sm_90 (255 registers at B=32, per
    # tests/gpu_compile.py); half the tile and eight warps compile to ~120 registers and no spills.
    tile = 2048 if cfg["USE_DOT"] else 4096
    cfg["BLOCK_K"] = max(16, min(cfg["BLOCK_K"], tile // (cfg["BLOCK_M"] * sp2)))
    if cfg["USE_DOT"]:
        cfg["num_warps"] = 8
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    _attn_out_proj_kernel[grid](m, l, acc, weight, weight.stride(0), residual, residual.stride(0),
                                M, N, H, Dh, splits, SPLITS_P2=sp2, IEEE=residual.dtype == torch.float32, **cfg)
    return residual
