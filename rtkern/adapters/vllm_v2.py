"""Refusal-token control for vLLM's Model Runner V2 (vLLM >= 0.34, where it is the only runner).

Interface implemented
---------------------
``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`` (the same in vLLM 0.33 and 0.34;
tested against both releases' own loader, parameter validator and ``LogitsContext`` in
``tests/test_adapters_vllm_v2_real.py``, which runs wherever vLLM imports):

- ``__init__(vllm_config, req_states)``: once per engine; ``req_states`` holds ``device``,
  ``max_num_reqs`` and per-slot tensors, among them ``prompt_len``;
- ``validate_params(cls, sampling_params)``: ValueError for bad per-request arguments, at admission;
- ``add_request(req_idx, sampling_params) -> bool``: (re)initialise the state of a request slot;
  True says the processor may mask this request's logits;
- ``apply_staged_writes()``: flush what ``add_request`` staged on the host, before the forward pass;
- ``apply(logits, ctx) -> logits``: float32 ``[rows, V]``; ``ctx.expanded_idx_mapping`` maps each row
  to its request slot, ``ctx.pos`` is the position of the token fed at that row.

A row samples its request's first output token when ``pos + 1 == prompt_len[slot]``: earlier chunks
of a chunked prefill sit below that, and a request resumed after preemption sits above it. Those rows
get the refusal decision, every other row the control tokens masked, all in one `apply_refusal_` call
whose per-row controls are gathered on the device: no host sync in ``apply``. Requests with structured
outputs are never decided (see `rtkern.adapters.vllm`).

Registering: ``--logits-processors rtkern.adapters.vllm:RefusalLogitsProcessorV2``, or
``make_logits_processor(spec, ..., runner="v2")`` for the offline ``LLM``; per-request arguments as
in `rtkern.adapters.vllm`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..sampler import apply_refusal_
from ..spec import RefusalSpec, SampleOutput
from ._common import PerCategory, optional_base
from ._requests import _KERNEL_DTYPES, check_logits, decision_controls, request_controls
from ._vllm_common import (_Defaults, _check_index, _spec_from_vllm_config, checked_defaults, constrained,
                           controls_or_defaults, host_to_device)

_V2Base, _V2_IMPORT_ERROR = optional_base("vllm.v1.worker.gpu.sample.logits_processor", "LogitsProcessor")
HAVE_VLLM_V2 = _V2_IMPORT_ERROR is None

class RefusalSlotState:
    """Refusal controls per request slot of Model Runner V2, and what they do to a step's logits.

    The vLLM-independent core of `RefusalLogitsProcessorV2` (driven and tested without vLLM).

    Parameters
    ----------
    spec : RefusalSpec
    num_slots : int
        vLLM's ``max_num_reqs``.
    thresholds, mode, logit_bias
        Defaults for requests whose ``extra_args`` do not set them (as for `RefusalBatchState`).
    device : torch.device
    backend : {"triton", "torch", None}
        Passed to `apply_refusal_`.

    Attributes
    ----------
    last_output : SampleOutput or None
        `apply_refusal_`'s result for every row of the latest `apply` (``tokens`` -1 on rows that
        sample downstream).
    """

    def __init__(self, spec: RefusalSpec, num_slots: int, *, thresholds: PerCategory = 0.5,
                 mode: Optional[str] = None, logit_bias: PerCategory = 0.0, device=None,
                 backend: Optional[str] = None) -> None:
        self.defaults = checked_defaults(spec, thresholds, mode, logit_bias, backend)
        self.spec, self.backend = spec, backend
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        self.device = torch.device(device if device is not None else "cpu")
        C = spec.num_categories
        self.thresholds = torch.zeros(num_slots, C, dtype=torch.float32, device=self.device)
        self.logit_bias = torch.zeros(num_slots, C, dtype=torch.float32, device=self.device)
        self.mode = torch.zeros(num_slots, dtype=torch.int32, device=self.device)
        self.decides = torch.ones(num_slots, dtype=torch.bool, device=self.device)
        self._staged: dict[int, tuple] = {}
        self.last_output: Optional[SampleOutput] = None

    def add(self, slot: int, params) -> bool:
        """Stage the controls of the request now in ``slot`` (``params``: its SamplingParams, or None)."""
        _check_index("slot", slot)
        if slot >= self.mode.shape[0]:
            raise ValueError(f"slot must be < num_slots={self.mode.shape[0]}, got {slot}")
        self._staged[slot] = (*controls_or_defaults(self.spec, params, self.defaults, f"slot {slot}"),
                              not constrained(params))
        return True  # every request may be masked: control tokens never follow the first position

    def flush(self) -> None:
        """Write the staged controls to the device (one copy per tensor)."""
        if not self._staged:
            return
        thr, bias, mode, decides = zip(*self._staged.values())
        pin = self.device.type == "cuda"  # vLLM's own staged writes are pinned and non-blocking too
        idx = host_to_device(list(self._staged), torch.int64, self.device, pin)
        self._staged.clear()
        self.thresholds[idx] = host_to_device(thr, torch.float32, self.device, pin)
        self.logit_bias[idx] = host_to_device(bias, torch.float32, self.device, pin)
        self.mode[idx] = host_to_device(mode, torch.int32, self.device, pin)
        self.decides[idx] = host_to_device(decides, torch.bool, self.device, pin)

    def apply(self, logits: torch.Tensor, slots: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Refusal decision on the ``first`` rows, control tokens masked on the others.

        Parameters
        ----------
        logits : float [R, V]
            Modified in place and returned.
        slots : int [R]
            Each row's request slot.
        first : bool [R]
            Rows that sample their request's first output token.
        """
        check_logits(logits, self.spec)
        R = logits.shape[0]
        if slots.shape != (R,) or first.shape != (R,):
            raise ValueError(f"slots and first must be [{R}], got {list(slots.shape)} and {list(first.shape)}")
        self.flush()
        slots = slots.to(self.device, torch.int64)
        ctl = decision_controls(self.thresholds[slots], self.logit_bias[slots], self.mode[slots],
                                first.to(self.device, torch.bool) & self.decides[slots])
        work = logits if logits.dtype in _KERNEL_DTYPES and logits.is_contiguous() else logits.float().contiguous()
        self.last_output = apply_refusal_(work, self.spec, ctl, backend=self.backend)
        if work is not logits:
            logits.copy_(work)
        return logits


