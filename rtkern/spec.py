"""Model-level refusal-token facts (`RefusalSpec`) and per-row sampler controls (`RefusalControls`).

Value checks (NaN thresholds, negative temperatures, ...) happen here, when controls are built or
updated, because they need the values; `refusal_sample` itself checks only shapes, dtypes and devices so
that it never synchronises with the device and stays capturable in a CUDA graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .argtypes import positive_int

CATEGORIES = (
    "Humanizing requests",
    "Incomplete requests",
    "Indeterminate requests",
    "Requests with safety concerns",
    "Unsupported requests",
)
REFUSE_TOKEN = "[refuse]"
RESPOND_TOKEN = "[respond]"
MODES = {"category": 0, "sum": 1, "free": 2}

Scalarish = Union[float, int, bool, Sequence, torch.Tensor]


def control_token_strings(scheme: str) -> tuple[list[str], list[str]]:
    """Token strings and names of the refusal tokens of a scheme (``"single"`` or ``"category"``)."""
    if scheme == "single":
        return [REFUSE_TOKEN], ["refuse"]
    if scheme == "category":
        return [f"[{c}]" for c in CATEGORIES], list(CATEGORIES)
    raise ValueError(f"scheme must be 'single' or 'category', got {scheme!r}")


@dataclass(frozen=True)
class RefusalSpec:
    """The refusal control tokens of a model.

    Parameters
    ----------
    refusal_ids : sequence of int, length C >= 1
        Vocabulary ids of the refusal tokens, in category order.
    respond_id : int, optional
        Id of ``[respond]``; None when the model has no such token.
    names : sequence of str, optional
        Category names (default ``"refuse"`` for C=1, else ``"category_<c>"``).
    """

    refusal_ids: tuple[int, ...]
    respond_id: Optional[int] = None
    names: tuple[str, ...] = ()
    _device_ids: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __init__(self, refusal_ids: Sequence[int], respond_id: Optional[int] = None,
                 names: Optional[Sequence[str]] = None):
        ids = tuple(refusal_ids) if not isinstance(refusal_ids, int) else (refusal_ids,)
        if len(ids) == 0:
            raise ValueError("refusal_ids must name at least one token, got an empty sequence")
        for i in ids + ((respond_id,) if respond_id is not None else ()):
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"token ids must be non-negative ints, got {i!r}")
            if i < 0:
                raise ValueError(f"token ids must be non-negative ints, got {i!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"refusal_ids must be distinct, got {list(ids)}")
        if respond_id is not None and respond_id in ids:
            raise ValueError(f"respond_id {respond_id} is also a refusal id in {list(ids)}")
        if isinstance(names, str):  # would otherwise count as one name per character
            raise TypeError(f"names must be a sequence of {len(ids)} strings, got the string {names!r}")
        if names is None:
            names = ("refuse",) if len(ids) == 1 else tuple(f"category_{c}" for c in range(len(ids)))
        if len(names) != len(ids):
            raise ValueError(f"expected {len(ids)} names (one per refusal id), got {len(names)}")
        object.__setattr__(self, "refusal_ids", ids)
        object.__setattr__(self, "respond_id", respond_id)
        object.__setattr__(self, "names", tuple(str(n) for n in names))
        object.__setattr__(self, "_device_ids", {})

    @property
    def num_categories(self) -> int:
        return len(self.refusal_ids)

    @property
    def control_ids(self) -> tuple[int, ...]:
        """Refusal ids followed by the respond id (if any): every token the sampler governs."""
        return self.refusal_ids + (() if self.respond_id is None else (self.respond_id,))

    def ids_tensor(self, device: torch.device) -> torch.Tensor:
        """``control_ids`` as an int32 tensor on ``device``, cached (build it before CUDA-graph capture)."""
        key = device if isinstance(device, torch.device) else torch.device(device)
        t = self._device_ids.get(key)
        if t is None:
            t = torch.tensor(self.control_ids, dtype=torch.int32, device=device)
            self._device_ids[key] = t
        return t

    def check_vocab(self, vocab_size: int) -> None:
        if max(self.control_ids) < vocab_size:
            return
        bad = [i for i in self.control_ids if i >= vocab_size]
        if bad:
            raise ValueError(f"control token ids {bad} are out of range for a vocabulary of {vocab_size}")

    @classmethod
    def from_tokenizer(cls, tokenizer, scheme: str = "single", *, require_respond: bool = False) -> "RefusalSpec":
        """Find the control tokens in a tokenizer's vocabulary by their strings.

        Accepts our own special tokens (``"[refuse]"``) and the paper authors' checkpoints, where the
        tokens are ordinary vocabulary entries written with a leading space (``" [refuse]"``, stored as
        ``"Ġ[refuse]"`` or ``"▁[refuse]"`` depending on the tokenizer).
        """
        strings, names = control_token_strings(scheme)
        vocab = tokenizer.get_vocab()

        def find(s: str) -> Optional[int]:
            # Byte-level BPE and sentencepiece vocabularies spell every space, inner ones included
            # ("\u0120[Humanizing\u0120requests]"), with their own marker.
            for cand in (s, " " + s, "\u0120" + s.replace(" ", "\u0120"), "\u2581" + s.replace(" ", "\u2581")):
                if cand in vocab:
                    return int(vocab[cand])
            return None

        ids = [find(s) for s in strings]
        missing = [s for s, i in zip(strings, ids) if i is None]
        if missing:
            raise ValueError(f"tokenizer has no control tokens {missing} for scheme {scheme!r} "
                             f"(tried each with and without a leading space)")
        respond = find(RESPOND_TOKEN)
        if require_respond and respond is None:
            raise ValueError(f"tokenizer has no {RESPOND_TOKEN!r} token")
        return cls(ids, respond, names)

    @classmethod
    def find(cls, tokenizer, scheme: Optional[str] = None) -> "RefusalSpec":
        """`from_tokenizer` with ``scheme``; None tries the scheme the checkpoint was trained with
        (``tokenizer.scheme``, read by the loader from ``rtkern.json``), else ``category`` then ``single``.

        Raises ValueError with every scheme's complaint when none is found.
        """
        trained = getattr(tokenizer, "scheme", None)
        schemes = [scheme] if scheme else [trained] if trained in ("single", "category") else ["category", "single"]
        errors = []
        for s in schemes:
            try:
                return cls.from_tokenizer(tokenizer, s)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))


class SampleOutput(NamedTuple):
    """Result of `refusal_sample`.

    tokens : int64 [B]  next token per row; -1 on an invalid row.
    refusal_probs : float32 [B, C]  softmax probability (temperature 1, before masking) of each refusal
        token; NaN on rows whose logits hold NaN/+inf or are all -inf.
    refused : int32 [B]  refusal category index, -1 when not refusing, -2 on an invalid row.
    """

    tokens: torch.Tensor
    refusal_probs: torch.Tensor
    refused: torch.Tensor

    @staticmethod
    def empty(batch: int, num_categories: int, device) -> "SampleOutput":
        return SampleOutput(torch.empty(batch, dtype=torch.int64, device=device),
                            torch.empty(batch, num_categories, dtype=torch.float32, device=device),
                            torch.empty(batch, dtype=torch.int32, device=device))


def _as_tensor(name: str, value, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(value, (list, tuple)) and len(value):
        # Let torch infer the dtype, so that floats given for ints and bools for numbers are caught below.
        value = _tensor(name, value, None)
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise TypeError(f"{name} must be real, got a {value.dtype} tensor")
        if value.is_floating_point() and not dtype.is_floating_point:
            raise TypeError(f"{name} must hold integers, got a {value.dtype} tensor")
        if value.dtype == torch.bool and dtype != torch.bool:
            raise TypeError(f"{name} must be numeric, got a bool tensor")
        return value.detach().to(device=device, dtype=dtype)
    if isinstance(value, bool) and dtype != torch.bool:
        raise TypeError(f"{name} must be a number, got {value!r}")
    if isinstance(value, (bool, int, float, list, tuple)):
        if isinstance(value, float) and not dtype.is_floating_point:
            raise TypeError(f"{name} must be an int, got {value!r}")
        return _tensor(name, value, dtype).to(device)
    raise TypeError(f"{name} must be a scalar, a sequence or a tensor, got {type(value).__name__}")


def _is_bool(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(isinstance(v, bool) for v in value)
    return isinstance(value, bool)


def _tensor(name: str, value, dtype) -> torch.Tensor:
    try:
        return torch.tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # ragged, non-numeric, out of range
        raise ValueError(f"{name} must be numbers that fit {dtype or 'a tensor'}, "
                         f"got {str(value)[:80]} ({e})") from None


def _per_row(name, value, batch, dtype, device) -> torch.Tensor:
    if dtype == torch.bool:  # a flag: 0/1 or bools, never another number read as True
        t = _as_tensor(name, value, dtype if _is_bool(value) else torch.int64, device)
        if t.dtype != torch.bool and ((t != 0) & (t != 1)).any():
            raise ValueError(f"{name} must be bools or 0/1, got {t.flatten()[:8].tolist()}")
        t = t.to(torch.bool)
    else:
        t = _as_tensor(name, value, dtype, device)
    if t.dim() != 0 and t.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or a [{batch}] tensor, got shape {list(t.shape)}")
    return _owned(t, (batch,))


def _per_category(name, value, batch, num_categories, device) -> torch.Tensor:
    wide = _as_tensor(name, value, torch.float64, device)
    if wide.dim() != 0 and wide.shape not in ((num_categories,), (batch, num_categories)):
        raise ValueError(f"{name} must be a scalar, a [{num_categories}] or a [{batch}, {num_categories}] "
                         f"tensor, got shape {list(wide.shape)}")
    t = thresholds_float32(wide) if name == "thresholds" else wide.to(torch.float32)
    return _owned(t, (batch, num_categories))


def thresholds_float32(t: torch.Tensor) -> torch.Tensor:
    """Thresholds as the sampler's float32, keeping "above 1 switches a category off".

    A value in (1, 1 + 2**-24] rounds to 1.0 in float32, which a probability of 1 passes: it becomes the
    next float32 above 1 instead. Build float64 (or Python float) thresholds through this, not ``.float()``.
    """
    t32 = t.to(torch.float32)
    return torch.where((t > 1) & (t32 <= 1), torch.nextafter(torch.ones_like(t32), torch.full_like(t32, 2.0)), t32)


def _owned(t: torch.Tensor, shape) -> torch.Tensor:
    # A fresh dense buffer: broadcast views (stride 0) would alias the caller's tensor under update_().
    return torch.empty(shape, dtype=t.dtype, device=t.device).copy_(t)


def _modes(value, batch, device) -> torch.Tensor:
    if isinstance(value, str):
        value = [value] * batch
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        unknown = [m for m in value if m not in MODES]
        if unknown:
            raise ValueError(f"mode must be one of {list(MODES)}, got {unknown[0]!r}")
        value = [MODES[m] for m in value]
    t = _per_row("mode", value, batch, torch.int64, device)  # int64 first: a cast would wrap 2**32 to 0
    _check_modes(t)
    return t.to(torch.int32)


def _check_modes(t: torch.Tensor) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 2):
        raise ValueError(f"mode codes must be 0 (category), 1 (sum) or 2 (free), got {t.tolist()}")


def _check_values(thresholds, logit_bias, temperature) -> None:
    if torch.isnan(thresholds).any() or (thresholds < 0).any():
        raise ValueError(f"thresholds must be >= 0 and not NaN (above 1 switches a category off), "
                         f"got {thresholds.flatten()[:8].tolist()}")
    if not torch.isfinite(logit_bias).all():
        raise ValueError(f"logit_bias must be finite, got {logit_bias.flatten()[:8].tolist()}")
    if not torch.isfinite(temperature).all() or (temperature < 0).any():
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature.tolist()[:8]}")


@dataclass
class RefusalControls:
    """Per-row sampler controls, all tensors on the logits' device.

    thresholds : float32 [B, C]    refusal threshold per category (``sum`` mode reads column 0)
    logit_bias : float32 [B, C]    added to each refusal token's logit before everything else
    mode : int32 [B]               0 ``category``, 1 ``sum``, 2 ``free`` (README "Semantics"); ``build`` and
                                   ``update_`` check the codes, the sampler only on CPU tensors (on a GPU
                                   reading them would sync): other codes are undefined
    temperature : float32 [B]      0 = greedy
    first_step : bool [B]          True on the first generated position (the refusal decision)
    seed, position : int64 [B]     randomness key; the same (seed, position) gives the same draw
    vocab_mask : int32 [B, ceil(V/32)] or None   bit i of word w allows token 32*w + i

    Update the tensors in place (``update_``) to reuse them across CUDA-graph replays.
    """

    thresholds: torch.Tensor
    logit_bias: torch.Tensor
    mode: torch.Tensor
    temperature: torch.Tensor
    first_step: torch.Tensor
    seed: torch.Tensor
    position: torch.Tensor
    vocab_mask: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        return self.mode.shape[0]

    @property
    def num_categories(self) -> int:
        return self.thresholds.shape[1]

    @classmethod
    def build(cls, batch: int, num_categories: int, device=None, *, thresholds: Scalarish = 0.5,
              logit_bias: Scalarish = 0.0, mode: Union[str, Sequence[str], torch.Tensor] = "category",
              temperature: Scalarish = 1.0, first_step: Scalarish = True, seed: Scalarish = 0,
              position: Scalarish = 0, vocab_mask: Optional[torch.Tensor] = None) -> "RefusalControls":
        """Build controls for ``batch`` rows and ``num_categories`` refusal tokens.

        Each argument is a scalar (broadcast), a per-row ``[B]`` tensor/list, or for ``thresholds`` and
        ``logit_bias`` also a per-category ``[C]`` or full ``[B, C]`` tensor (a length-C 1-D input is
        per-category). Raises ValueError/TypeError on bad shapes or values.
        """
        positive_int(batch, "batch")
        positive_int(num_categories, "num_categories")
        device = torch.device(device if device is not None else "cpu")
        c = cls(
            thresholds=_per_category("thresholds", thresholds, batch, num_categories, device),
            logit_bias=_per_category("logit_bias", logit_bias, batch, num_categories, device),
            mode=_modes(mode, batch, device),
            temperature=_per_row("temperature", temperature, batch, torch.float32, device),
            first_step=_per_row("first_step", first_step, batch, torch.bool, device),
            seed=_per_row("seed", seed, batch, torch.int64, device),
            position=_per_row("position", position, batch, torch.int64, device),
            vocab_mask=None,
        )
        _check_values(c.thresholds, c.logit_bias, c.temperature)
        if vocab_mask is not None:
            c.vocab_mask = _check_mask(vocab_mask, batch, device)
        return c

    def update_(self, **values) -> "RefusalControls":
        """Copy new values into the existing tensors (same shapes, no reallocation; CUDA-graph safe).

        Every value is checked before the first write, so a rejected update leaves the controls as
        they were.
        """
        known = ("thresholds", "logit_bias", "mode", "temperature", "first_step", "seed", "position")
        unknown = [k for k in values if k not in known + ("vocab_mask",)]
        if unknown:
            raise TypeError(f"unknown control {unknown[0]!r}, expected one of {list(known) + ['vocab_mask']}")
        fresh = RefusalControls.build(self.batch, self.num_categories, self.mode.device, **{
            k: (getattr(self, k) if k not in values else values[k]) for k in known})
        if "vocab_mask" in values:
            if self.vocab_mask is None or values["vocab_mask"] is None:
                raise ValueError("vocab_mask can be updated in place only when both old and new are tensors")
            mask = _check_mask(values["vocab_mask"], self.batch, self.mode.device)
            if mask.shape != self.vocab_mask.shape:
                raise ValueError(f"vocab_mask must keep its shape {list(self.vocab_mask.shape)}, "
                                 f"got {list(mask.shape)}")
        for k in values:
            if k == "vocab_mask":
                self.vocab_mask.copy_(mask)
            else:
                getattr(self, k).copy_(getattr(fresh, k))
        return self

    def check(self, batch: int, num_categories: int, vocab_size: int, device: torch.device) -> None:
        """Shape/dtype/device checks against a logits tensor, and on the CPU the mode codes' values (on a
        GPU a value check would wait for the device).

        A decode loop passes the same controls every step, so a shape pass is remembered together with
        the very tensor objects it saw (held, so their ids cannot be reused): replacing a field re-checks.
        """
        key = (batch, num_categories, vocab_size, device)
        seen = (self.thresholds, self.logit_bias, self.mode, self.temperature, self.first_step, self.seed,
                self.position, self.vocab_mask)
        last = self.__dict__.get("_checked")
        if last is None or last[0] != key or not all(a is b for a, b in zip(last[1], seen)):
            self._check(batch, num_categories, vocab_size, device)
            self.__dict__["_checked"] = (key, seen)
        if self.mode.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_modes(self.mode)  # values, every call: free on the CPU (a GPU would wait for the device)

    def _check(self, batch: int, num_categories: int, vocab_size: int, device: torch.device) -> None:
        expect = {"thresholds": ((batch, num_categories), torch.float32),
                  "logit_bias": ((batch, num_categories), torch.float32),
                  "mode": ((batch,), torch.int32), "temperature": ((batch,), torch.float32),
                  "first_step": ((batch,), torch.bool), "seed": ((batch,), torch.int64),
                  "position": ((batch,), torch.int64)}
        if self.vocab_mask is not None:
            expect["vocab_mask"] = ((batch, (vocab_size + 31) // 32), torch.int32)
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"controls.{name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"controls.{name} must have shape {list(shape)}, got {list(t.shape)}")
            if t.dtype != dtype:
                raise TypeError(f"controls.{name} must be {dtype}, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"controls.{name} is on {t.device}, logits on {device}")
            if t.shape[-1] > 1 and t.stride(-1) != 1:
                raise ValueError(f"controls.{name} must be contiguous in its last dim")


def _check_mask(mask, batch: int, device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"vocab_mask must be an int32 tensor, got {type(mask).__name__}")
    if mask.dtype != torch.int32:
        raise TypeError(f"vocab_mask must be int32 (32 tokens per word), got {mask.dtype}")
    if mask.dim() == 1:
        mask = mask.expand(batch, -1)
    if mask.dim() != 2 or mask.shape[0] != batch:
        raise ValueError(f"vocab_mask must be [{batch}, ceil(V/32)], got {list(mask.shape)}")
    return _owned(mask.to(device), tuple(mask.shape))


def pack_vocab_mask(allowed: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[B, V]`` allowed-token matrix into the int32 ``[B, ceil(V/32)]`` bitmask layout."""
    if allowed.dtype != torch.bool or allowed.dim() != 2:
        raise TypeError(f"allowed must be a bool [B, V] tensor, got {allowed.dtype} {list(allowed.shape)}")
    b, v = allowed.shape
    words = math.ceil(v / 32)
    padded = torch.zeros(b, words * 32, dtype=torch.int64, device=allowed.device)
    padded[:, :v] = allowed.to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=allowed.device),
                                       torch.arange(32, device=allowed.device))
    packed = (padded.view(b, words, 32) * weights).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_vocab_mask(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of `pack_vocab_mask`: bool ``[B, V]``."""
    idx = torch.arange(vocab_size, device=mask.device)
    words = mask.to(torch.int64)[:, idx // 32]
    return ((words >> (idx % 32)) & 1).bool()
