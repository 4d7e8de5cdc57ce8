"""Refusal-token control as an SGLang custom logit processor (optional: SGLang is imported only if installed).

Interface implemented
---------------------
``sglang.srt.sampling.custom_logit_processor.CustomLogitProcessor``: SGLang serialises the processor
*class* with ``to_str()``, rebuilds it per batch with ``from_str()`` (no constructor arguments), and
calls ``processor(logits, custom_param_list)``. Here ``logits`` is ``[rows, V]``, one row per request
that uses this processor, and ``custom_param_list`` holds each request's ``custom_params`` dict. The
result is written back row by row. Because the processor is rebuilt from its class alone, the spec and
the defaults are class attributes, set by `make_logit_processor`. Tested against SGLang 0.5.23's own
``CustomLogitProcessor`` and its (dill) serialisation in ``tests/test_adapters_sglang.py``.

Where the first position is
---------------------------
SGLang adds ``"__req__"`` (the request) to a request's ``custom_params``, but only when these are a
dict. So **pass** ``custom_params`` **(at least** ``{}`` **) with every request**. Without them the
processor cannot tell the first generated position, masks the control tokens everywhere, and logs a
warning.

A row takes the refusal decision when its request has no output token yet, this forward ends its
prompt (under chunked prefill SGLang also samples, and discards, a token after each earlier chunk), and
it has not been decided before. The "decided" mark is kept in the request's own ``custom_params``
dict, which is private to that request. This keeps the decision from happening twice under the
overlap scheduler, where ``output_ids`` can lag one step. Every other row has the control tokens set
to -inf.

Usage
-----
Start the server with ``--enable-custom-logit-processor``, then::

    from rtkern.adapters.sglang import make_logit_processor
    proc = make_logit_processor(spec, thresholds={"Humanizing requests": 1.1})
    llm.generate(prompt, sampling_params={"custom_params": {"refusal_thresholds": 0.3}},
                 custom_logit_processor=proc.to_str())

``custom_params`` keys are those of the vLLM adapter: ``refusal_thresholds``, ``refusal_mode`` and
``refusal_logit_bias``. Bad values are logged, and the processor's defaults are used for that request
(raising inside the scheduler would fail the whole batch); `validate_custom_params` checks them up front.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Optional

import torch

from ..spec import RefusalSpec
from ._common import PerCategory, optional_base, thresholds_and_mode
from ._requests import EXTRA_ARGS, check_logits, refuse_rows, reject_unknown_args, request_controls

_SGLangBase, _SGLANG_IMPORT_ERROR = optional_base("sglang.srt.sampling.custom_logit_processor",
                                                 "CustomLogitProcessor")
HAVE_SGLANG = _SGLANG_IMPORT_ERROR is None

__all__ = ["RefusalLogitProcessor", "make_logit_processor", "validate_custom_params", "HAVE_SGLANG"]

log = logging.getLogger(__name__)
_DECIDED = "__rtkern_decided__"


class RefusalLogitProcessor(_SGLangBase):
    """SGLang custom logit processor applying rtkern's refusal decision (see the module docstring).

    Make one with `make_logit_processor`; the class attributes ``spec``, ``thresholds``, ``mode``,
    ``logit_bias`` and ``backend`` are its configuration.

    Attributes
    ----------
    last_rows : torch.Tensor or None
        int64 ``[F]``: rows of the latest call that took the refusal decision.
    last_output : SampleOutput or None
        `rtkern.apply_refusal_`'s result for those rows.
    """

    spec: Optional[RefusalSpec] = None
    thresholds: PerCategory = 0.5
    mode: str = "category"
    logit_bias: PerCategory = 0.0
    backend: Optional[str] = None
    last_rows: Optional[torch.Tensor] = None
    last_output = None

    def __call__(self, logits: torch.Tensor, custom_param_list: Optional[list] = None) -> torch.Tensor:
        """Decide on first-position rows, mask the control tokens elsewhere; ``logits`` [R, V], in place."""
        spec = type(self).spec
        if spec is None:
            raise ValueError("RefusalLogitProcessor has no spec: build it with "
                             "rtkern.adapters.sglang.make_logit_processor(spec)")
        check_logits(logits, spec)
        params = list(custom_param_list) if custom_param_list is not None else [None] * logits.shape[0]
        if params and len(params) < logits.shape[0] and logits.shape[0] % len(params) == 0:
            # Speculative decoding before SGLang 0.5 passed one entry per request for its draft-token rows
            # (request-major); 0.5.23 repeats each request's entry per row.
            params = [p for p in params for _ in range(logits.shape[0] // len(params))]
        if len(params) != logits.shape[0]:
            raise ValueError(f"custom_param_list has {len(params)} entries for {logits.shape[0]} logits rows")
        rows, controls = [], []
        for i, p in enumerate(params):
            if self._first_position(p):
                p[_DECIDED] = True        # later rows of the same request (speculative drafts) are masked
                rows.append(i)
                controls.append(self._controls(i, p))
        self.last_rows, self.last_output = refuse_rows(logits, spec, rows, controls, backend=self.backend)
        return logits

    @staticmethod
    def _first_position(p) -> bool:
        if not isinstance(p, dict) or "__req__" not in p:
            if not getattr(RefusalLogitProcessor, "_warned", False):
                RefusalLogitProcessor._warned = True
                log.warning("rtkern refusal processor: a request came without custom_params, so its first "
                            "position is unknown and it only gets the control tokens masked; pass "
                            "custom_params={} (or refusal arguments) with every request")
            return False
        r = p["__req__"]
        return not p.get(_DECIDED) and len(r.output_ids) == 0 and _prompt_done(r)

    def _controls(self, row: int, p: Mapping):
        cls = type(self)
        defaults = dict(thresholds=cls.thresholds, mode=cls.mode, logit_bias=cls.logit_bias)
        try:
            return request_controls(cls.spec, {k: p[k] for k in EXTRA_ARGS if k in p}, **defaults)
        except (TypeError, ValueError) as e:
            log.warning("rtkern refusal processor: ignoring bad refusal arguments of row %d (%s); using "
                        "the defaults", row, e)
            return request_controls(cls.spec, None, **defaults)


def _prompt_done(r) -> bool:
    # Chunked prefill samples (and discards) a token after every chunk; only the chunk that ends the
    # prompt is the first position. A request without these fields counts as done.
    end = getattr(r, "extend_end", None)    # SGLang 0.5: this forward fills up to extend_end
    if end is None and getattr(r, "fill_ids", None) is not None:
        end = len(r.fill_ids)               # before: fill_ids, truncated to the chunk
    prompt = getattr(r, "origin_input_ids", None)
    return end is None or prompt is None or end >= len(prompt)


def validate_custom_params(processor: type, custom_params: Optional[Mapping[str, Any]]) -> None:
    """Raise ValueError/TypeError if ``custom_params`` holds bad or unknown ``refusal_*`` arguments.

    Parameters
    ----------
    processor : type
        A class from `make_logit_processor`.
    custom_params : mapping or None
        What the request will pass as ``custom_params``.
    """
    if custom_params is None:
        return
    reject_unknown_args(custom_params)
    request_controls(processor.spec, custom_params, thresholds=processor.thresholds, mode=processor.mode,
                     logit_bias=processor.logit_bias)


def make_logit_processor(spec: RefusalSpec, *, thresholds: PerCategory = 0.5, mode: Optional[str] = None,
                         logit_bias: PerCategory = 0.0, backend: Optional[str] = None) -> type:
    """A `RefusalLogitProcessor` subclass bound to ``spec`` and these defaults.

    Parameters
    ----------
    spec : RefusalSpec
        The model's control tokens (`RefusalSpec.from_tokenizer`).
    thresholds, mode, logit_bias
        Defaults for requests whose ``custom_params`` leave them out (forms of `request_controls`).
        ``thresholds`` may be a thresholds file (path or loaded), whose mode then applies when ``mode``
        is None (the default; otherwise ``"category"``).
    backend : {"triton", "torch", None}
        Passed to `rtkern.apply_refusal_` (None: the fused kernel on CUDA).

    Returns
    -------
    type
        Pass ``cls.to_str()`` as ``custom_logit_processor`` (needs SGLang for ``to_str``).
    """
    if not isinstance(spec, RefusalSpec):
        raise TypeError(f"spec must be a RefusalSpec, got {type(spec).__name__}")
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    thresholds, mode = thresholds_and_mode(thresholds, mode)
    if not isinstance(mode, str):
        raise TypeError(f"mode must be one string for the processor's default, got {mode!r}")
    request_controls(spec, None, thresholds=thresholds, mode=mode, logit_bias=logit_bias)
    attrs = dict(spec=spec, thresholds=thresholds, mode=mode, logit_bias=logit_bias, backend=backend,
                 __module__=__name__)
    return type("BoundRefusalLogitProcessor", (RefusalLogitProcessor,), attrs)
