"""Helpers shared by the kernels: rounding like torch, and the SM count (cached: it sits on the launch path)."""
import functools
import os

import torch
import triton
import triton.language as tl


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether rtkern's Triton kernels can run on ``device``: CUDA, or anywhere through the interpreter."""
    return device.type == "cuda" or interpreter_enabled()


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
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(DTYPE)
    else:
        return x.to(DTYPE)
