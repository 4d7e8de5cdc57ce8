"""Rounding shared by the model kernels."""
import triton
import triton.language as tl


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
