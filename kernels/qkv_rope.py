"""The attention block's whole front half of a decode step in one launch: RMSNorm, the q/k/v GEMM, RoPE,
and the write of k and v into the static KV cache.

One program per (head, block of rows) computes that head's two halves as paired accumulators (weight rows
``[h*Dh, h*Dh + Dh/2)`` and ``[h*Dh + Dh/2, (h+1)*Dh)``), which is exactly the pair RoPE rotates, so the
rotation needs no data exchange between programs. q heads go to the returned ``[M, H, Dh]`` tensor, k heads
(rotated) and v heads to ``k_cache[m, h, pos[m]]`` / ``v_cache[m, h, pos[m]]``.

Bytes moved: the weight, ``(H + 2*Hkv) * Dh * K * elt`` (1.1 MB for SmolLM2 at bf16), plus per row ``K``
of input, ``(H + 2*Hkv) * Dh`` written and ``(H + Hkv) * Dh`` float32 of angle table. The price of the
fusion is parallelism: ``H + 2*Hkv`` programs per row block (15 for SmolLM2, 48 for Llama-3-8B), each
reading ``Dh * K`` of weight. That is fine where a step is launch-bound (a 74 KB slice per program for
SmolLM2) but too few programs to saturate HBM on an 8B model's 1 MB slices, where ``fused_linear`` +
``rope_cache_update`` (one launch more) is the better pair: ``rtkern.fused_decode`` picks by slice size.
Rounding: as ``rope_cache_update`` on the output of ``fused_linear``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_eps, check_tensors, round_to
from .fused_linear import check_linear, gemm_config, norm_gemm_tile
from .rope_cache import check_rope_cache


@triton.jit
def _qkv_rope_kernel(
    x_ptr, x_stride, nw_ptr, w_ptr, w_stride, q_ptr, q_stride, pos_ptr, table_ptr, k_ptr, v_ptr,
    cache_stride_b, cache_stride_h, cache_stride_s,
    M, K, eps, H, HKV, HALF,
    NORM: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    DT = q_ptr.dtype.element_ty
    head = tl.program_id(0)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_N)
    # weight rows of this head's first half; rows past the half are masked by N = its end
    rn = head * 2 * HALF + j
    lo, hi = norm_gemm_tile(x_ptr, x_stride, rm, nw_ptr, w_ptr, w_stride, rn, HALF, M, head * 2 * HALF + HALF,
                            K, eps, DT, NORM, True, USE_DOT, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    lo, hi = round_to(lo, DT).to(tl.float32), round_to(hi, DT).to(tl.float32)
    m_ok = rm < M
    mask = m_ok[:, None] & (j < HALF)[None, :]
    pos = tl.load(pos_ptr + rm, mask=m_ok, other=0)
    if head < H + HKV:
        angle = table_ptr + pos[:, None] * 2 * HALF + j[None, :]
        cos = tl.load(angle, mask=mask, other=0.0)
        sin = tl.load(angle + HALF, mask=mask, other=0.0)
        lo, hi = lo * cos - hi * sin, hi * cos + lo * sin
    if head < H:
        dst = q_ptr + rm.to(tl.int64)[:, None] * q_stride + head * 2 * HALF + j[None, :]
    else:
        kv = head - H
        base = k_ptr
        if kv >= HKV:
            kv -= HKV
            base = v_ptr
        dst = base + rm.to(tl.int64)[:, None] * cache_stride_b + kv * cache_stride_h \
            + pos.to(tl.int64)[:, None] * cache_stride_s + j[None, :]
    tl.store(dst, round_to(lo, DT), mask=mask)
    tl.store(dst + HALF, round_to(hi, DT), mask=mask)


def qkv_rope(x: torch.Tensor, wqkv: torch.Tensor, pos: torch.Tensor, table: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int, *,
             norm_weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``rope_cache_update(fused_linear(x, wqkv, norm_weight=..., eps=...), pos, table, ...)`` in one launch.

    Parameters
    ----------
    x : [M, K] float32/bfloat16/float16, contiguous last dim (the residual stream)
    wqkv : [(H + 2*Hkv) * Dh, K], ``x``'s dtype, contiguous: q rows, then k, then v
    pos : [M] int64, each row's position, in ``[0, S)`` (the caller guarantees the range)
    table : [S, Dh] float32 from ``rope_table``
    k_cache, v_cache : [M_max >= M, Hkv, S, Dh], ``x``'s dtype, contiguous; written at ``pos``
    norm_weight : [K] or None; eps : RMSNorm epsilon

    Returns
    -------
    q : [M, H, Dh] in ``x``'s dtype, rotated.
    """
    check_tensors(x=x, wqkv=wqkv, pos=pos, table=table, k_cache=k_cache, v_cache=v_cache)
    check_linear(x, wqkv, norm_weight, False, None)
    eps = check_eps(eps)
    M, K = x.shape
    check_rope_cache(wqkv.shape[0], M, pos, table, k_cache, v_cache, n_heads, n_kv_heads, x.dtype)
    half = table.shape[-1] // 2
    q = torch.empty(M, n_heads, 2 * half, dtype=x.dtype, device=x.device)
    if M == 0:
        return q
    cfg = gemm_config(M, half, K, x.device)
    # tl.dot tiles need N >= 16 on some Triton/arch pairs; the extra columns of a small head are masked
    cfg["BLOCK_N"] = max(triton.next_power_of_2(half), 16 if cfg["USE_DOT"] else 1)
    if not cfg["USE_DOT"]:      # keep the multiply-reduce tile within the register budget of gemm_config
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(16, 8192 // (cfg["BLOCK_M"] * cfg["BLOCK_N"])))
    grid = (n_heads + 2 * n_kv_heads, triton.cdiv(M, cfg["BLOCK_M"]))
    _qkv_rope_kernel[grid](
        x, x.stride(0), norm_weight if norm_weight is not None else x, wqkv, wqkv.stride(0), q, q.stride(0),
        pos, table, k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        M, K, eps, n_heads, n_kv_heads, half,
        NORM=norm_weight is not None, IEEE=x.dtype == torch.float32, **cfg)
    return q
