"""Refusal-token control as a vLLM logits processor (optional: vLLM is imported only if installed).

Interface implemented
---------------------
``vllm.v1.sample.logits_processor.LogitsProcessor``, the batch-level logits-processor interface of
vLLM's V1 model runner (documented in vLLM's "Custom Logits Processors" guide; tested against vLLM
0.33.0's own loader, ``SamplingParams`` validation hook and ``BatchUpdateBuilder`` in
``tests/test_adapters_vllm_real.py``, which runs wherever vLLM imports):

- ``__init__(vllm_config, device, is_pin_memory)``: called once by the engine at start-up;
- ``validate_params(cls, sampling_params)`` (classmethod): rejects bad per-request arguments at the
  entrypoint with ValueError;
- ``is_argmax_invariant() -> bool``: False here (the processor forces tokens, so it changes greedy
  results too);
- ``update_state(batch_update)``: before each step, ``batch_update`` is None or a ``BatchUpdate`` with
  ``batch_size``, ``removed`` (row indices), ``added`` (``(index, SamplingParams, prompt_tok_ids,
  output_tok_ids)`` tuples, ``output_tok_ids`` being the request's live output list) and ``moved``
  (``(i, j, MoveDirectionality.UNIDIRECTIONAL | SWAP)``), to be processed in that order;
- ``apply(logits) -> logits``: ``[num_requests, V]`` logits, one row per persistent-batch row; may
  modify in place.

A row is at its first generated position while its ``output_tok_ids`` is empty. There the processor
takes the refusal decision with `rtkern.apply_refusal_` (the fused Triton kernel on CUDA); everywhere
else it sets the control tokens to -inf. vLLM rejects custom logits processors under speculative
decoding.

vLLM's "Model Runner V2" (the default of newer releases, and from 0.34 the only runner) has a
different interface: use `RefusalLogitsProcessorV2` there (``rtkern.adapters.vllm_v2``, re-exported
here; ``--logits-processors rtkern.adapters.vllm:RefusalLogitsProcessorV2``). Its requests take the
same ``extra_args``, and `make_logits_processor` picks the interface the installed vLLM has.

Registering
-----------
With the defaults (spec found in the model's tokenizer: the scheme its rtkern.json names, else category
first; thresholds 0.5)::

    from vllm import LLM, SamplingParams
    llm = LLM("path/to/refusal-model", logits_processors=["rtkern.adapters.vllm:RefusalLogitsProcessor"])
    # or: vllm serve path/to/refusal-model --logits-processors rtkern.adapters.vllm:RefusalLogitsProcessor

With an explicit spec or other defaults (offline ``LLM`` takes the class object)::

    from rtkern.adapters.vllm import make_logits_processor
    proc = make_logits_processor(spec, thresholds={"Humanizing requests": 1.1})
    llm = LLM("path/to/refusal-model", logits_processors=[proc])

Per request, through ``SamplingParams.extra_args`` (``vllm_xargs`` in the OpenAI-compatible server)::

    SamplingParams(extra_args={"refusal_thresholds": {"Requests with safety concerns": 0.2},
                               "refusal_mode": "category", "refusal_logit_bias": 0.0})

``refusal_thresholds`` / ``refusal_logit_bias`` take a number, a list of C numbers, or a mapping from
category name (or index) to number; categories left out keep the processor's defaults.
``refusal_mode`` is ``"category"``, ``"sum"`` or ``"free"``. The decision is visible in the output as
the first token (the refusal token of the chosen category, or ``[respond]``); the probabilities are
the first token's raw log-probabilities (``logprobs`` with ``logprobs_mode="raw_logprobs"``).

Structured outputs (JSON mode, regex, grammar) are not refusal-controlled: vLLM applies the grammar's
mask before logits processors run, so the probabilities would be read from masked logits and the forced
control token would be one the grammar forbids. Those requests keep the grammar's choice of first token;
their control tokens stay masked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..spec import MODES, RefusalSpec, SampleOutput
from ._common import PerCategory, optional_base, thresholds_and_mode
from ._requests import EXTRA_ARGS, check_logits, refuse_rows, request_controls
from ._vllm_common import (_Defaults, _check_index, _spec_from_vllm_config, checked_defaults, constrained,
                           controls_or_defaults, host_to_device)
from .vllm_v2 import HAVE_VLLM_V2, RefusalLogitsProcessorV2, RefusalSlotState

_VLLMBase, _VLLM_IMPORT_ERROR = optional_base("vllm.v1.sample.logits_processor", "LogitsProcessor")
HAVE_VLLM = _VLLM_IMPORT_ERROR is None

__all__ = ["RefusalLogitsProcessor", "RefusalBatchState", "RefusalLogitsProcessorV2", "RefusalSlotState",
           "make_logits_processor", "request_controls", "HAVE_VLLM", "HAVE_VLLM_V2", "EXTRA_ARGS"]


@dataclass
class _Request:
    thresholds: list[float]       # [C]
    logit_bias: list[float]       # [C]
    mode: int                     # MODES code
    output_ids: Sequence[int]     # vLLM's live list of generated tokens


class RefusalBatchState:
    """Per-row refusal controls of a vLLM persistent batch, and what they do to a logits tensor.

    The vLLM-independent core of `RefusalLogitsProcessor`: it reads only the documented fields of
    ``BatchUpdate`` and ``SamplingParams.extra_args``, so it can be driven (and tested) without vLLM.

    Parameters
    ----------
    spec : RefusalSpec
        The model's control tokens.
    thresholds, mode, logit_bias
        Defaults for requests whose ``extra_args`` do not set them.
        ``thresholds`` may be a thresholds file (path or loaded), whose mode then applies when ``mode``
        is None (the default; otherwise ``"category"``).
    device : torch.device
        Where the logits live.
    pin_memory : bool
        Stage host-to-device copies of per-row controls through pinned memory.
    backend : {"triton", "torch", None}
        Passed to `apply_refusal_`.

    Attributes
    ----------
    last_rows : torch.Tensor or None
        int64 ``[F]``: rows that were at their first generated position in the latest `apply`.
    last_output : SampleOutput or None
        `apply_refusal_`'s result for those rows (``refusal_probs [F, C]``, ``refused [F]``, ...).
    """

    def __init__(self, spec: RefusalSpec, *, thresholds: PerCategory = 0.5, mode: Optional[str] = None,
                 logit_bias: PerCategory = 0.0, device=None, pin_memory: bool = False,
                 backend: Optional[str] = None) -> None:
        self.spec, self.defaults = spec, checked_defaults(spec, thresholds, mode, logit_bias, backend)
        self.device = torch.device(device if device is not None else "cpu")
        self.pin_memory = bool(pin_memory) and self.device.type == "cuda"
        self.backend = backend
        self.requests: dict[int, _Request] = {}
        self._waiting: set[int] = set()   # rows that may still be at their first position
        self.last_rows: Optional[torch.Tensor] = None
        self.last_output: Optional[SampleOutput] = None

    # -- batch bookkeeping ---------------------------------------------------------------------------
    def add(self, index: int, params, output_ids: Sequence[int]) -> None:
        """Track the request now at row ``index`` (``params``: its SamplingParams, or None)."""
        _check_index("index", index)
        self.remove(index)
        if params is None:  # not a sampling request: its row stays untracked (control tokens masked)
            return
        thr, bias, mode = controls_or_defaults(self.spec, params, self.defaults, f"row {index}")
        self.requests[index] = _Request(thr, bias, mode, output_ids)
        if len(output_ids) == 0 and not constrained(params):
            self._waiting.add(index)

    def remove(self, index: int) -> None:
        self.requests.pop(index, None)
        self._waiting.discard(index)

    def move(self, src: int, dst: int, swap: bool) -> None:
        _check_index("src", src)
        _check_index("dst", dst)
        a, b = self.requests.pop(src, None), self.requests.pop(dst, None)
        wa, wb = src in self._waiting, dst in self._waiting
        self._waiting.discard(src)
        self._waiting.discard(dst)
        if a is not None:
            self.requests[dst] = a
            if wa:
                self._waiting.add(dst)
        if swap and b is not None:
            self.requests[src] = b
            if wb:
                self._waiting.add(src)

    def update(self, batch_update) -> None:
        """Apply a vLLM ``BatchUpdate`` (or None: no change): removed, then added, then moved."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.remove(int(index))
        for item in batch_update.added:
            index, params, output_ids = _unpack_added(item)
            self.add(index, params, output_ids)
        for item in batch_update.moved:
            src, dst, direction = item
            self.move(int(src), int(dst), _is_swap(direction))

    # -- logits ----------------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Refusal decision on first-position rows, control tokens masked on every other row.

        Parameters
        ----------
        logits : float [R, V]
            One row per persistent-batch row; modified in place and returned.
        """
        check_logits(logits, self.spec)
        R = logits.shape[0]
        first = sorted(i for i in self._waiting if i < R and len(self.requests[i].output_ids) == 0)
        # Once a row has an output token it never returns to its first position (until re-added).
        self._waiting = {i for i in self._waiting if len(self.requests[i].output_ids) == 0}
        controls = [(r.thresholds, r.logit_bias, r.mode) for r in (self.requests[i] for i in first)]
        self.last_rows, self.last_output = refuse_rows(logits, self.spec, first, controls, backend=self.backend,
                                                       to_device=self._to_device)
        return logits

    def _to_device(self, values: list, dtype: torch.dtype, device) -> torch.Tensor:
        return host_to_device(values, dtype, device, self.pin_memory)


def _unpack_added(item) -> tuple[int, Any, Sequence[int]]:
    # vLLM >= 0.10.2 documents (index, params, prompt_tok_ids, output_tok_ids); 0.10.0/0.10.1 had
    # (prompt_tok_ids, index, params, output_tok_ids). The index is the int among the first two.
    if len(item) == 4:
        if isinstance(item[0], int) and not isinstance(item[0], bool):
            index, params, _, out = item
        elif isinstance(item[1], int) and not isinstance(item[1], bool):
            _, index, params, out = item
        else:
            raise TypeError(f"unrecognised BatchUpdate.added entry {item!r}")
        return int(index), params, out
    raise TypeError(f"BatchUpdate.added entries must be (index, params, prompt_tok_ids, output_tok_ids), "
                    f"got {len(item)} fields")


def _is_swap(direction) -> bool:
    # Compared by name: vLLM's MoveDirectionality values changed (0/1, then auto()) across releases.
    return getattr(direction, "name", str(direction)).upper().endswith("SWAP")


class RefusalLogitsProcessor(_Defaults, _VLLMBase):
    """vLLM v1 logits processor applying rtkern's refusal decision (see the module docstring).

    Class attributes (set them with `make_logits_processor`): ``spec`` (None: found in the model's
    tokenizer), ``scheme`` (for that search: ``"category"``, ``"single"`` or None: the checkpoint's
    rtkern.json, else both),
    ``thresholds``, ``mode``, ``logit_bias`` (defaults for requests that do not set them) and
    ``backend``.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        if not HAVE_VLLM:
            hint = ("this vLLM has only Model Runner V2: use rtkern.adapters.vllm:RefusalLogitsProcessorV2; "
                    if HAVE_VLLM_V2 else "")
            raise ImportError(f"rtkern.adapters.vllm.RefusalLogitsProcessor needs vLLM <= 0.33 (pip install vllm); "
                              f"{hint}importing vllm.v1.sample.logits_processor failed: {_VLLM_IMPORT_ERROR!r}")
        spec = type(self).spec or _spec_from_vllm_config(vllm_config, type(self).scheme)
        self.state = RefusalBatchState(spec, thresholds=self.thresholds, mode=self.mode,
                                       logit_bias=self.logit_bias, device=device, pin_memory=is_pin_memory,
                                       backend=self.backend)

    def is_argmax_invariant(self) -> bool:
        """False: forcing the refusal or ``[respond]`` token changes greedy results."""
        return False

    def update_state(self, batch_update) -> None:
        self.state.update(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.state.apply(logits)


def make_logits_processor(spec: Optional[RefusalSpec] = None, *, thresholds: PerCategory = 0.5,
                          mode: Optional[str] = None, logit_bias: PerCategory = 0.0, scheme: Optional[str] = None,
                          backend: Optional[str] = None, runner: Optional[str] = None) -> type:
    """A `RefusalLogitsProcessor` subclass bound to a spec and default controls, for ``LLM(logits_processors=[...])``.

    Parameters
    ----------
    spec : RefusalSpec, optional
        The model's control tokens; None finds them in the model's tokenizer when vLLM builds the
        processor.
    thresholds, mode, logit_bias
        Defaults for requests that do not set ``refusal_*`` extra arguments (forms as in
        `request_controls`).
        ``thresholds`` may be a thresholds file (path or loaded), whose mode then applies when ``mode``
        is None (the default; otherwise ``"category"``).
    scheme : {"category", "single", None}
        Which control tokens to look for when ``spec`` is None (None: category, then single).
    backend : {"triton", "torch", None}
        Passed to `apply_refusal_`.
    runner : {"v1", "v2", None}
        The model runner's interface: ``"v1"`` (`RefusalLogitsProcessor`) or ``"v2"``
        (`RefusalLogitsProcessorV2`, Model Runner V2); None: v1 where vLLM still has it (<= 0.33),
        else v2.

    Returns
    -------
    type
        The subclass (built even without vLLM, whose absence is reported when vLLM constructs it).
    """
    thresholds, mode = thresholds_and_mode(thresholds, mode)
    if spec is not None:
        request_controls(spec, None, thresholds=thresholds, mode=mode, logit_bias=logit_bias)
    elif not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if scheme not in (None, "category", "single"):
        raise ValueError(f"scheme must be 'category', 'single' or None, got {scheme!r}")
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    if runner not in (None, "v1", "v2"):
        raise ValueError(f"runner must be 'v1', 'v2' or None, got {runner!r}")
    if runner is None:
        runner = "v1" if HAVE_VLLM or not HAVE_VLLM_V2 else "v2"
    base = RefusalLogitsProcessor if runner == "v1" else RefusalLogitsProcessorV2
    attrs = dict(spec=spec, scheme=scheme, thresholds=thresholds, mode=mode, logit_bias=logit_bias,
                 backend=backend, __module__=__name__,
                 __doc__=f"{base.__name__} bound to {spec!r} (rtkern.adapters.vllm.make_logits_processor).")
    return type(f"Bound{base.__name__}", (base,), attrs)

