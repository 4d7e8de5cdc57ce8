"""Refusal thresholds file: written by ``rtkern calibrate``, read by the engine, ``rtkern generate`` and the
adapters (``--thresholds FILE``).

    {
      "format": "rtkern-thresholds/1",
      "mode": "category",
      "thresholds": {"Humanizing requests": 0.41, "Incomplete requests": 2.0, ...},
      "default": 0.5,                      (optional: for categories the file does not name)
      "created_by": "rtkern calibrate",    (optional)
      "metadata": {...}                    (optional: free-form, e.g. how the values were chosen)
    }

Keys of ``thresholds`` are the category names of the model's `RefusalSpec` (``"refuse"`` for the single
scheme). A value above 1 switches its category off. In ``sum`` mode the sampler compares the summed
refusal probability with one threshold, so every value in the file must be the same.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import torch

from .spec import RefusalSpec, thresholds_float32

FORMAT = "rtkern-thresholds/1"
_MODES = ("category", "sum")
_KEYS = ("format", "mode", "thresholds", "default", "created_by", "metadata")
PathLike = Union[str, Path]


@dataclass(frozen=True)
class Thresholds:
    """Contents of a thresholds file.

    thresholds : category name -> threshold (>= 0; above 1 switches the category off)
    mode : ``"category"`` or ``"sum"``
    default : threshold for categories the file does not name (None: every category must be named)
    created_by, metadata : provenance, not interpreted
    """

    thresholds: dict[str, float]
    mode: str = "category"
    default: Optional[float] = None
    created_by: Optional[str] = None
    metadata: dict = field(default_factory=dict)

    def tensor(self, spec: RefusalSpec, device=None) -> torch.Tensor:
        """Thresholds in the spec's category order: float32 ``[C]``, for ``RefusalControls.build``."""
        return thresholds_tensor(self, spec, device=device)


def _value(v, where: str) -> float:
    # numbers.Real takes Python and numpy ints and floats; bools (numpy's too) are not thresholds.
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise ValueError(f"{where} must be a number, got {json.dumps(v) if _jsonable(v) else repr(v)}")
    try:
        v = float(v)
    except OverflowError:
        raise ValueError(f"{where} must be finite (use a value above 1 to switch a category off), got an "
                         f"integer of about {int(abs(int(v)).bit_length() * math.log10(2)) + 1} digits, "
                         "too large for a float") from None
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{where} must be finite (use a value above 1 to switch a category off), got {v}")
    if v < 0:
        raise ValueError(f"{where} must be >= 0, got {v}")
    return v


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _parse(data, src: str, spec: Optional[RefusalSpec]) -> Thresholds:
    if not isinstance(data, dict):
        raise ValueError(f"{src}: expected a JSON object, got {type(data).__name__}")
    unknown = [k for k in data if k not in _KEYS]
    if unknown:
        raise ValueError(f"{src}: unknown key {unknown[0]!r} (allowed: {list(_KEYS)})")
    if data.get("format") != FORMAT:
        raise ValueError(f"{src}: key 'format' must be {FORMAT!r}, got {data.get('format')!r}")
    mode = data.get("mode", "category")
    if mode not in _MODES:
        raise ValueError(f"{src}: key 'mode' must be one of {list(_MODES)}, got {mode!r}")
    raw = data.get("thresholds")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{src}: key 'thresholds' must be a non-empty object of category name -> number")
    values = {str(k): _value(v, f"{src}: thresholds[{k!r}]") for k, v in raw.items()}
    default = None if data.get("default") is None else _value(data["default"], f"{src}: key 'default'")
    if mode == "sum":
        _check_one_value(values, default, src)
    created_by = data.get("created_by")
    if created_by is not None and not isinstance(created_by, str):
        raise ValueError(f"{src}: key 'created_by' must be a string")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{src}: key 'metadata' must be an object")
    th = Thresholds(values, mode, default, created_by, metadata)
    if spec is not None:
        check_against_spec(th, spec, src)
    return th


