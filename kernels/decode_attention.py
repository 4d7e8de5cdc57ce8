"""Decode attention: one query per row over the static KV cache, split along the sequence.

Stage 1 (grid B x Hkv x SPLITS) handles all query heads of one KV head (GQA without repeating k/v)
over one chunk of the cache, keeping an online-softmax max, sum and weighted value sum in float32;
chunks past the row's length exit at once, so the grid can be sized for the whole cache and stay
CUDA-graph static. Stage 2 (grid B x H) merges the chunk partials. Splitting matters at small batch:
SmolLM2 has 3 KV heads, so without it B=1 would run 3 programs on a 132-SM GPU.

Bytes moved: the live cache, ``2 * B * Hkv * L * Dh * elt`` (L = position + 1), plus q, the output and
``B * H * SPLITS * (Dh + 2) * 4`` of partials. Llama-3-8B, B=1, L=384, bf16: 1.6 MB per layer, 0.5 us.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensors, num_sms, round_to


@triton.jit
def _partial_kernel(
    q_ptr, q_stride_b, q_stride_h, k_ptr, v_ptr, c_stride_b, c_stride_h, c_stride_s, pos_ptr,
    m_ptr, l_ptr, acc_ptr, H, REP, DH, CHUNK, SPLITS, scale,
    REP_P2: tl.constexpr, DH_P2: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, tl.load(pos_ptr + b) + 1)
    r = tl.arange(0, REP_P2)
    d = tl.arange(0, DH_P2)
    heads = kvh * REP + r
    qmask = (r < REP)[:, None] & (d < DH)[None, :]
    q = tl.load(q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + d[None, :], mask=qmask, other=0.0)
    q = q.to(tl.float32) * scale
    m = tl.full([REP_P2], float("-inf"), tl.float32)
    l = tl.zeros([REP_P2], tl.float32)
    acc = tl.zeros([REP_P2, DH_P2], tl.float32)
    base = b * c_stride_b + kvh * c_stride_h
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < end
        kvmask = smask[:, None] & (d < DH)[None, :]
        k = tl.load(k_ptr + base + s[:, None] * c_stride_s + d[None, :], mask=kvmask, other=0.0)
        scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)          # [REP, BLOCK_S]
        scores = tl.where(smask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))      # finite: every tile has a live slot
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        v = tl.load(v_ptr + base + s[:, None] * c_stride_s + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    part = (b * H + heads) * SPLITS + split
    tl.store(m_ptr + part, m, mask=r < REP)
    tl.store(l_ptr + part, l, mask=r < REP)
    tl.store(acc_ptr + part[:, None] * DH + d[None, :], acc, mask=qmask)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, out_stride, H, DH, SPLITS,
                  SPLITS_P2: tl.constexpr, DH_P2: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, DH_P2)
    part = (b * H + h) * SPLITS + sp
    m = tl.load(m_ptr + part, mask=sp < SPLITS, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=sp < SPLITS, other=0.0)
    mx = tl.max(m, axis=0)                                  # finite: split 0 always holds slot 0
    w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)
    acc = tl.load(acc_ptr + part[:, None] * DH + d[None, :], mask=(sp < SPLITS)[:, None] & (d < DH)[None, :],
                  other=0.0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out_ptr + b * out_stride + h * DH + d, round_to(o, out_ptr.dtype.element_ty), mask=d < DH)


def _plan(B: int, n_kv: int, S: int, device: torch.device, block_s: int, max_splits: int | None) -> int:
    """Chunk length: enough programs to cover the GPU about twice at this batch, whole tiles each."""
    splits = max(1, min(triton.cdiv(2 * num_sms(device), B * n_kv), triton.cdiv(S, block_s), max_splits or S))
    return triton.cdiv(triton.cdiv(S, splits), block_s) * block_s


def decode_attention_partials(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                              *, chunk: int | None = None, max_splits: int | None = None):
    """Stage 1 alone: per chunk of the cache, the softmax max ``m``, sum ``l`` and weighted value sum ``acc``.

    For a consumer that merges the chunks itself (``attention_out_proj`` does it in its GEMM prologue).
    Parameters as ``decode_attention``; ``max_splits`` caps the number of chunks (default: none).

    Returns
    -------
    m, l : [B, H, SPLITS] float32; acc : [B, H, SPLITS, Dh] float32. A chunk past a row's position holds
    ``m = -inf, l = 0, acc = 0``; chunk 0 always holds slot 0.
    """
    _check(q, k_cache, v_cache, pos)
    for name, v in (("chunk", chunk), ("max_splits", max_splits)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    B, H, Dh = q.shape
    n_kv, S = k_cache.shape[1], k_cache.shape[2]
    rep, dh_p2 = H // n_kv, triton.next_power_of_2(Dh)
    rep_p2 = triton.next_power_of_2(rep)
    block_s = max(16, min(64, 8192 // (rep_p2 * dh_p2)))
    chunk = chunk or (_plan(B, n_kv, S, q.device, block_s, max_splits) if B else S)
    splits = triton.cdiv(S, chunk)
    f32 = dict(dtype=torch.float32, device=q.device)
    m, l = torch.empty(B, H, splits, **f32), torch.empty(B, H, splits, **f32)
    acc = torch.empty(B, H, splits, Dh, **f32)
    if B == 0:
        return m, l, acc
    _partial_kernel[(B, n_kv, splits)](
        q, q.stride(0), q.stride(1), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), pos, m, l, acc, H, rep, Dh, chunk, splits, Dh ** -0.5,
        REP_P2=rep_p2, DH_P2=dh_p2, BLOCK_S=block_s, num_warps=4)
    return m, l, acc


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     *, chunk: int | None = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(Dh)) v`` for one query per row over cache slots ``0..pos[b]``.

    Parameters
    ----------
    q : [B, H, Dh], model dtype, contiguous last dim (any row/head strides)
    k_cache, v_cache : [B_max >= B, Hkv, S, Dh], same dtype, contiguous; H must be a multiple of Hkv
    pos : [B] int64, the last live slot of each row, in ``[0, S)`` (guaranteed by the caller; checking
        it would need a host sync)
    chunk : slots per stage-1 program (a multiple of the tile; default: sized to fill the GPU)

    Returns
    -------
    [B, H * Dh] in ``q``'s dtype (heads concatenated, ready for the output projection).
    """
    m, l, acc = decode_attention_partials(q, k_cache, v_cache, pos, chunk=chunk)
    B, H, splits, Dh = acc.shape
    out = torch.empty(B, H * Dh, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    _merge_kernel[(B, H)](m, l, acc, out, out.stride(0), H, Dh, splits,
                          SPLITS_P2=triton.next_power_of_2(splits), DH_P2=triton.next_power_of_2(Dh), num_warps=1)
    return out


def decode_attention_reference(q, k_cache, v_cache, pos):
    """Float32 torch version: masked softmax over slots ``<= pos`` (GQA by head groups)."""
    B, H, Dh = q.shape
    k, v = k_cache[:B].float(), v_cache[:B].float()
    qg = q.float().view(B, k.shape[1], H // k.shape[1], Dh)
    s = torch.matmul(qg, k.transpose(-1, -2)) * Dh ** -0.5                        # [B, Hkv, rep, S]
    live = torch.arange(k.shape[2], device=q.device) <= pos[:, None]
    s = s.masked_fill(~live[:, None, None], float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v).reshape(B, H * Dh).to(q.dtype)


def _check(q, k_cache, v_cache, pos):
    check_tensors(q=q, k_cache=k_cache, v_cache=v_cache, pos=pos)
    if q.dim() != 3 or 0 in q.shape[1:] or q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or q.stride(-1) != 1:
        raise ValueError(f"q must be a [B, H, Dh] float tensor (H, Dh > 0) with a contiguous last dim, got "
                         f"{tuple(q.shape)} {q.dtype}")
    B, H, Dh = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] < B or k_cache.shape[3] != Dh or 0 in k_cache.shape[1:3] \
            or H % k_cache.shape[1]:
        raise ValueError(f"k_cache must be [>={B}, Hkv dividing {H}, S > 0, {Dh}], got {tuple(k_cache.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.shape != k_cache.shape or c.dtype != q.dtype or not c.is_contiguous() or c.device != q.device:
            raise ValueError(f"{name} must be a contiguous {tuple(k_cache.shape)} {q.dtype} tensor on "
                             f"{q.device}, got {tuple(c.shape)} {c.dtype} on {c.device}")
    if pos.shape != (B,) or pos.dtype != torch.int64 or pos.device != q.device:
        raise ValueError(f"pos must be a [{B}] int64 tensor on {q.device}, got {tuple(pos.shape)} {pos.dtype}")
