"""Fused refusal-token sampler: one read of the logits, no host sync, CUDA-graph capturable.

Stage 1 (grid B x SPLITS) reads each row once in tiles of BLOCK tokens and writes five numbers per
tile: the max and sum-exp of the ordinary tokens (temperature 1, for the refusal probabilities), the
max and argmax of the allowed ordinary tokens, and their sum-exp at the row's temperature. Control
tokens are left out of every partial; stage 2 adds them back as scalars.

Stage 2 (grid B) combines the tile partials and the control logits into the refusal probabilities,
takes the refusal decision, and samples by inverting the CDF (ordinary tokens by id, then controls in
spec order) with one uniform from (seed, position): a scan over tile masses picks the tile, and only that
tile is read again (BLOCK of V tokens: 1.6 % extra at V=128256, BLOCK=2048).

Bytes moved: B*V*elt (logits) + B*BLOCK*elt (one re-read) + a few words per tile and per row; at
B=256, V=128256, bf16 that is 65.7 MB + 1.0 MB, 22.1 us at the H100's 3.02 TB/s copy bandwidth.
Because partials are per tile, results do not depend on SPLITS (nor on batch size or row order).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_tensors, num_sms


@triton.jit
def _mul32(x, C: tl.constexpr):
    # (x * C) mod 2**32 on int64 without overflow: C split into 16-bit halves.
    return (x * (C & 0xFFFF) + (((x * (C >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@triton.jit
def _row_uniform(seed, position):
    # Mirror of rtkern.reference.row_uniform.
    h = _mix32((seed & 0xFFFFFFFF) ^ 0x243F6A88)
    h = _mix32(h ^ ((seed >> 32) & 0xFFFFFFFF))
    h = _mix32(h ^ (position & 0xFFFFFFFF) ^ 0x13198A2E)
    h = _mix32(h ^ ((position >> 32) & 0xFFFFFFFF))
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _over_t(d, t):
    # d = logit - max <= 0, so d / t never reaches +inf, however small t is (z / t, then minus the max,
    # overflowed to inf - inf = NaN). d == 0 stays 0 even if a subnormal t is flushed to zero.
    return tl.where(d == 0, 0.0, d / t)


@triton.jit
def _tile_weights(logits_ptr, ctl_ptr, mask_ptr, offs, V, NUM_CTL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Logits (fp32), ordinary-token flags and allowed flags of one tile."""
    inb = offs < V
    z = tl.load(logits_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32)
    ordinary = inb
    for c in tl.static_range(NUM_CTL):
        ordinary = ordinary & (offs != tl.load(ctl_ptr + c))
    allowed = ordinary
    if HAS_MASK:
        word = tl.load(mask_ptr + offs // 32, mask=inb, other=0)
        allowed = allowed & (((word >> (offs % 32)) & 1) != 0)
    return z, inb, ordinary, allowed


@triton.jit
def _partials_kernel(
    logits_ptr, logits_stride, ctl_ptr, mask_ptr, mask_stride, temp_ptr,
    part_ptr,  # float32 [5, B, NT]: m1, s1, amax, argmax (as float bits of an int), s_t
    V, NT, B, TILES_PER_PROG,
    NUM_CTL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1) * TILES_PER_PROG
    t1 = tl.minimum(t0 + TILES_PER_PROG, NT)
    temp = tl.load(temp_ptr + row)
    t_pos = tl.where(temp > 0, temp, 1.0)  # a greedy row's masses go unused
    row_logits = logits_ptr + row * logits_stride
    row_mask = mask_ptr + row * mask_stride
    plane = B * NT
    out = part_ptr + row * NT
    for t in range(t0, t1):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        z, inb, ordinary, allowed = _tile_weights(row_logits, ctl_ptr, row_mask, offs, V, NUM_CTL, HAS_MASK)
        bad = tl.max(((z != z) | (z == float("inf"))).to(tl.int32), 0)
        zo = tl.where(ordinary, z, float("-inf"))
        m1 = tl.max(zo, 0)
        s1 = tl.sum(tl.exp(zo - tl.where(m1 == float("-inf"), 0.0, m1)), 0)
        za = tl.where(allowed, z, float("-inf"))
        am = tl.max(za, 0)
        ai = t * BLOCK + tl.argmax(za, 0, tie_break_left=True)
        am_s = tl.where(am == float("-inf"), 0.0, am)
        st = tl.sum(tl.where(allowed, tl.exp(_over_t(za - am_s, t_pos)), 0.0), 0)
        tl.store(out + t, tl.where(bad > 0, float("nan"), m1))
        tl.store(out + plane + t, s1)
        tl.store(out + 2 * plane + t, am)
        tl.store(out + 3 * plane + t, ai.to(tl.float32))  # exact: ids < 2**24
        tl.store(out + 4 * plane + t, st)


@triton.jit
def _decide_sample_kernel(
    logits_ptr, logits_stride, ctl_ptr, mask_ptr, mask_stride, part_ptr,
    bias_ptr, bias_stride, thr_ptr, thr_stride, mode_ptr, temp_ptr, first_ptr, seed_ptr, pos_ptr,
    tokens_ptr, probs_ptr, probs_stride, refused_ptr,
    V, NT, B,
    NUM_REF: tl.constexpr, NUM_CTL: tl.constexpr, CT_P2: tl.constexpr, NT_P2: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, DECIDE_ONLY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    NEG: tl.constexpr = float("-inf")
    row_logits = logits_ptr + row * logits_stride
    plane = B * NT
    tix = tl.arange(0, NT_P2)
    tin = tix < NT
    part = part_ptr + row * NT + tix
    m1 = tl.load(part, mask=tin, other=NEG)
    s1 = tl.load(part + plane, mask=tin, other=0.0)
    bad = tl.max((m1 != m1).to(tl.int32), 0) > 0

    # Controls as a vector: refusal tokens (biased) then respond.
    cix = tl.arange(0, CT_P2)
    cin = cix < NUM_CTL
    isref = cix < NUM_REF
    cid = tl.load(ctl_ptr + cix, mask=cin, other=0)
    # The launcher cannot check the id values without a device sync: an id outside the vocabulary is
    # never read, and makes the row invalid instead of yielding an out-of-range token.
    cok = (cid >= 0) & (cid < V)
    bad = bad | (tl.max((cin & ~cok).to(tl.int32), 0) > 0)
    zc = tl.load(row_logits + cid, mask=cin & cok, other=NEG).to(tl.float32)
    zc += tl.load(bias_ptr + row * bias_stride + cix, mask=isref, other=0.0)
    # A finite logit plus a finite bias can still overflow to +inf: that row is invalid like a +inf logit.
    bad = bad | (tl.max(zc, 0) == float("inf"))

    # Rule 1: refusal probabilities over the full vocabulary at temperature 1.
    big_m = tl.maximum(tl.max(m1, 0), tl.max(zc, 0))
    bad = bad | (big_m == NEG)
    big_m = tl.where(big_m == NEG, 0.0, big_m)
    total1 = tl.sum(tl.where(tin, s1 * tl.exp(m1 - big_m), 0.0), 0) + tl.sum(tl.exp(zc - big_m), 0)
    p = tl.exp(zc - big_m - tl.log(total1))
    tl.store(probs_ptr + row * probs_stride + cix, tl.where(bad, float("nan"), p), mask=isref)
    # An invalid row's outputs are overwritten below, but an argmax over all-NaN probabilities raises in
    # the Triton interpreter (the CPU path), so decide on zeros instead.
    p = tl.where(bad, 0.0, p)

    # Rule 2: refusal decision on first-step rows.
    mode = tl.load(mode_ptr + row)
    first = tl.load(first_ptr + row).to(tl.int32) != 0
    thr = tl.load(thr_ptr + row * thr_stride + cix, mask=isref, other=2.0)
    passing = isref & (p >= thr)
    cat_best = tl.argmax(tl.where(passing, p, -1.0), 0, tie_break_left=True)
    all_best = tl.argmax(tl.where(isref, p, -1.0), 0, tie_break_left=True)
    # Rounding can push the sum past 1; a threshold above 1 must still never fire (as in `decide`).
    psum = tl.minimum(tl.sum(tl.where(isref, p, 0.0), 0), 1.0)
    thr0 = tl.load(thr_ptr + row * thr_stride)
    refuse = first & (((mode == 0) & (tl.max(passing.to(tl.int32), 0) > 0)) | ((mode == 1) & (psum >= thr0)))
    best = tl.where(mode == 0, cat_best, all_best)
    forced = tl.where(refuse, tl.sum(tl.where(cix == best, cid, 0), 0), -1)
    if NUM_CTL > NUM_REF:
        respond = first & (mode != 2) & (~refuse)
        forced = tl.where(respond, tl.load(ctl_ptr + NUM_REF), forced)
    include_ctl = first & (mode == 2)
    refused = tl.where(refuse, best, -1)

    if DECIDE_ONLY:
        tok = forced
        invalid = bad
    else:
        temp = tl.load(temp_ptr + row)
        t_pos = tl.where(temp > 0, temp, 1.0)
        am = tl.load(part + 2 * plane, mask=tin, other=NEG)
        ai = tl.load(part + 3 * plane, mask=tin, other=0.0).to(tl.int32)
        st = tl.load(part + 4 * plane, mask=tin, other=0.0)
        zci = tl.where(cin & include_ctl, zc, NEG)
        top_t = tl.max(am, 0)
        top = tl.maximum(top_t, tl.max(zci, 0))
        # Greedy: largest logit, lowest id on ties (tiles hold ascending ids).
        g_tile = tl.min(tl.where((am == top) & tin, ai, 2147483647), 0)
        g_ctl = tl.min(tl.where(zci == top, cid, 2147483647), 0)
        greedy_tok = tl.minimum(g_tile, g_ctl)
        # Sampling: inverse CDF over tile masses, then controls.
        top_s = tl.where(top == NEG, 0.0, top)
        wt = tl.where(am > NEG, st * tl.exp(_over_t(am - top_s, t_pos)), 0.0)
        wc = tl.where(zci > NEG, tl.exp(_over_t(zci - top_s, t_pos)), 0.0)
        cum_t = tl.cumsum(wt, 0)
        mass_t = tl.max(cum_t, 0)
        cum_c = mass_t + tl.cumsum(wc, 0)
        total = tl.maximum(mass_t, tl.max(tl.where(cin, cum_c, 0.0), 0))
        target = _row_uniform(tl.load(seed_ptr + row), tl.load(pos_ptr + row)) * total
        t_sel = tl.min(tl.where(cum_t > target, tix, NT_P2), 0)
        c_sel = tl.min(tl.where((cum_c > target) & cin & (wc > 0), cix, CT_P2), 0)
        c_last = tl.max(tl.where(cin & (wc > 0), cix, -1), 0)
        t_last = tl.max(tl.where(wt > 0, tix, -1), 0)
        # Rounding can leave target == total: fall back to the last item with mass.
        c_sel = tl.where(t_sel < NT_P2, CT_P2, tl.where(c_sel < CT_P2, c_sel, c_last))
        t_sel = tl.where(t_sel < NT_P2, t_sel, tl.where(c_sel >= 0, NT_P2, t_last))
        sampled = tl.sum(tl.where(cix == c_sel, cid, 0), 0)
        if (t_sel >= 0) & (t_sel < NT_P2):
            before = tl.sum(tl.where(tix == t_sel - 1, cum_t, 0.0), 0)
            offs = t_sel * BLOCK + tl.arange(0, BLOCK)
            z, inb, ordinary, allowed = _tile_weights(row_logits, ctl_ptr, mask_ptr + row * mask_stride,
                                                      offs, V, NUM_CTL, HAS_MASK)
            w = tl.where(allowed, tl.exp(_over_t(z - top_s, t_pos)), 0.0)
            cw = tl.cumsum(w, 0)
            hit = tl.min(tl.where(cw > target - before, offs, 2147483647), 0)
            last = tl.max(tl.where(w > 0, offs, -1), 0)
            tile_arg = tl.sum(tl.where(tix == t_sel, ai, 0), 0)
            sampled = tl.where(hit < 2147483647, hit, tl.where(last >= 0, last, tile_arg))
        tok = tl.where(forced >= 0, forced, tl.where(temp > 0, sampled, greedy_tok))
        invalid = bad | ((forced < 0) & (top == NEG))
        drawn = tl.sum(tl.where(isref & (cid == tok), cix + 1, 0), 0) - 1
        refused = tl.where(include_ctl & (drawn >= 0), drawn, refused)
    tl.store(tokens_ptr + row, tl.where(invalid, -1, tok).to(tl.int64))
    tl.store(refused_ptr + row, tl.where(invalid, -2, refused).to(tl.int32))


def _num_sms(device: torch.device) -> int:
    return num_sms(device) if device.type == "cuda" else 1


def default_block(dtype: torch.dtype, device: torch.device) -> int:
    if device.type != "cuda":
        return 4096  # the interpreter runs one numpy op per tile: fewer, larger tiles are faster
    return 2048 if dtype.itemsize <= 2 else 1024


_MAX_VOCAB = 1 << 24  # tile argmax ids travel as exact float32


def refusal_sample_launch(logits, ctl_ids, num_refusal, thresholds, logit_bias, mode, temperature,
                          first_step, seed, position, vocab_mask, tokens, probs, refused,
                          decide_only=False, block=None, splits=None):
    """Launch both stages on the tensors `rtkern.RefusalControls` and `SampleOutput` describe.

    ``ctl_ids`` is int32 ``[num_refusal]`` or ``[num_refusal + 1]`` (refusal ids, then respond). Shapes,
    dtypes, devices and strides are checked here (ValueError/TypeError); values are not, since reading
    them would wait on the device: a control id outside ``[0, V)`` makes every row invalid (token -1,
    refused -2) rather than read out of bounds, and other value checks are `RefusalControls.build`'s.
    """
    _check_launch(logits, ctl_ids, num_refusal, thresholds, logit_bias, mode, temperature, first_step, seed,
                  position, vocab_mask, tokens, probs, refused, block, splits)
    refusal_sample_launch_prechecked(logits, ctl_ids, num_refusal, thresholds, logit_bias, mode, temperature,
                                     first_step, seed, position, vocab_mask, tokens, probs, refused,
                                     decide_only, block, splits)


def _check_launch(logits, ctl_ids, num_refusal, thresholds, logit_bias, mode, temperature, first_step, seed,
                  position, vocab_mask, tokens, probs, refused, block, splits) -> None:
    check_tensors(logits=logits)  # a tensor on a device Triton runs on (CUDA, or the interpreter)
    if logits.dim() != 2:
        raise ValueError(f"logits must be a [B, V] tensor, got shape {list(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    B, V = logits.shape
    if B == 0 or not 0 < V < _MAX_VOCAB or logits.stride(1) != 1:
        raise ValueError(f"logits must be non-empty with V < {_MAX_VOCAB} and unit stride in V, got shape "
                         f"{list(logits.shape)}, strides {list(logits.stride())}")
    if isinstance(num_refusal, bool) or not isinstance(num_refusal, int) or num_refusal < 1:
        raise ValueError(f"num_refusal must be a positive int, got {num_refusal!r}")
    C = num_refusal
    expect = [("ctl_ids", ctl_ids, None, torch.int32), ("thresholds", thresholds, (B, C), torch.float32),
              ("logit_bias", logit_bias, (B, C), torch.float32), ("mode", mode, (B,), torch.int32),
              ("temperature", temperature, (B,), torch.float32), ("first_step", first_step, (B,), torch.bool),
              ("seed", seed, (B,), torch.int64), ("position", position, (B,), torch.int64),
              ("tokens", tokens, (B,), torch.int64), ("probs", probs, (B, C), torch.float32),
              ("refused", refused, (B,), torch.int32)]
    if vocab_mask is not None:
        expect.append(("vocab_mask", vocab_mask, (B, triton.cdiv(V, 32)), torch.int32))
    for name, t, shape, dtype in expect:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a {dtype} tensor, got {type(t).__name__}")
        if shape is None:  # ctl_ids: the refusal ids, then at most one respond id
            shape = (C,) if t.numel() == C else (C + 1,)
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != logits.device:
            raise ValueError(f"{name} must be {dtype} {list(shape)} on {logits.device}, got {t.dtype} "
                             f"{list(t.shape)} on {t.device}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:  # the kernels step through the last dim with unit stride
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {list(t.stride())}")
    if block is not None and (not isinstance(block, int) or block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16 or None, got {block!r}")
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits must be a positive int or None, got {splits!r}")


def refusal_sample_launch_prechecked(logits, ctl_ids, num_refusal, thresholds, logit_bias, mode, temperature,
                                     first_step, seed, position, vocab_mask, tokens, probs, refused,
                                     decide_only=False, block=None, splits=None):
    """`refusal_sample_launch` without its checks, for callers that ran the same checks (rtkern.sampler)."""
    B, V = logits.shape
    block = block or default_block(logits.dtype, logits.device)
    nt = triton.cdiv(V, block)
    if splits is None:
        # Enough programs for ~4 per SM; at large batch one program per row already fills the GPU.
        splits = max(1, min(nt, triton.cdiv(4 * _num_sms(logits.device), B)))
    tiles_per_prog = triton.cdiv(nt, splits)
    splits = triton.cdiv(nt, tiles_per_prog)
    part = torch.empty(5, B, nt, dtype=torch.float32, device=logits.device)
    has_mask = vocab_mask is not None
    mask = vocab_mask if has_mask else tokens  # never read when HAS_MASK is False
    mask_stride = vocab_mask.stride(0) if has_mask else 0
    num_ctl = ctl_ids.numel()
    _partials_kernel[(B, splits)](
        logits, logits.stride(0), ctl_ids, mask, mask_stride, temperature, part,
        V, nt, B, tiles_per_prog, NUM_CTL=num_ctl, HAS_MASK=has_mask, BLOCK=block, num_warps=4)
    _decide_sample_kernel[(B,)](
        logits, logits.stride(0), ctl_ids, mask, mask_stride, part,
        logit_bias, logit_bias.stride(0), thresholds, thresholds.stride(0), mode, temperature,
        first_step, seed, position, tokens, probs, probs.stride(0), refused,
        V, nt, B, NUM_REF=num_refusal, NUM_CTL=num_ctl, CT_P2=triton.next_power_of_2(num_ctl),
        NT_P2=triton.next_power_of_2(nt), HAS_MASK=has_mask, BLOCK=block, DECIDE_ONLY=decide_only,
        num_warps=4)


@torch.library.custom_op("rtkern::refusal_sample", mutates_args=("tokens", "probs", "refused"))
def refusal_sample_op(logits: torch.Tensor, ctl_ids: torch.Tensor, num_refusal: int, thresholds: torch.Tensor,
                      logit_bias: torch.Tensor, row_mode: torch.Tensor, temperature: torch.Tensor,
                      first_step: torch.Tensor, seed: torch.Tensor, position: torch.Tensor,
                      vocab_mask: Optional[torch.Tensor], tokens: torch.Tensor, probs: torch.Tensor,
                      refused: torch.Tensor, decide_only: bool) -> None:
    """`torch.library` entry so that torch.compile traces around the Triton launch.

    The per-row mode is ``row_mode``: an argument named ``mode`` collides with the keyword that
    torch.compile's auto-functionalization passes to the op, and tracing fails.
    """
    refusal_sample_launch(logits, ctl_ids, num_refusal, thresholds, logit_bias, row_mode, temperature, first_step,
                          seed, position, vocab_mask, tokens, probs, refused, decide_only)


@refusal_sample_op.register_fake
def _(*args, **kwargs) -> None:
    return None
