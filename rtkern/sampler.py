"""Public sampler API: `refusal_sample`, `refusal_probs`, `apply_refusal_` (semantics: README "Semantics").

Checks here read only shapes, dtypes and devices, so a call never waits on the device and can be
captured in a CUDA graph; value checks live in `RefusalControls.build`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .kernels._common import INTERPRET_HINT, check_disjoint, triton_runs_on
from .kernels.refusal_sampler import refusal_sample_launch_prechecked
from .reference import decide, refusal_probs_reference, sample_reference
from .spec import RefusalControls, RefusalSpec, SampleOutput, unpack_vocab_mask

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_TRITON_VOCAB = 1 << 24  # tile argmax ids travel as exact float32


_SCORING = object()  # `controls` of refusal_probs, which takes none


def _check(logits, spec, controls, out, backend) -> str:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {list(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    B, V = logits.shape
    if B == 0 or V == 0:
        raise ValueError(f"logits must be non-empty, got shape {list(logits.shape)}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous in the vocabulary dim, got strides {list(logits.stride())}")
    if not isinstance(spec, RefusalSpec):
        raise TypeError(f"spec must be a RefusalSpec, got {type(spec).__name__}")
    spec.check_vocab(V)
    if controls is not _SCORING:
        if not isinstance(controls, RefusalControls):
            raise TypeError(f"controls must be RefusalControls, got {type(controls).__name__}")
        controls.check(B, spec.num_categories, V, logits.device)
    if out is not None:
        _check_out(out, B, spec.num_categories, logits.device, None if controls is _SCORING else controls)
    if backend is None:  # the kernel where it runs and covers the vocabulary, else the reference
        return "triton" if logits.is_cuda and V < _MAX_TRITON_VOCAB else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    if backend == "triton":
        if not triton_runs_on(logits.device):
            raise ValueError(f"backend='triton' needs a CUDA tensor or {INTERPRET_HINT}, got logits on {logits.device}")
        if V >= _MAX_TRITON_VOCAB:
            raise ValueError(f"the Triton sampler supports V < {_MAX_TRITON_VOCAB}, got V={V}")
    return backend


_last_out: list = [None]  # (out, what was checked) of the last accepted `out`: a decode loop reuses one


def _check_out(out, B, C, device, controls) -> None:
    if torch.compiler.is_compiling():  # traced once per graph; the cache below would guard on `out`'s identity
        _check_out_fully(out, B, C, device, controls)
        return
    # grad mode and requires_grad are part of what was checked: both can change between calls
    key = (B, C, device, torch.is_grad_enabled(), getattr(getattr(out, "refusal_probs", None), "requires_grad", None),
           id(controls))
    last = _last_out[0]
    if last is not None and last[0] is out and last[1] == key:
        return
    _check_out_fully(out, B, C, device, controls)
    _last_out[0] = (out, key)


def _check_out_fully(out, B, C, device, controls) -> None:
    if not isinstance(out, SampleOutput):
        raise TypeError(f"out must be a SampleOutput, got {type(out).__name__}")
    for name, shape, dtype in (("tokens", (B,), torch.int64), ("refusal_probs", (B, C), torch.float32),
                               ("refused", (B,), torch.int32)):
        t = getattr(out, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"out.{name} must be a {dtype} tensor of shape {list(shape)}, got {type(t).__name__}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"out.{name} is written in place: it must not require grad")
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
            raise ValueError(f"out.{name} must be a contiguous {dtype} tensor of shape {list(shape)} on "
                             f"{device}, got {t.dtype} {list(t.shape)} on {t.device}")
    if torch.compiler.is_compiling():  # data_ptr() does not trace; eager calls of the same code check it
        return
    # The kernel writes the probabilities before it reads the thresholds: an output sharing memory with a
    # control would change the decision.
    ins = {} if controls is None else {f"controls.{f.name}": getattr(controls, f.name)
                                       for f in dataclasses.fields(controls)}
    check_disjoint(**{f"out.{k}": getattr(out, k) for k in out._fields}, **ins)


def _launch(logits, spec, controls, out, decide_only):
    args = (logits, spec.ids_tensor(logits.device), spec.num_categories, controls.thresholds,
            controls.logit_bias, controls.mode, controls.temperature, controls.first_step, controls.seed,
            controls.position, controls.vocab_mask, out.tokens, out.refusal_probs, out.refused, decide_only)
    if torch.compiler.is_compiling():
        torch.ops.rtkern.refusal_sample(*args)
    else:
        refusal_sample_launch_prechecked(*args)  # no custom-op dispatch in eager: it costs more than the kernel


def refusal_sample(logits: torch.Tensor, spec: RefusalSpec, controls: RefusalControls, *,
                   out: Optional[SampleOutput] = None, backend: Optional[str] = None) -> SampleOutput:
    """Refusal decision and next-token sample in one pass over the logits.

    Parameters
    ----------
    logits : float32 | bfloat16 | float16 [B, V]
        Last dim contiguous; any row stride.
    spec : RefusalSpec
        The model's refusal token ids (C of them) and optional ``[respond]`` id.
    controls : RefusalControls
        Per-row thresholds ``[B, C]``, logit_bias ``[B, C]``, mode, temperature, first_step, seed,
        position ``[B]`` and optional vocab_mask ``[B, ceil(V/32)]``, on the logits' device.
    out : SampleOutput, optional
        Preallocated outputs (for CUDA graphs).
    backend : {"triton", "torch", None}
        None picks Triton on CUDA (for V < 2**24) and the PyTorch reference otherwise.

    Returns
    -------
    SampleOutput
        ``tokens`` int64 [B], ``refusal_probs`` float32 [B, C], ``refused`` int32 [B]
        (category, -1 none, -2 invalid row).
    """
    backend = _check(logits, spec, controls, out, backend)
    if backend == "torch":
        res = sample_reference(logits, spec, controls)
        return _into(res, out)
    out = out if out is not None else SampleOutput.empty(logits.shape[0], spec.num_categories, logits.device)
    _launch(logits, spec, controls, out, decide_only=False)
    return out


def _into(res: SampleOutput, out: Optional[SampleOutput]) -> SampleOutput:
    if out is None:
        return res
    for dst, src in zip(out, res):
        dst.copy_(src)
    return out


def _neutral_controls(B: int, C: int, device, logit_bias: Optional[torch.Tensor]) -> RefusalControls:
    # Built without value checks (which would sync); only probabilities are read from it.
    zeros = torch.zeros(B, dtype=torch.int64, device=device)
    bias = torch.zeros(B, C, dtype=torch.float32, device=device) if logit_bias is None else logit_bias
    return RefusalControls(thresholds=torch.full((B, C), 2.0, device=device), logit_bias=bias,
                           mode=zeros.to(torch.int32), temperature=torch.ones(B, device=device),
                           first_step=zeros.bool(), seed=zeros, position=zeros)


def refusal_probs(logits: torch.Tensor, spec: RefusalSpec, *, logit_bias: Optional[torch.Tensor] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Scoring only: softmax probability (temperature 1, full vocabulary) of each refusal token.

    logits : [B, V] float; logit_bias : optional float32 [B, C]. Returns float32 [B, C]
    (NaN on rows with NaN/+inf logits or all -inf, and where a NaN or +inf bias makes the biased logit
    NaN/+inf: invalid rows, as `refusal_sample` reports them; a -inf bias gives that token 0).
    """
    backend = _check(logits, spec, _SCORING, None, backend)
    B, C = logits.shape[0], spec.num_categories
    if logit_bias is not None and not isinstance(logit_bias, torch.Tensor):
        raise TypeError(f"logit_bias must be a float32 [{B}, {C}] tensor, got {type(logit_bias).__name__}")
    if logit_bias is not None and (logit_bias.shape != (B, C) or logit_bias.dtype != torch.float32
                                   or logit_bias.device != logits.device):
        raise ValueError(f"logit_bias must be float32 [{B}, {C}] on {logits.device}, got "
                         f"{logit_bias.dtype} {list(logit_bias.shape)} on {logit_bias.device}")
    if logit_bias is not None and C > 1 and logit_bias.stride(1) != 1:
        # The kernel steps through a row's categories with unit stride.
        raise ValueError(f"logit_bias must be contiguous in its last dim, got strides {list(logit_bias.stride())}")
    if backend == "torch":
        return refusal_probs_reference(logits, spec, logit_bias)
    out = SampleOutput.empty(B, C, logits.device)
    _launch(logits, spec, _neutral_controls(B, C, logits.device, logit_bias), out, decide_only=True)
    return out.refusal_probs


