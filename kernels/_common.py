"""Helpers shared by the kernels: rounding like torch, and the SM count (cached: it sits on the launch path)."""
import functools
import math
import os

import torch
import triton
import triton.language as tl


# triton.jit picks the interpreter when a kernel is defined, i.e. when rtkern is imported: setting
# TRITON_INTERPRET=1 later leaves compiled kernels behind, which fail on CPU tensors deep inside Triton.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET_HINT = "TRITON_INTERPRET=1 (set before importing rtkern)"


def interpreter_enabled() -> bool:
    return _INTERPRET_AT_IMPORT and os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_incompatibility() -> str | None:
    """Why this Triton's interpreter cannot run rtkern's kernels here, or None.

    Triton < 3.7's interpreter turns a loop bound into a Python int with ``int(array)`` on a 1-element
    array, which NumPy >= 2.4 rejects: every kernel with a runtime loop bound fails. (Compiled GPU
    kernels are unaffected.) All kernel tests pass on Triton 3.6 with NumPy 2.3.
    """
    import numpy as np
    tv = tuple(int(x) for x in triton.__version__.split(".")[:2])
    nv = tuple(int(x) for x in np.__version__.split(".")[:2])
    if tv < (3, 7) and nv >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run kernels with runtime loop bounds under "
                f"NumPy {np.__version__}: install numpy<2.4 or triton>=3.7")
    return None


def triton_runs_on(device: torch.device) -> bool:
    """Whether rtkern's Triton kernels can run on ``device``: CUDA, or anywhere through the interpreter."""
    return device.type == "cuda" or interpreter_enabled()


def check_disjoint(**named) -> None:
    """ValueError if the memory spans of two of the named tensors overlap: a kernel that reads one while
    writing the other (in place, tile by tile) could read values it has already overwritten. Spans, not
    elements: two interleaved views that never alias (columns of one matrix) are refused too."""
    spans = {}
    for name, t in named.items():
        if t is None or t.numel() == 0:
            continue
        lo = t.data_ptr()
        spans[name] = (lo, lo + (1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))) * t.element_size())
    items = list(spans.items())
    for i, (a, (a0, a1)) in enumerate(items):
        for b, (b0, b1) in items[i + 1:]:
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{a} and {b} overlap in memory; pass separate tensors (e.g. {b}.clone())")


def check_tensors(**named) -> torch.device:
    """The launchers' first check: every argument a tensor, all on one device that Triton can run on.

    TypeError for a non-tensor; ValueError for mixed devices, or a CPU device without the interpreter
    (Triton would fail with "0 active drivers"). Returns the device.
    """
    first = device = None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if device is None:
            first, device = name, t.device
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device}, {first} on {device}: all must share a device")
    if device is not None and not triton_runs_on(device):
        raise ValueError(f"rtkern's Triton kernels run on CUDA tensors, or on the CPU with TRITON_INTERPRET=1 set "
                         f"before rtkern is imported; got tensors on {device}")
    return device


def check_eps(eps) -> float:
    """A norm epsilon as a float: finite and >= 0 (NaN or a negative one would turn every row to NaN)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 stands in for the CPU interpreter."""
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    # Round to nearest even like torch. Compiled GPU code does so already, but Triton's CPU interpreter
    # truncates float32 -> bfloat16, which would make CPU tests disagree with torch by an ulp; rounding
    # the bits first makes the final conversion exact on both.
    # A NaN keeps its bits: the carry of a NaN with low mantissa bits set (the GPU's 0x7FFFFFFF from 0/0 or
    # inf * 0) would run into the sign and turn it into -0.0, a finite value nothing downstream flags.
    if DTYPE == tl.bfloat16:
        xf = x.to(tl.float32)
        bits = xf.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(xf != xf, xf, bits.to(tl.float32, bitcast=True)).to(DTYPE)
    else:
        return x.to(DTYPE)
