"""Weight averaging of fine-tuned checkpoints ("model soup", Wortsman et al. 2022): ``rtkern average``.

Runs of one recipe that differ only in data order land on operating points several points apart
(train/RESULTS.md); the average of their weights sits between them and keeps the per-category
separation. Every input must be a checkpoint written by ``rtkern train`` from the same base: same
architecture, same vocabulary size and the same control tokens, else a ``ValueError`` names the file.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..argtypes import finite_float
from .checkpoint import load_control_tokens, save_checkpoint


def average_checkpoints(paths: Sequence, out, *, weights: Optional[Sequence[float]] = None) -> Path:
    """Write the weighted mean of the checkpoints' weights to ``out`` (a checkpoint directory).

    Parameters
    ----------
    paths : sequence of str or Path
        Two or more ``rtkern train`` checkpoint directories of one base model.
    out : str or Path
        Output directory (written atomically; an existing one is replaced). The tokenizer, config and
        control tokens are the first checkpoint's; so is the stored dtype (the mean is taken in float32).
    weights : sequence of float, optional
        One positive weight per checkpoint (normalised to sum 1); default equal weights.

    Returns
    -------
    Path
        ``out``.
    """
    from ..loader import load_model

    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(paths)}")
    w = _normalised(weights, len(paths))
    if Path(out).resolve() in {p.resolve() for p in paths}:
        raise ValueError(f"--out {out} is one of the inputs; write the average elsewhere")
    dtype = _stored_dtype(paths[0])
    control = load_control_tokens(paths[0])
    for path in paths[1:]:   # cheap checks first: no weights are read for a mismatched set
        theirs = load_control_tokens(path)
        if theirs != control:
            raise ValueError(f"{path}: control tokens differ from {paths[0]}: {theirs} vs {control}")
    model, tok = load_model(paths[0], device="cpu", dtype=torch.float32)   # bf16/fp16 widen exactly
    acc = {k: v * w[0] for k, v in model.state_dict().items()}
    for path, wi in zip(paths[1:], w[1:]):
        other, _ = load_model(path, device="cpu", dtype=torch.float32)
        _check_same_architecture(paths[0], path, model, other)
        for k, v in other.state_dict().items():
            acc[k] += v * wi
        del other
    with torch.no_grad():
        model.load_state_dict(acc)
    return save_checkpoint(out, model.to(dtype), tok, control)


def _stored_dtype(path: Path) -> torch.dtype:
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    from ..loader import _FLOAT_DTYPES

    dtype = getattr(torch, str(name), None)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{path / 'config.json'}: dtype {name!r} is not float32, bfloat16 or float16")
    return dtype


def _normalised(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = list(weights)
    if len(w) != n:
        raise ValueError(f"expected one weight per checkpoint ({n}), got {len(w)}")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0 for x in w):
        raise ValueError(f"weights must be finite and positive, got {w}")
    return [x / sum(w) for x in w]


def _check_same_architecture(ref_path: Path, path: Path, ref, other) -> None:
    if other.args != ref.args:
        diff = {k: (v, getattr(other.args, k)) for k, v in vars(ref.args).items() if getattr(other.args, k) != v}
        raise ValueError(f"{path}: architecture differs from {ref_path} as (first, this): {diff}")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", type=Path, help="two or more rtkern train checkpoint directories")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--weights", type=finite_float(0.0, strict=True), nargs="+", default=None,
                   help="one positive weight per checkpoint (default: equal)")


def run(args: argparse.Namespace) -> int:
    try:
        out = average_checkpoints(args.checkpoints, args.out, weights=args.weights)
    except (ValueError, FileNotFoundError) as e:
        print(f"rtkern average: error: {e}", file=sys.stderr)
        return 1
    print(f"rtkern average: mean of {len(args.checkpoints)} checkpoints written to {out}")
    return 0
