"""The repository's ``kernels/`` folder never stands in for Hugging Face's ``kernels`` package.

From the repository root the folder is importable as a top-level ``kernels``; transformers >= 5.25 depends
on the hub package of that name and imports it with every model, so the folder must hand the name over.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(*args, env=None):
    env = {**os.environ, **(env or {})}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_the_real_kernels_package_wins_over_the_folder(tmp_path):
    hub = tmp_path / "kernels"
    hub.mkdir()
    (hub / "__init__.py").write_text("from kernels.layer import Device\n")
    (hub / "layer.py").write_text("class Device:\n    pass\n")
    out = _python("-c", textwrap.dedent("""
        import kernels, rtkern.kernels.rmsnorm
        from kernels import Device
        print(kernels.__file__)
        print(rtkern.kernels.__file__)
    """), env={"PYTHONPATH": str(tmp_path)})
    hub_file, ours = out.split()
    assert Path(hub_file) == hub / "__init__.py"
    assert Path(ours) == ROOT / "kernels" / "__init__.py"


def test_without_a_hub_package_the_name_stays_an_empty_module():
    # -S: no site-packages, so no hub package and no triton/torch to import either
    out = _python("-S", "-c", "import kernels, sys; print(sorted(n for n in vars(kernels) if not n.startswith('__')),"
                              " sorted(m for m in sys.modules if m.startswith('kernels.')))")
    assert out.split() == ["[]", "[]"]


def test_transformers_imports_its_models_from_the_repository_root():
    _python("-c", "from transformers.models.llama.modeling_llama import LlamaForCausalLM")
