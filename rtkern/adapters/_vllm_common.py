"""What the vLLM adapters for both model runners share: defaults, argument checks, the spec lookup, host copies."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from ..spec import CATEGORIES, RefusalSpec
from ._common import PerCategory, thresholds_and_mode
from ._requests import reject_unknown_args, request_controls

log = logging.getLogger("rtkern.adapters.vllm")

# Category names that a spec found in a tokenizer can have (both schemes), for entrypoint validation.
_DISCOVERABLE_NAMES = frozenset(CATEGORIES) | {"refuse"}


def checked_defaults(spec: RefusalSpec, thresholds: PerCategory, mode: Optional[str], logit_bias: PerCategory,
                     backend: Optional[str]) -> dict:
    """A processor's default controls as `request_controls` keywords, checked now (not at the first request)."""
    if not isinstance(spec, RefusalSpec):
        raise TypeError(f"spec must be a RefusalSpec, got {type(spec).__name__}")
    thresholds, mode = thresholds_and_mode(thresholds, mode)
    if not isinstance(mode, str):
        raise TypeError(f"mode must be one string for the processor's default, got {mode!r}")
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    defaults = dict(thresholds=thresholds, mode=mode, logit_bias=logit_bias)
    request_controls(spec, None, **defaults)
    return defaults


def controls_or_defaults(spec: RefusalSpec, params, defaults: dict, where: str) -> tuple:
    """`request_controls` of a request's ``extra_args``; the defaults (and a warning) where they are bad."""
    try:
        return request_controls(spec, getattr(params, "extra_args", None), **defaults)
    except (TypeError, ValueError) as e:
        # validate_params normally rejects these at the entrypoint; raising inside the engine
        # would take every other request down with this one.
        log.warning("rtkern refusal processor: ignoring bad refusal arguments of %s (%s); using the defaults",
                    where, e)
        return request_controls(spec, None, **defaults)


def host_to_device(values, dtype: torch.dtype, device, pin: bool) -> torch.Tensor:
    """Host values as a tensor on ``device``; pinned and non-blocking to CUDA when ``pin``, so the copy
    does not wait for the work already queued on the stream."""
    t = torch.tensor(values, dtype=dtype)
    if pin and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def constrained(params) -> bool:
    """Whether a request's output follows a grammar (structured outputs; ``guided_decoding`` before
    vLLM 0.11). vLLM masks such logits with the grammar before logits processors run: the refusal
    probabilities would be read from masked logits, and the token forced (a control token) is one the
    grammar forbids. Such requests are not decided; their control tokens stay masked."""
    return getattr(params, "structured_outputs", None) is not None or \
        getattr(params, "guided_decoding", None) is not None


def _check_index(name: str, index) -> None:
    # A negative row would index the logits from the end in apply, long after the bad update.
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"{name} must be a persistent-batch row (an int >= 0), got {index!r}")


def _spec_from_vllm_config(vllm_config, scheme: Optional[str]) -> RefusalSpec:
    mc = getattr(vllm_config, "model_config", None)
    path = getattr(mc, "tokenizer", None) or getattr(mc, "model", None)
    if not path:
        raise ValueError("cannot find the model's tokenizer in vllm_config.model_config; pass the spec "
                         "with rtkern.adapters.vllm.make_logits_processor(spec)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=getattr(mc, "tokenizer_revision", None),
                                        local_files_only=True, trust_remote_code=False)
    if scheme is None and Path(path).is_dir():  # a checkpoint from rtkern's trainer says which scheme it learned
        from ..loader import read_control_file
        scheme = (read_control_file(path) or ([], None))[1]
    try:
        return RefusalSpec.find(tok, scheme)
    except ValueError as e:
        raise ValueError(f"the tokenizer at {path} has no refusal control tokens ({e}); pass "
                         f"the spec with rtkern.adapters.vllm.make_logits_processor(spec)")


class _Defaults:
    """The class attributes and entrypoint validation that both runners' processors share."""

    spec: Optional[RefusalSpec] = None
    scheme: Optional[str] = None
    thresholds: PerCategory = 0.5
    mode: str = "category"
    logit_bias: PerCategory = 0.0
    backend: Optional[str] = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Reject bad ``refusal_*`` extra arguments at the entrypoint (ValueError)."""
        extra = getattr(sampling_params, "extra_args", None)
        if not extra:
            return
        if not isinstance(extra, Mapping):
            raise ValueError(f"extra_args must be a mapping, got {type(extra).__name__}")
        reject_unknown_args(extra)
        try:
            if cls.spec is not None:
                request_controls(cls.spec, extra, thresholds=cls.thresholds, mode=cls.mode,
                                 logit_bias=cls.logit_bias)
            else:
                # The spec is found per engine; here only the names and sizes it can have are known.
                request_controls(_validation_spec(extra), extra, mode=cls.mode)
        except TypeError as e:
            raise ValueError(str(e)) from e


def _validation_spec(extra: Mapping) -> RefusalSpec:
    # A stand-in spec for entrypoint checks when the real one is found only in the engine: mapping keys
    # must be names of one of the schemes, and lists must match that scheme's number of categories.
    keys = set()
    sizes = set()
    for k in ("refusal_thresholds", "refusal_logit_bias"):
        v = extra.get(k)
        if isinstance(v, Mapping):
            keys |= {x for x in v if isinstance(x, str)}
        elif isinstance(v, (list, tuple)):
            sizes.add(len(v))
    bad = keys - _DISCOVERABLE_NAMES
    if bad:
        raise ValueError(f"unknown refusal category {sorted(bad)[0]!r}; categories are {list(CATEGORIES)} "
                         f"(category scheme) or ['refuse'] (single scheme)")
    if keys & {"refuse"} or sizes == {1}:
        return RefusalSpec([0], 1, names=["refuse"])
    return RefusalSpec(list(range(len(CATEGORIES))), len(CATEGORIES), names=CATEGORIES)