def _check_one_value(values: dict, default: Optional[float], src: str) -> None:
    """Mode ``sum`` compares one threshold with the summed probability: every value must be the same as
    the sampler holds it (float32), so 0.3 written as a double and as a float32 agree."""
    distinct = set(values.values()) | ({default} if default is not None else set())
    if len(thresholds_float32(torch.tensor(sorted(distinct), dtype=torch.float64)).unique()) > 1:
        where = f"'thresholds' holds {sorted(set(values.values()))}"
        if default is not None:
            where += f" and 'default' is {default}"
        raise ValueError(f"{src}: mode 'sum' uses one threshold on the summed probability, so every value "
                         f"must be the same, got different values {sorted(distinct)} ({where})")


def check_against_spec(th: Thresholds, spec: RefusalSpec, src: str = "thresholds") -> None:
    """Raise ValueError if ``th`` names a category the model lacks, or misses one and has no default."""
    names = list(spec.names)
    unknown = [k for k in th.thresholds if k not in names]
    if unknown:
        raise ValueError(f"{src}: thresholds[{unknown[0]!r}] is not a category of this model "
                         f"(categories: {names})")
    missing = [n for n in names if n not in th.thresholds]
    if missing and th.default is None:
        raise ValueError(f"{src}: no threshold for category {missing[0]!r} and no 'default'")


def load_thresholds(path: PathLike, spec: Optional[RefusalSpec] = None) -> Thresholds:
    """Read and validate a thresholds file.

    Parameters
    ----------
    path : str or Path
    spec : RefusalSpec, optional
        When given, the category names are checked against the model's.

    Returns
    -------
    Thresholds

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Invalid JSON, a key repeated in one object, wrong ``format``/``mode``, a value that is not a finite
        number >= 0, an unknown key, or a category the spec lacks; the message names the file and the key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: thresholds file not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    try:
        # Python's json reads NaN/Infinity as floats; `_value` then rejects them naming the key.
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise ValueError(f"{path}: key {e.args[0]!r} appears more than once in a JSON object "
                         f"(values {e.args[1]} and {e.args[2]}); expected each key once") from None
    except ValueError as e:  # JSONDecodeError, or an integer too long for Python to read
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    return _parse(data, str(path), spec)


class _DuplicateKey(ValueError):
    """A key repeated in one JSON object: (key, first value, second value)."""


def _unique_keys(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k, _short(out[k]), _short(v))
        out[k] = v
    return out


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def save_thresholds(path: PathLike, thresholds: Union[Thresholds, Mapping[str, float]], *,
                    mode: str = "category", default: Optional[float] = None,
                    created_by: Optional[str] = "rtkern calibrate", metadata: Optional[dict] = None,
                    spec: Optional[RefusalSpec] = None) -> Path:
    """Validate and write a thresholds file (the values are checked as `load_thresholds` checks them).

    ``thresholds`` is a `Thresholds` (other keyword arguments are then ignored) or a mapping of category
    name -> value; values may be any real number (numpy's too, written as floats), not bools. Returns the
    path written.
    """
    if isinstance(thresholds, Thresholds):
        th = thresholds
    else:
        if not isinstance(thresholds, Mapping):
            raise TypeError(f"thresholds must be a Thresholds or a mapping, got {type(thresholds).__name__}")
        th = Thresholds({str(k): v for k, v in thresholds.items()}, mode, default, created_by, dict(metadata or {}))
    path = Path(path)
    th = _parse(_to_json(th), str(path), spec)  # never write a file the loader would reject
    try:
        text = json.dumps(_to_json(th), indent=2, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"{path}: metadata must not hold NaN or infinity ({e})") from e
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _to_json(th: Thresholds) -> dict:
    data = {"format": FORMAT, "mode": th.mode, "thresholds": dict(th.thresholds)}
    if th.default is not None:
        data["default"] = th.default
    if th.created_by is not None:
        data["created_by"] = th.created_by
    if th.metadata:
        data["metadata"] = th.metadata
    return data


def thresholds_tensor(th: Thresholds, spec: RefusalSpec, device=None) -> torch.Tensor:
    """Per-category thresholds in the spec's order, float32 ``[C]``.

    Pass it as ``RefusalControls.build(..., thresholds=t, mode=th.mode)``.
    """
    if not isinstance(th, Thresholds):
        raise TypeError(f"th must be a Thresholds, got {type(th).__name__}")
    check_against_spec(th, spec)
    vals = [th.thresholds.get(n, th.default) for n in spec.names]
    return thresholds_float32(torch.tensor(vals, dtype=torch.float64, device=device))
