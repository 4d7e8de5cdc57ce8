"""Compile every rtkern Triton kernel for an NVIDIA GPU on a machine that has none.

The CPU tests run the kernels through Triton's interpreter, which accepts code the GPU compiler rejects
(``tl.dot`` with K below 8, mixed operand dtypes) and never runs ptxas. This script drives
the real launchers with the shapes the engine and trainer use (SmolLM2-135M and Llama-3-8B, decode and
training batches) through a stand-in driver: each launch is bound and specialised by Triton exactly as on
a GPU, then compiled down to a cubin for the target (warm-up mode), and nothing runs. A kernel that
would fail to compile on an H100 fails here.

Run it without ``TRITON_INTERPRET``: ``python tests/gpu_compile.py [--arch 90] [--full] [--resources]``.
``--full`` adds fp16/fp32, more batch sizes and the 8B trainer shapes; the default set is what
``tests/test_gpu_compile.py`` runs. ``--resources`` prints each binary's registers and stack (spill) bytes.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction


class CompileOnlyDriver:
    """Just enough of a Triton driver for binding and compiling: device 0, no stream, the given target."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


@contextlib.contextmanager
def compile_only(arch: int, sms: int, log: list):
    """Launches compile for ``arch`` instead of running; rtkern's launchers see a GPU with ``sms`` SMs."""
    from rtkern.kernels import _common, decode_attention, fused_linear, refusal_sampler, rmsnorm
    saved_run = JITFunction.run
    saved = [(_common, "triton_runs_on"), (refusal_sampler, "_num_sms")] + \
        [(m, "num_sms") for m in (decode_attention, fused_linear, rmsnorm)]
    saved = [(m, name, getattr(m, name)) for m, name in saved]

    def run(self, *args, grid, warmup, **kwargs):
        kernel = saved_run(self, *args, grid=grid, warmup=True, **kwargs)
        log.append((self.fn.__name__, kernel))
        return kernel

    saved_driver = driver._active  # not driver.active: with no GPU, making the default one raises
    driver.set_active(CompileOnlyDriver(arch))
    JITFunction.run = run
    _common.triton_runs_on = lambda device: True
    for m, name, _ in saved[1:]:
        setattr(m, name, lambda device: sms)
    try:
        yield
    finally:
        JITFunction.run = saved_run
        for m, name, value in saved:
            setattr(m, name, value)
        driver._active = saved_driver


def decode_steps(name: str, dtype: torch.dtype, batches, both_forms: bool):
    """One fused decode step per batch size on a one-layer model of ``name``'s shape (uninitialised)."""
    from rtkern import fused_decode
    from rtkern.model import ModelArgs, Transformer
    args = ModelArgs.from_name(name)
    args.n_layers = 1
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cpu").to(dtype)
    model.setup_cache(max(batches), 512)
    fused_decode.prepare(model)
    forms = [(fused_decode.QKV_ROPE_MAX_SLICE_BYTES, fused_decode.MERGE_IN_O_PROJ_MAX_BYTES)]
    if both_forms:  # also the variant the thresholds do not pick for this shape
        forms.append((0, 0) if forms[0][0] >= args.head_dim * args.dim * dtype.itemsize else (2**40, 2**40))
    saved = forms[0]
    try:
        for qkv, merge in forms:
            fused_decode.QKV_ROPE_MAX_SLICE_BYTES, fused_decode.MERGE_IN_O_PROJ_MAX_BYTES = qkv, merge
            for B in batches:
                fused_decode.decode_step(model, torch.zeros(B, dtype=torch.long), torch.full((B,), 300))
    finally:
        fused_decode.QKV_ROPE_MAX_SLICE_BYTES, fused_decode.MERGE_IN_O_PROJ_MAX_BYTES = saved


def sampler_launches(V: int, dtype: torch.dtype, batches):
    from rtkern import RefusalControls, RefusalSpec, SampleOutput, pack_vocab_mask
    from rtkern.kernels.refusal_sampler import refusal_sample_launch
    spec = RefusalSpec([V - 6, V - 5, V - 4, V - 3, V - 2], respond_id=V - 1)
    for B in batches:
        for masked in (False, True):
            logits = torch.zeros(B, V, dtype=dtype)
            mask = pack_vocab_mask(torch.ones(B, V, dtype=torch.bool)) if masked else None
            c = RefusalControls.build(B, 5, "cpu", vocab_mask=mask)
            out = SampleOutput.empty(B, 5, "cpu")
            refusal_sample_launch(logits, spec.ids_tensor("cpu"), 5, c.thresholds, c.logit_bias, c.mode,
                                  c.temperature, c.first_step, c.seed, c.position, c.vocab_mask, out.tokens,
                                  out.refusal_probs, out.refused, False, None, None)


def training_launches(D: int, I: int, dtype: torch.dtype, tokens: int):
    from rtkern.kernels.rmsnorm import add_rmsnorm, rms_norm
    from rtkern.kernels.swiglu import silu_mul, swiglu
    x = torch.zeros(tokens, D, dtype=dtype, requires_grad=True)
    w = torch.ones(D, dtype=dtype, requires_grad=True)
    rms_norm(x, w, 1e-5).sum().backward()
    g, u = (torch.zeros(tokens, I, dtype=dtype, requires_grad=True) for _ in range(2))
    silu_mul(g, u).sum().backward()
    with torch.no_grad():  # the decode-time forms
        add_rmsnorm(x[:8].detach(), w.detach(), 1e-5, x[8:16].detach())
        swiglu(torch.zeros(8, 2 * I, dtype=dtype))


def compile_all(arch: int = 90, full: bool = False, sms: int = 132) -> list:
    """Compile every kernel launch of the engine and trainer for ``sm_<arch>``; the (name, kernel) log."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1: the interpreter replaces the compiler")
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if full else [torch.bfloat16]
    batches = [1, 2, 8, 32, 64] if full else [1, 8, 32]
    log: list = []
    with compile_only(arch, sms, log):
        for dtype in dtypes:
            decode_steps("smollm2-135m", dtype, batches, both_forms=True)
            decode_steps("llama3-8b", dtype, batches, both_forms=full)
            for V in (49152, 128256) if full else (49152,):
                sampler_launches(V, dtype, batches)
            training_launches(576, 1536, dtype, 2048)
            if full:
                training_launches(4096, 14336, dtype, 1024)
        sampler_launches(111, torch.float32, [3])  # an odd vocabulary
    return log


def registers_and_stack(kernel) -> tuple[int, int]:
    """(registers per thread, stack bytes in local memory: spills) of a compiled kernel, read by cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--full", action="store_true", help="all float dtypes, more batch sizes, the 8B trainer shapes")
    p.add_argument("--resources", action="store_true", help="also registers and spill bytes per kernel variant")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    log = compile_all(a.arch, a.full)
    names = sorted({n for n, _ in log})
    print(f"triton {triton.__version__}: {len(log)} launches of {len(names)} kernels compiled for sm_{a.arch} "
          f"in {time.perf_counter() - t0:.0f} s")
    for n in names:
        kernels = [k for name, k in log if name == n]
        print(f"  {n:28s} {len(kernels):3d} launches, shared memory <= "
              f"{max(k.metadata.shared for k in kernels):6d} B, warps {sorted({k.metadata.num_warps for k in kernels})}")
        if a.resources:  # one line per distinct binary
            for regs, stack in sorted({registers_and_stack(k) for k in kernels}):
                print(f"    {regs:3d} registers, {stack:3d} B stack{'  <- local memory (spills)' if stack else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
