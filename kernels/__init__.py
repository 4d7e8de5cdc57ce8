"""Triton kernels of rtkern, each beside its launcher (installed as ``rtkern.kernels``).

From the repository root (``python -m ...``, a REPL, ``python -m pytest``) this folder is also reachable as
a top-level ``kernels``: the import name of Hugging Face's hub-kernels package, which transformers >= 5.25
installs and imports with every model. Imported under that name, this module hands the name to the real
package, or stays empty where none is installed, so transformers never loads rtkern's kernels as its own.
"""
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None:
        # The import system returns whatever sys.modules holds under the name once this body has run.
        _sys.modules["kernels"] = _util.module_from_spec(_spec)
        _spec.loader.exec_module(_sys.modules["kernels"])
    del _machinery, _util, _os, _sys, _root, _path, _spec
