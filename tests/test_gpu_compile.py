"""Every Triton kernel compiles for an H100 (sm_90) with the real launchers' specialisations, GPU or not.

The interpreter that runs the other CPU tests never invokes the GPU compiler; ``tests/gpu_compile.py``
does, through a compile-only driver. It runs in a fresh process because the interpreter is chosen when
the kernels are imported.
"""
import importlib
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import rtkern.kernels

HERE = Path(__file__).parent


def launched_kernels() -> set:
    """Every ``*_kernel`` Triton function in rtkern.kernels (the launch targets, not the jit helpers)."""
    names = set()
    for info in pkgutil.iter_modules(rtkern.kernels.__path__):
        module = importlib.import_module(f"rtkern.kernels.{info.name}")
        names |= {n for n, obj in vars(module).items() if n.endswith("_kernel") and hasattr(obj, "fn")}
    return names


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, cwd=HERE, capture_output=True, text=True, timeout=900)


def test_every_kernel_compiles_for_sm90():
    r = _run("gpu_compile.py", "--arch", "90")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "kernels compiled for sm_90" in r.stdout
    compiled = {line.split()[0] for line in r.stdout.splitlines()[1:]}
    kernels = launched_kernels()
    assert len(kernels) >= 12 and compiled == kernels, f"compiled {sorted(compiled)}, defined {sorted(kernels)}"


def test_a_kernel_the_gpu_compiler_rejects_fails(tmp_path):
    # tl.dot needs K >= 8 (16 on older Triton) on NVIDIA GPUs; the interpreter happily multiplies 4 x 4.
    script = tmp_path / "bad.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, triton, triton.language as tl
        sys.path.insert(0, {str(HERE)!r})
        from gpu_compile import compile_only

        @triton.jit
        def small_dot(a_ptr, out_ptr, N: tl.constexpr):
            r = tl.arange(0, N)
            a = tl.load(a_ptr + r[:, None] * N + r[None, :])
            tl.store(out_ptr + r[:, None] * N + r[None, :], tl.dot(a, a))

        a = torch.zeros(4, 4)
        with compile_only(90, 132, []):
            small_dot[(1,)](a, a, N=4)
    """))
    r = _run(str(script))
    assert r.returncode != 0 and "K >=" in r.stderr, r.stderr[-2000:]
