"""Per-request refusal controls for runtimes that batch requests themselves (vLLM, SGLang).

A request carries its own ``refusal_*`` arguments (vLLM: ``SamplingParams.extra_args``; SGLang:
``custom_params``) over the processor's defaults; `refuse_rows` then takes the decision on the rows at
their first generated position and masks the control tokens on every other row.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch

from ..sampler import apply_refusal_
from ..spec import MODES, RefusalControls, RefusalSpec, SampleOutput
from ._common import PerCategory, category_index, per_category, real_number

EXTRA_ARGS = ("refusal_thresholds", "refusal_mode", "refusal_logit_bias")
"""Per-request argument names the adapters read."""

RowControls = tuple[list[float], list[float], int]      # thresholds [C], logit_bias [C], MODES code
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def request_controls(spec: RefusalSpec, extra_args: Optional[Mapping[str, Any]], *,
                     thresholds: PerCategory = 0.5, mode: str = "category",
                     logit_bias: PerCategory = 0.0) -> RowControls:
    """Resolve one request's controls from its ``extra_args`` over the processor's defaults.

    Parameters
    ----------
    spec : RefusalSpec
        C categories and their names.
    extra_args : mapping or None
        The request's arguments (vLLM ``extra_args``, SGLang ``custom_params``); keys in `EXTRA_ARGS`
        are read, other keys ignored.
    thresholds, mode, logit_bias
        The processor's defaults (same forms as the request values).

    Returns
    -------
    (thresholds, logit_bias, mode)
        Two lists of C floats and a mode code (0 category, 1 sum, 2 free).

    Raises
    ------
    ValueError, TypeError
        On unknown categories, a wrong number of values, NaN or negative thresholds, unknown modes.
    """
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be a mapping, got {type(extra_args).__name__}")
    args = dict(extra_args or {})
    C = spec.num_categories
    base_thr = _row(per_category("thresholds", thresholds, spec, 0.5), C, "thresholds")
    base_bias = _row(per_category("logit_bias", logit_bias, spec, 0.0), C, "logit_bias")
    thr = _overlay("refusal_thresholds", args.get("refusal_thresholds"), spec, base_thr)
    bias = _overlay("refusal_logit_bias", args.get("refusal_logit_bias"), spec, base_bias)
    m = args.get("refusal_mode", mode)
    if not isinstance(m, str):
        raise TypeError(f"refusal_mode must be a string, got {m!r}")
    if m not in MODES:
        raise ValueError(f"refusal_mode must be one of {list(MODES)}, got {m!r}")
    # Value checks (NaN, negative thresholds, non-finite bias) exactly as the sampler's own controls, and
    # the float32 values it will use (a threshold just above 1 stays above 1).
    built = RefusalControls.build(1, C, "cpu", thresholds=torch.tensor(thr, dtype=torch.float64),
                                  logit_bias=torch.tensor(bias, dtype=torch.float64), mode=m)
    return built.thresholds[0].tolist(), built.logit_bias[0].tolist(), MODES[m]


def reject_unknown_args(args: Mapping) -> None:
    """ValueError for a ``refusal_*`` key that is not one of `EXTRA_ARGS` (a likely typo)."""
    unknown = [k for k in args if isinstance(k, str) and k.startswith("refusal_") and k not in EXTRA_ARGS]
    if unknown:
        raise ValueError(f"unknown refusal argument {unknown[0]!r}; known: {list(EXTRA_ARGS)}")


@functools.lru_cache(maxsize=None)
def control_ids_on(spec: RefusalSpec, device: torch.device) -> torch.Tensor:
    """``spec.control_ids`` as an int64 tensor on ``device``, made once (it sits on every decode step)."""
    return torch.tensor(spec.control_ids, dtype=torch.int64, device=device)


def _row(value, C: int, name: str) -> list[float]:
    if isinstance(value, float):
        return [value] * C
    if value.dim() == 2 and value.shape[0] == 1:
        value = value[0]
    if value.shape != (C,):
        raise ValueError(f"{name} must be a number, {C} numbers or a mapping by category, got shape "
                         f"{list(value.shape)}")
    return [float(v) for v in value.tolist()]


def _overlay(name: str, value, spec: RefusalSpec, base: list[float]) -> list[float]:
    if value is None:
        return list(base)
    if isinstance(value, Mapping):
        out = list(base)
        for key, v in value.items():
            out[category_index(name, key, spec)] = real_number(name, v)
        return out
    return _row(per_category(name, value, spec, 0.0), spec.num_categories, name)


def check_logits(logits, spec: RefusalSpec) -> None:
    """TypeError unless ``logits`` is a floating ``[R, V]`` tensor; ValueError unless V covers the control ids."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating [R, V] tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)} {list(getattr(logits, 'shape', []))}")
    # Rows past their first position only get index_fill_, which checks nothing before the kernel runs.
    spec.check_vocab(logits.shape[1])


def decision_controls(thresholds: torch.Tensor, logit_bias: torch.Tensor, mode: torch.Tensor,
                      first_step: torch.Tensor) -> RefusalControls:
    """Controls for `apply_refusal_` in an adapter: only the decision inputs vary (the runtime samples)."""
    zeros = torch.zeros(first_step.shape[0], dtype=torch.int64, device=first_step.device)
    return RefusalControls(thresholds=thresholds, logit_bias=logit_bias, mode=mode,
                           temperature=torch.ones(first_step.shape[0], device=first_step.device),
                           first_step=first_step, seed=zeros, position=zeros.clone())


def refuse_rows(logits: torch.Tensor, spec: RefusalSpec, rows: Sequence[int], controls: Sequence[RowControls],
                *, backend: Optional[str] = None,
                to_device: Optional[Callable[[list, torch.dtype, Any], torch.Tensor]] = None
                ) -> tuple[Optional[torch.Tensor], Optional[SampleOutput]]:
    """Refusal decision on ``rows`` (first generated positions), control tokens masked on all others.

    Parameters
    ----------
    logits : float [R, V]
        Modified in place (checked by the caller with `check_logits`).
    spec : RefusalSpec
    rows : sequence of int
        Distinct row indices at their first generated position, ascending.
    controls : sequence of (thresholds, logit_bias, mode)
        One `request_controls` result per entry of ``rows``.
    backend : {"triton", "torch", None}
        Passed to `apply_refusal_`.
    to_device : callable, optional
        ``(nested list, dtype, device) -> tensor`` for the per-row controls (e.g. through pinned memory).

    Returns
    -------
    (index, result)
        ``rows`` as an int64 tensor on the logits' device and `apply_refusal_`'s result for them;
        (None, None) when ``rows`` is empty.
    """
    put = to_device or (lambda v, dtype, device: torch.tensor(v, dtype=dtype).to(device))
    ids = control_ids_on(spec, logits.device)
    if not rows:
        logits.index_fill_(1, ids, float("-inf"))
        return None, None
    index = put(list(rows), torch.int64, logits.device)
    sub = logits.index_select(0, index)  # unmasked copy: the decision needs the full distribution
    logits.index_fill_(1, ids, float("-inf"))
    if sub.dtype not in _KERNEL_DTYPES:
        sub = sub.float()
    ctl = decision_controls(put([c[0] for c in controls], torch.float32, logits.device),
                            put([c[1] for c in controls], torch.float32, logits.device),
                            put([c[2] for c in controls], torch.int32, logits.device),
                            torch.ones(len(rows), dtype=torch.bool, device=logits.device))
    res = apply_refusal_(sub, spec, ctl, backend=backend)
    logits.index_copy_(0, index, sub.to(logits.dtype))
    return index, res
