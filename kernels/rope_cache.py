"""RoPE on the decode step's q and k, and the write of k and v into the static KV cache, in one launch.

Input is the fused q/k/v projection of one token per row, ``[B, (H + 2*Hkv) * Dh]``: q heads are
rotated in place; k heads are rotated and stored at ``k_cache[b, h, pos[b]]``, v heads copied to
``v_cache[b, h, pos[b]]``. Angles come from a ``[S, Dh]`` float32 table (cos of the ``Dh/2`` frequencies,
then their sin), built once per cache, so no per-step trigonometry and no range-reduction error.
Bytes moved per row: read ``(H + 2*Hkv) * Dh * elt`` and ``(H + Hkv) * Dh * 4`` of table, write the same
q/k/v bytes: ~11 KB for Llama-3-8B at B=1 — replacing ~12 torch launches (rope math, two index_put).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_disjoint, check_tensors, round_to


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, qkv_stride, pos_ptr, table_ptr, k_ptr, v_ptr,
    cache_stride_b, cache_stride_h, cache_stride_s,
    H, HKV, HALF, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    inb = offs < HALF
    pos = tl.load(pos_ptr + row)
    cos = tl.load(table_ptr + pos * 2 * HALF + offs, mask=inb, other=0.0)
    sin = tl.load(table_ptr + pos * 2 * HALF + HALF + offs, mask=inb, other=0.0)
    src = qkv_ptr + row * qkv_stride + head * 2 * HALF
    x1 = tl.load(src + offs, mask=inb, other=0.0)
    x2 = tl.load(src + HALF + offs, mask=inb, other=0.0)
    y1 = round_to(x1.to(tl.float32) * cos - x2.to(tl.float32) * sin, x1.dtype)
    y2 = round_to(x2.to(tl.float32) * cos + x1.to(tl.float32) * sin, x1.dtype)
    if head < H:
        tl.store(src + offs, y1, mask=inb)
        tl.store(src + HALF + offs, y2, mask=inb)
    else:
        kv = head - H
        slot = row * cache_stride_b + kv * cache_stride_h + pos * cache_stride_s
        tl.store(k_ptr + slot + offs, y1, mask=inb)
        tl.store(k_ptr + slot + HALF + offs, y2, mask=inb)
        vsrc = qkv_ptr + row * qkv_stride + (H + HKV + kv) * 2 * HALF
        tl.store(v_ptr + slot + offs, tl.load(vsrc + offs, mask=inb, other=0.0), mask=inb)
        tl.store(v_ptr + slot + HALF + offs, tl.load(vsrc + HALF + offs, mask=inb, other=0.0), mask=inb)


def rope_table(inv_freq: torch.Tensor, max_seq: int) -> torch.Tensor:
    """``[max_seq, Dh]`` float32: ``cos(p * inv_freq)`` then ``sin(p * inv_freq)`` for every position p."""
    ang = torch.arange(max_seq, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq.float()
    return torch.cat((ang.cos(), ang.sin()), dim=-1).contiguous()


def rope_cache_update(qkv: torch.Tensor, pos: torch.Tensor, table: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Rotate q (in place) and k, write k and v into the cache at ``pos``; returns q as ``[B, H, Dh]``.

    Parameters
    ----------
    qkv : [B, (H + 2*Hkv) * Dh], model dtype, contiguous last dim (modified in place: q rotated)
    pos : [B] int64, each row's position, in ``[0, S)`` (the caller guarantees the range: checking it
        would cost a host sync per step)
    table : [S, Dh] float32 from ``rope_table``
    k_cache, v_cache : [B_max >= B, Hkv, S, Dh], model dtype, contiguous
    """
    check_tensors(qkv=qkv, pos=pos, table=table, k_cache=k_cache, v_cache=v_cache)
    if qkv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"qkv must be float32, bfloat16 or float16, got {qkv.dtype}")
    if qkv.dim() != 2 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be 2-D [B, (H + 2*Hkv) * Dh] with a contiguous last dim, got "
                         f"{tuple(qkv.shape)}")
    B = qkv.shape[0]
    check_rope_cache(qkv.shape[1], B, pos, table, k_cache, v_cache, n_heads, n_kv_heads, qkv.dtype)
    Dh = table.shape[-1]
    check_disjoint(qkv=qkv, table=table, k_cache=k_cache)  # q is rotated in place while k/v are written
    check_disjoint(qkv=qkv, v_cache=v_cache)
    half = Dh // 2
    _rope_cache_kernel[(B, n_heads + n_kv_heads)](
        qkv, qkv.stride(0), pos, table, k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), n_heads, n_kv_heads, half, BLOCK=triton.next_power_of_2(half), num_warps=1)
    return qkv[:, :n_heads * Dh].view(B, n_heads, Dh)


def check_rope_cache(width, B, pos, table, k_cache, v_cache, n_heads, n_kv_heads, dtype):
    """Checks shared with qkv_rope: ``width`` q/k/v columns for ``B`` rows, positions, table and caches."""
    check_tensors(pos=pos, table=table, k_cache=k_cache, v_cache=v_cache)
    for name, n in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if table.dim() != 2 or table.dtype != torch.float32 or not table.is_contiguous() or table.shape[-1] % 2 \
            or 0 in table.shape:
        raise ValueError(f"table must be a contiguous, non-empty [S, Dh] float32 tensor with even Dh, got "
                         f"{tuple(table.shape)} {table.dtype}")
    Dh = table.shape[-1]
    if width != (n_heads + 2 * n_kv_heads) * Dh:
        raise ValueError(f"qkv width must be (H + 2*Hkv) * Dh = {(n_heads + 2 * n_kv_heads) * Dh}, got {width}")
    if pos.shape != (B,) or pos.dtype != torch.int64:
        raise ValueError(f"pos must be a [{B}] int64 tensor, got {tuple(pos.shape)} {pos.dtype}")
    want = (n_kv_heads, table.shape[0], Dh)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or tuple(c.shape[1:]) != want or c.shape[0] < B or c.dtype != dtype \
                or not c.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [>={B}, {want[0]}, {want[1]}, {want[2]}] {dtype} "
                             f"tensor, got {tuple(c.shape)} {c.dtype}")
    check_disjoint(k_cache=k_cache, v_cache=v_cache)


def rope_cache_update_reference(qkv, pos, table, k_cache, v_cache, n_heads, n_kv_heads):
    """Float32 torch version of the same update (returns q ``[B, H, Dh]``; writes the caches)."""
    B, Dh = qkv.shape[0], table.shape[-1]
    x = qkv.view(B, n_heads + 2 * n_kv_heads, Dh)
    cos, sin = table[pos, None, :Dh // 2], table[pos, None, Dh // 2:]
    x1, x2 = x[:, :n_heads + n_kv_heads, :Dh // 2].float(), x[:, :n_heads + n_kv_heads, Dh // 2:].float()
    rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(qkv.dtype)
    rows = torch.arange(B, device=qkv.device)
    k_cache[rows, :, pos] = rot[:, n_heads:]
    v_cache[rows, :, pos] = x[:, n_heads + n_kv_heads:]
    return rot[:, :n_heads].contiguous()
