"""Argument handling shared by the adapters: per-category values given by name, modes given by name.

Thresholds reach the adapters from users and from calibration files, where a mapping from category
name to value is the natural form (``{"Humanizing requests": 1.1}`` switches one category off). These
helpers turn every accepted form into what `RefusalControls.build` takes, with errors that name the
argument and the spec's categories.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Union

import torch

from ..spec import MODES, RefusalSpec
from ..thresholds import Thresholds, load_thresholds

PerCategory = Union[float, int, Sequence, Mapping, torch.Tensor]


def real_number(name: str, v) -> float:
    """``v`` as a float; TypeError for anything but a real number (bool included)."""
    # bool is an int subclass; True as a threshold is almost certainly a mistake.
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} values must be real numbers, got {v!r} ({type(v).__name__})")
    try:
        return float(v)
    except OverflowError:  # a JSON integer of 400 digits: a bad value (ValueError), not a crash
        raise ValueError(f"{name} values must fit a float, got an integer of {len(str(abs(int(v))))} digits") from None


def per_category(name: str, value: PerCategory, spec: RefusalSpec, default: float
                 ) -> Union[float, torch.Tensor]:
    """Normalise a per-category control to a float or a tensor ``[C]`` / ``[B, C]``.

    Parameters
    ----------
    name : str
        Argument name, for error messages.
    value : float | sequence | mapping | torch.Tensor | rtkern.thresholds.Thresholds
        A scalar (every category), a length-C sequence, a ``[C]`` or ``[B, C]`` tensor, a mapping
        from category name (``spec.names``) or index to value, or a loaded thresholds file. Categories a mapping leaves out get
        ``default``.
    spec : RefusalSpec
        Supplies C and the category names.
    default : float
        Value for categories a mapping does not mention.

    Returns
    -------
    float or torch.Tensor
        A float, or a CPU tensor of shape ``[C]`` or ``[B, C]`` (float64: `RefusalControls.build`, which
        also checks the shape, rounds to the sampler's float32 once).
    """
    C = spec.num_categories
    if isinstance(value, Thresholds):  # a calibration file, loaded
        return value.tensor(spec)
    if isinstance(value, Mapping):
        out = [float(default)] * C
        for key, v in value.items():
            out[category_index(name, key, spec)] = real_number(name, v)
        return torch.tensor(out, dtype=torch.float64)
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real-valued tensor, got {value.dtype}")
        return value.detach().to(device="cpu", dtype=torch.float64)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number, a sequence, a mapping or a tensor, got a string")
    if isinstance(value, Sequence):
        rows = [list(r) if isinstance(r, Sequence) and not isinstance(r, (str, bytes)) else r for r in value]
        if rows and all(isinstance(r, list) for r in rows):
            return torch.tensor([[real_number(name, v) for v in r] for r in rows], dtype=torch.float64)
        return torch.tensor([real_number(name, v) for v in rows], dtype=torch.float64)
    return real_number(name, value)


def category_index(name: str, key, spec: RefusalSpec) -> int:
    """Index of a category given by name (one of ``spec.names``) or by index."""
    if isinstance(key, str):
        if key not in spec.names:
            raise ValueError(f"{name}: unknown category {key!r}; the model's categories are {list(spec.names)}")
        return spec.names.index(key)
    if isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key < spec.num_categories:
            raise ValueError(f"{name}: category index {key} is out of range for {spec.num_categories} categories")
        return key
    raise TypeError(f"{name}: mapping keys must be category names or indices, got {key!r}")


def thresholds_and_mode(thresholds, mode):
    """Let a thresholds file bring its own decision rule.

    ``thresholds`` given as a path is loaded (`load_thresholds`); a loaded file's ``mode`` is used when
    ``mode`` is None and must agree with it otherwise, since the file's values were calibrated for it.
    Any other ``thresholds`` passes through, and a None ``mode`` becomes ``"category"``.
    """
    if isinstance(thresholds, (str, os.PathLike)):
        thresholds = load_thresholds(thresholds)
    if not isinstance(thresholds, Thresholds):
        return thresholds, "category" if mode is None else mode
    if mode is None:
        return thresholds, thresholds.mode
    modes = [mode] if isinstance(mode, str) else list(mode) if isinstance(mode, Sequence) else [mode]
    if any(m != thresholds.mode for m in modes):
        raise ValueError(f"mode {mode!r} disagrees with the thresholds file's mode {thresholds.mode!r}, "
                         "for which its values were calibrated; leave mode unset to use the file's")
    return thresholds, mode


def per_row_modes(mode) -> Union[str, list[str]]:
    """Validate ``mode``: one of ``MODES`` for every row, or a sequence of them (one per row)."""
    if isinstance(mode, str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        return mode
    if isinstance(mode, Sequence) and not isinstance(mode, bytes) and len(mode) > 0:
        bad = [m for m in mode if not isinstance(m, str) or m not in MODES]
        if bad:
            raise ValueError(f"mode must be one of {list(MODES)} (per row), got {bad[0]!r}")
        return list(mode)
    raise TypeError(f"mode must be a string or a non-empty sequence of strings, got {mode!r}")


def optional_base(module: str, name: str) -> tuple[type, BaseException | None]:
    """``(module.name, None)`` from an optional runtime, or ``(object, the error)`` where it does not import.

    A runtime's import can fail in more ways than ImportError (CUDA set-up, version skew); the error is
    kept so that using the adapter can re-raise it with context.
    """
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as e:  # noqa: BLE001
        return object, e