def _decide_torch(logits, spec, controls) -> SampleOutput:
    probs = refusal_probs_reference(logits, spec, controls.logit_bias)
    refuse, best, respond = decide(probs, controls, spec.respond_id is not None)
    rid = spec.ids_tensor(logits.device)[: spec.num_categories].long()
    tok = torch.where(refuse, rid[best], torch.where(respond, spec.respond_id or 0, -1))
    bad = torch.isnan(probs).any(1)  # exactly the invalid rows, the biased overflow included
    return SampleOutput(torch.where(bad, -1, tok).long(), probs,
                        torch.where(bad, -2, torch.where(refuse, best, -1)).int())


def _biased(cur: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # A finite logit stays finite in the logits' dtype (fp16 overflows at 65504): +inf would make a valid
    # row invalid downstream, -inf would mask a token the decision kept. Saturated, it still dominates.
    z = cur.float() + bias
    big = torch.finfo(cur.dtype).max
    return torch.where(torch.isfinite(cur), z.clamp(-big, big), z).to(cur.dtype)


def apply_refusal_(logits: torch.Tensor, spec: RefusalSpec, controls: RefusalControls, *,
                   backend: Optional[str] = None) -> SampleOutput:
    """Rewrite ``logits`` in place so that any downstream sampler takes the refusal decision.

    First-step rows that refuse (or answer with ``[respond]``) become one-hot: the forced token 0,
    everything else -inf. Other rows get every control token set to -inf, except first-step ``free``
    rows, whose refusal logits only receive ``logit_bias``. Disallowed tokens of ``vocab_mask`` become
    -inf. Rows that are invalid (NaN/+inf logits, or no allowed token left) are reported with
    ``refused = -2`` and ``tokens = -1``, as `refusal_sample` reports them.

    Returns a SampleOutput whose ``tokens`` hold the forced token or -1 (sample downstream).
    """
    backend = _check(logits, spec, controls, None, backend)
    B, V = logits.shape
    # Both would fail halfway through the writes below, after the kernel ran and some rows changed.
    if B > 1 and logits.stride(0) < V:
        raise ValueError(f"apply_refusal_ writes logits in place: rows must not overlap, got shape "
                         f"{list(logits.shape)} with strides {list(logits.stride())} (an expand()? pass a copy)")
    if logits.requires_grad and torch.is_grad_enabled():
        raise ValueError("apply_refusal_ writes logits in place: pass a tensor that does not require grad "
                         "(detach() it, or call under torch.no_grad())")
    if logits.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError("apply_refusal_ writes logits in place: an inference tensor can be written only "
                         "under torch.inference_mode()")
    if backend == "torch":
        res = _decide_torch(logits, spec, controls)
    else:
        res = SampleOutput.empty(B, spec.num_categories, logits.device)
        _launch(logits, spec, controls, res, decide_only=True)
    ids = spec.ids_tensor(logits.device).long()
    rid = ids[: spec.num_categories]
    forced = res.tokens >= 0
    free_first = controls.first_step & (controls.mode == 2)
    neg = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
    cur = logits[:, rid]
    logits[:, rid] = torch.where(free_first[:, None], _biased(cur, controls.logit_bias), cur)
    if controls.vocab_mask is not None:
        allowed = unpack_vocab_mask(controls.vocab_mask, V)
        allowed.index_fill_(1, ids, True)  # control tokens are governed by the refusal rules only
        logits.masked_fill_(~allowed, neg)
    logits[:, ids] = torch.where(free_first[:, None], logits[:, ids], neg)
    logits.masked_fill_(forced[:, None], neg)
    logits.scatter_(1, res.tokens.clamp_min(0)[:, None],
                    torch.where(forced[:, None], torch.zeros_like(neg), logits.gather(1, res.tokens.clamp_min(0)[:, None])))
    # Rule 5 as refusal_sample applies it: a row left with no allowed token is invalid, not "answer".
    empty = ~forced & (logits == neg).all(1)
    res.refused.copy_(torch.where(empty, -2, res.refused))
    return res