class RefusalLogitsProcessorV2(_Defaults, _V2Base):
    """vLLM Model Runner V2 logits processor applying rtkern's refusal decision (module docstring).

    Class attributes as for `rtkern.adapters.vllm.RefusalLogitsProcessor` (set them with
    ``make_logits_processor(..., runner="v2")``).
    """

    def __init__(self, vllm_config, req_states) -> None:
        if not HAVE_VLLM_V2:
            raise ImportError("rtkern.adapters.vllm.RefusalLogitsProcessorV2 needs vLLM >= 0.33 (pip install vllm); "
                              f"importing vllm.v1.worker.gpu.sample.logits_processor failed: {_V2_IMPORT_ERROR!r}")
        spec = type(self).spec or _spec_from_vllm_config(vllm_config, type(self).scheme)
        self.req_states = req_states
        self.state = RefusalSlotState(spec, int(req_states.max_num_reqs), thresholds=self.thresholds, mode=self.mode,
                                      logit_bias=self.logit_bias, device=req_states.device, backend=self.backend)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        return self.state.add(int(req_idx), sampling_params)

    def apply_staged_writes(self) -> None:
        self.state.flush()

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        slots = ctx.expanded_idx_mapping.long()
        # The GPU runner keeps prompt_len in a host-backed buffer whose device view is .gpu (re-read each
        # step: the view moves); the CPU runner keeps a plain tensor.
        prompt_len = getattr(self.req_states.prompt_len, "gpu", self.req_states.prompt_len)
        first = (ctx.pos.long() + 1) == prompt_len.to(ctx.pos.device).long()[slots]
        return self.state.apply(logits, slots, first)


__all__ = ["RefusalLogitsProcessorV2", "RefusalSlotState", "HAVE_VLLM_V2", "request_controls"]
