"""Pure-PyTorch reference of the fused refusal sampler (README "Semantics", rules 1-6).

It serves the tests, the benchmarks' baseline and the CPU path. The Triton kernel in
`rtkern.kernels.refusal_sampler` implements the same function; both draw one uniform per row from
`row_uniform` and invert the CDF of the allowed tokens in one fixed order: ordinary tokens by id, then
the control tokens in spec order (refusal 0..C-1, respond). So both give the same token for the same
(seed, position) up to float rounding at a CDF boundary.
"""
from __future__ import annotations

import torch

from .spec import RefusalControls, RefusalSpec, SampleOutput, unpack_vocab_mask

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 from two 16-bit halves of c, so no int64 product overflows.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer finaliser (C. Wellons): full avalanche in two multiplies.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_uniform(seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1), a pure function of (seed, position); int64 [B] inputs."""
    h = _mix32((seed & _M32) ^ 0x243F6A88)
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ (position & _M32) ^ 0x13198A2E)
    h = _mix32(h ^ ((position >> 32) & _M32))
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def refusal_probs_reference(logits: torch.Tensor, spec: RefusalSpec, logit_bias=None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rule 1: softmax (temperature 1, full vocabulary, bias applied) at the refusal ids, [B, C]."""
    z = logits.to(dtype)
    rid = spec.ids_tensor(logits.device)[: spec.num_categories].long()
    zr = z[:, rid]
    if logit_bias is not None:
        zr = zr + logit_bias.to(dtype)
    # One formula with or without a bias, so that scoring (no bias) and sampling (zero bias) agree to the
    # bit: a calibrated threshold equal to a score must refuse that prompt. The refusal entries of the
    # log-normaliser are the (biased) zr.
    rest = z.index_fill(1, rid, float("-inf"))
    # Rule 6 on the CPU: torch splits a reduction over threads differently for [1, V] and [B, V], so a
    # float32 normaliser depends on the batch in its last bit, enough to flip a decision at a calibrated
    # threshold. Summed in float64 the difference stays far below float32's resolution.
    acc = torch.float64 if z.device.type == "cpu" and dtype == torch.float32 else dtype
    lse = torch.logaddexp(torch.logsumexp(rest.to(acc), 1), torch.logsumexp(zr.to(acc), 1)).to(dtype)
    # A finite logit plus a finite bias can overflow to +inf: invalid like a +inf logit.
    bad = _bad_rows(z) | (zr == float("inf")).any(1)
    p = torch.exp(zr - lse[:, None])
    return torch.where(bad[:, None], torch.full_like(p, float("nan")), p).float()


def _bad_rows(z: torch.Tensor) -> torch.Tensor:
    return (torch.isnan(z) | (z == float("inf"))).any(1) | (z == float("-inf")).all(1)


def decide(probs: torch.Tensor, controls: RefusalControls, has_respond: bool):
    """Rule 2 decisions from [B, C] probabilities: (refuse [B] bool, category [B] int64, forced_respond [B])."""
    thr = controls.thresholds.to(probs.dtype)
    passing = probs >= thr
    cat_best = torch.where(passing, probs, torch.full_like(probs, -1.0)).argmax(1)
    # Rounding can push the sum of the C probabilities past 1; a threshold above 1 must still never fire.
    sum_refuse = probs.sum(1).clamp(max=1.0) >= thr[:, 0]
    mode, first = controls.mode, controls.first_step
    refuse = first & (((mode == 0) & passing.any(1)) | ((mode == 1) & sum_refuse))
    best = torch.where(mode == 0, cat_best, probs.argmax(1))
    respond = first & (mode != 2) & ~refuse & has_respond
    return refuse, best, respond


def sample_reference(logits: torch.Tensor, spec: RefusalSpec, controls: RefusalControls,
                     dtype: torch.dtype = torch.float32) -> SampleOutput:
    """Reference `refusal_sample`; ``dtype`` is the compute precision (float64 for ground truth)."""
    B, V = logits.shape
    dev = logits.device
    z = logits.to(dtype)
    probs = refusal_probs_reference(logits, spec, controls.logit_bias, dtype)
    # No host round trip (no tensor built from Python data, no boolean indexing): the engine captures this
    # in a CUDA graph when the torch backend is picked. Build the cached ids before capture.
    ctl = spec.ids_tensor(dev).long()
    rid = ctl[: spec.num_categories]
    refuse, best, respond = decide(probs.to(dtype), controls, spec.respond_id is not None)
    include_ctl = controls.first_step & (controls.mode == 2)

    # Candidates in CDF order: ordinary tokens by id, then controls in spec order.
    is_ctl = torch.zeros(V, dtype=torch.int64, device=dev).index_fill_(0, ctl, 1)
    ordinary = (torch.arange(V, device=dev) + V * is_ctl).argsort()[: V - len(ctl)]  # ids in order
    order = torch.cat([ordinary, ctl])
    zb = z.clone()
    zb[:, rid] += controls.logit_bias.to(dtype)
    zz = zb[:, order]
    allowed_ord = torch.ones(B, V, dtype=torch.bool, device=dev) if controls.vocab_mask is None \
        else unpack_vocab_mask(controls.vocab_mask, V)
    allowed = torch.cat([allowed_ord[:, ordinary], include_ctl[:, None].expand(B, len(ctl))], 1)

    cand = torch.where(allowed, zz, float("-inf"))
    top = cand.max(1).values
    greedy_tok = torch.where(allowed & (cand == top[:, None]), order, V).min(1).values

    t = controls.temperature
    top_safe = torch.where(top == float("-inf"), 0.0, top)
    # (z - max) / T <= 0: z / T alone overflows to +inf for a tiny T or a huge logit (inf - inf = NaN).
    d = zz - top_safe[:, None]
    d = torch.where(d == 0, 0.0, d / torch.where(t > 0, t, 1.0).to(dtype)[:, None])
    w = torch.where(allowed, torch.exp(d), 0.0)
    cum = torch.cumsum(w, 1)
    target = row_uniform(controls.seed, controls.position).to(dtype) * cum[:, -1]
    j = torch.searchsorted(cum, target[:, None].contiguous(), right=True)[:, 0]
    last_pos = torch.where(w > 0, torch.arange(w.shape[1], device=dev), -1).max(1).values
    j = torch.where(j >= w.shape[1], last_pos, j).clamp_min(0)
    sampled = order[j]

    forced = torch.where(refuse, rid[best], torch.where(respond, spec.respond_id or 0, -1))
    tok = torch.where(forced >= 0, forced, torch.where(t > 0, sampled, greedy_tok))
    invalid = _bad_rows(zb) | ((forced < 0) & (top == float("-inf")))
    drawn_cat = (tok[:, None] == rid[None, :]).int().argmax(1)
    drew_refusal = include_ctl & (tok[:, None] == rid[None, :]).any(1)
    refused = torch.where(refuse, best, torch.where(drew_refusal, drawn_cat, -1))
    tokens = torch.where(invalid, -1, tok).to(torch.int64)
    refused = torch.where(invalid, -2, refused).to(torch.int32)
    return SampleOutput(tokens, probs, refused)
