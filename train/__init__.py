"""Plain-PyTorch SFT trainer for refusal-token models (installed as ``rtkern.train``).

    cfg = TrainConfig(base="smollm2-135m-instruct", data=["../shared/data"], scheme="category", out="runs/sft")
    build_trainer(cfg).train()            # or: rtkern train --data ../shared/data --out runs/sft

Modules: `data` (readers, the fixed CoCoNot split, examples), `batching` (mixing, packing, collation),
`prepare` (control tokens, vocabulary growth), `loss` (chunked cross-entropy), `trainer` (the loop, DDP),
`checkpoint` (HF-compatible directories, exact resume), `average` (weight averaging of runs), `config`,
`metrics`, `run`, `cli`.
"""
import importlib

_EXPORTS = {"average_checkpoints": "average", "load_control_tokens": "checkpoint", "save_checkpoint": "checkpoint",
            "TrainConfig": "config",
            "DataError": "data", "Record": "data", "build_examples": "data", "load_data": "data",
            "load_eval_sets": "data", "load_recipe": "data", "read_file": "data",
            "chunked_cross_entropy": "loss", "ControlTokens": "prepare", "add_control_tokens": "prepare",
            "build_trainer": "run", "Trainer": "trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy, so that `rtkern train --help` (which imports rtkern.train.cli) stays light.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
